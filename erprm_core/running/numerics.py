"""Machine setup of a stage: pinned CPU numerics (the same bits on every x86-64 machine), the CPU thread
count, and a record of what ran.

PyTorch's CPU kernels pick a code path by the host's instruction set: ATen's vectorised kernels (AVX2 or
AVX-512), MKL's GEMM (per CPU family, and per thread count) and oneDNN. Different paths round differently in
the last bit, and float32 training amplifies such differences into different models, so the same commit
gives other numbers on another host. Pinning the three libraries to the AVX2 level, which every x86-64 CPU of
the last decade has, removes that: ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2,STRICT`` (MKL's conditional
numerical reproducibility; STRICT also makes GEMM independent of the thread count) and
``ONEDNN_MAX_CPU_ISA=AVX2``.

Each library reads its variable once, at its first use, so the pins must be in the environment before the
first tensor operation of a process. ``erprm reproduce`` puts them in the environment of every notebook
kernel it starts (:func:`pin_environment`); the notebooks call :func:`configure` first thing, which sets them
when a kernel was started by hand (JupyterLab) and fails loudly when it is too late. The CPU profiles
(``smoke``, ``tiny``) use ``cpu_numerics: avx2``; the GPU/paper profiles keep each library's default
(``cpu_numerics: default``).

>>> pin_environment("avx2")["ATEN_CPU_CAPABILITY"]
'avx2'
>>> pin_environment("default")
{}
"""

from __future__ import annotations

import logging
import os
import platform
import re
from typing import Any

log = logging.getLogger(__name__)

LEVELS: dict[str, dict[str, str]] = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
"""Pin levels by name: the environment variables that fix each library's kernel path."""

PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
"""Every variable any level sets; a level that leaves one out leaves it to the library's default."""

MAX_PINNED_THREADS = 2
"""Auto thread count under pins is capped here: bit-identical results are tested for 1 and 2 threads only."""

_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def pin_environment(level: str) -> dict[str, str]:
    """The environment variables of pin level ``level`` ("avx2" or "default"); unknown names are errors."""
    if level not in LEVELS:
        raise ValueError(f"cpu_numerics={level!r} unknown; choose one of {sorted(LEVELS)}")
    return dict(LEVELS[level])


def configure(level: str, torch_threads: int = 0) -> dict[str, Any]:
    """Apply pin level ``level`` and the thread count in this process; return the provenance to record.

    Sets the level's variables in ``os.environ`` (a differing value already there is overridden, with a
    warning), then checks that ATen really runs at the pinned level: if a tensor operation ran before this
    call the library has already chosen its path, and the error says to restart the kernel. ``torch_threads``
    as in :func:`set_cpu_threads` (0 = the idle cores), capped at
    :data:`MAX_PINNED_THREADS` when pinned and auto.
    """
    env = pin_environment(level)
    for key, value in env.items():
        old = os.environ.get(key)
        if old is not None and old != value:
            log.warning("%s=%s overridden by cpu_numerics=%s (%s)", key, old, level, value)
        os.environ[key] = value
    if env:
        expected = env["ATEN_CPU_CAPABILITY"].upper()
        actual = _aten_capability()
        if actual != expected:
            raise RuntimeError(
                f"cpu_numerics={level!r} needs ATen at {expected}, but this process already runs {actual}: "
                "a tensor operation ran before the pins were set. Restart the kernel and run this cell first, "
                f"or start Jupyter with {' '.join(f'{k}={v}' for k, v in env.items())} in the environment."
            )
    threads = set_cpu_threads(torch_threads)
    if env and torch_threads == 0 and threads > MAX_PINNED_THREADS:
        threads = set_cpu_threads(MAX_PINNED_THREADS)
    return {"cpu_numerics": level, **describe()}


def _busy_cpu_fraction(window_s: float) -> float | None:
    """Fraction of all CPU time that was busy during ``window_s`` seconds (Linux /proc/stat), else None."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    time.sleep(window_s)
    second = sample()
    if first is None or second is None or second[0] <= first[0]:
        return None
    return 1.0 - (second[1] - first[1]) / (second[0] - first[0])


def set_cpu_threads(requested: int = 0, window_s: float = 0.5) -> int:
    """Set torch's CPU thread count and return it. ``requested`` > 0 is used as is.

    ``0`` (auto) uses the cores that are idle right now: the usable cores times the idle fraction measured
    over ``window_s`` seconds, rounded, at least 1. The reason: torch's OpenMP threads spin while they wait,
    so two threads on a 2-core machine whose other core is busy run about twice as slowly as one thread,
    while on an idle machine they run about 1.8x faster than one. The count does not change results (the
    CPU kernels used here give the same bits for 1 and 2 threads); the manifest records it.
    """
    if requested < 0:
        raise ValueError(f"torch_threads must be >= 0 (0 = auto), got {requested}")
    if requested == 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        busy = _busy_cpu_fraction(window_s)
        requested = cores if busy is None else max(1, min(cores, round(cores * (1.0 - busy))))
    import torch

    torch.set_num_threads(requested)
    return requested


def describe() -> dict[str, Any]:
    """:func:`host` plus what this process runs with: ATen's kernel level, the pins and the thread count."""
    import torch

    return {
        **host(),
        "aten_capability": _aten_capability(),
        "pins": {key: os.environ.get(key) for key in PIN_VARIABLES},
        "torch_threads": torch.get_num_threads(),
    }


def host() -> dict[str, Any]:
    """The machine's CPU model and instruction sets, and the BLAS and oneDNN builds inside torch."""
    import torch

    config = torch.__config__.show()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "blas": _first_match(r"(?:Math Kernel Library Version |OpenBLAS )([\d.]+)", config),
        "onednn": _first_match(r"(?:MKL-DNN|oneDNN) (v[\d.]+)", config),
    }


def _aten_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def _cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in _FLAGS_OF_INTEREST if f in flags]
    return []


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:  # not Linux
        return []


def _first_match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1).strip() if m else None
