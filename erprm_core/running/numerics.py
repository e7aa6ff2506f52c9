"""Machine setup of a stage: pinned CPU numerics (the same bits on every x86-64 CPU with AVX2, Intel or AMD),
the CPU thread count, and a record of what ran.

PyTorch's CPU kernels pick a code path by the host: ATen's vectorised kernels by instruction set (AVX2 or
AVX-512), MKL's GEMM and vector math (``exp``, ``log``, ``sqrt``, ...) by CPU vendor and family, oneDNN by
instruction set. Different paths round differently in the last bit, and float32 training amplifies such
differences into different models. Level ``portable`` fixes all three:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's AVX2 kernels on every host;
- ``MKL_CBWR=COMPATIBLE,STRICT``: MKL's conditional-numerical-reproducibility branch that is the same code
  on Intel and AMD (SSE2, without the approximate ``rcpps``/``rsqrtps``, whose tables differ by vendor);
  STRICT makes GEMM independent of the thread count. The previous pin ``MKL_CBWR=AVX2`` fixes a branch on
  Intel CPUs only: MKL documents that elsewhere it runs its AUTO branch, so AMD hosts ran other GEMM code
  than Intel hosts (and Zen 3 other code than Zen 4). REPRODUCING.md, "Same bits on Intel and AMD", gives
  the evidence (an operation-by-operation trace under emulated Intel and AMD CPUs) and the cost;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's AVX2 kernels;
- MKL's GEMM on one thread (:func:`set_cpu_threads`; ATen's own kernels keep every thread): STRICT holds
  for MKL's AVX2-and-later branches only, and the COMPATIBLE branch splits a long reduction (the LM head's
  gradient) over the threads, so 1 and 2 threads gave different weights. Measured on the tiny model, MKL's
  second thread bought 5% there (COMPATIBLE runs SSE2 code), so nothing is lost by leaving it out.

Each library reads its variable once, at its first use, so the pins must be in the environment before the
first tensor operation of a process. ``erprm reproduce`` puts them in the environment of every notebook
kernel it starts (:func:`pin_environment`); the notebooks call :func:`configure` first thing, which sets them
when a kernel was started by hand (JupyterLab) and fails loudly when it is too late. The CPU profiles
(``smoke``, ``tiny``) use ``cpu_numerics: portable``; the GPU/paper profiles keep each library's default
(``cpu_numerics: default``).

>>> pin_environment("portable")["MKL_CBWR"]
'COMPATIBLE,STRICT'
>>> pin_environment("default")
{}
"""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEVELS: dict[str, dict[str, str]] = {
    "default": {},
    "portable": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "COMPATIBLE,STRICT",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
"""Pin levels by name: the environment variables that fix each library's kernel path."""

PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
"""Every variable any level sets; a level that leaves one out leaves it to the library's default."""

VENDOR_SPECIFIC_OPS = frozenset({"sqrt"})
"""ATen operations whose float32 CPU kernel gives other last bits on Intel and AMD whatever the pins: ``sqrt``
runs MKL's vector square root, whose kernel refines the approximate ``rsqrtps`` (its table differs by vendor)
even in the COMPATIBLE branch. The pinned stages must not call them; a test runs the stages' operations and
checks (the fused AdamW step takes ATen's own, exact square root)."""

MAX_PINNED_THREADS = 2
"""Auto thread count under pins is capped here: bit-identical results are tested for 1 and 2 threads only."""

_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def pin_environment(level: str) -> dict[str, str]:
    """The environment variables of pin level ``level`` ("portable" or "default"); unknown names are errors."""
    if level not in LEVELS:
        raise ValueError(f"cpu_numerics={level!r} unknown; choose one of {sorted(LEVELS)}")
    return dict(LEVELS[level])


def configure(level: str, torch_threads: int = 0) -> dict[str, Any]:
    """Apply pin level ``level`` and the thread count in this process; return the provenance to record.

    Sets the level's variables in ``os.environ`` (a differing value already there is overridden, with a
    warning), then checks that ATen really runs at the pinned level: if a tensor operation ran before this
    call the library has already chosen its path, and the error says to restart the kernel. ``torch_threads``
    as in :func:`set_cpu_threads` (0 = the usable cores), capped at :data:`MAX_PINNED_THREADS` when pinned
    and auto.
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


def set_cpu_threads(requested: int = 0) -> int:
    """Set torch's CPU thread count and return it. ``requested`` > 0 is used as is; ``0`` (auto) is the
    number of cores this process may use, the same on every run of a machine. Under MKL's COMPATIBLE branch
    (level ``portable``) MKL's calls from this thread then run on one thread, so that GEMM gives the same bits
    whatever the count; torch's own setter resets that, so code under the pins sets threads through here.

    The count used to follow the load at a stage's start (the idle cores), so a stage that started beside a
    busy process ran on one thread for the whole stage (measured: 1,418 s instead of 538 s for the tiny
    00_policy). Results do not depend on it under the pins (1 and 2 threads give the same weights, a test);
    pin it with ``torch_threads=1`` on a machine shared with another job. The manifest records it.
    """
    if requested < 0:
        raise ValueError(f"torch_threads must be >= 0 (0 = auto), got {requested}")
    if requested == 0:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            requested = os.cpu_count() or 1
    import torch

    torch.set_num_threads(requested)
    if os.environ.get("MKL_CBWR", "").startswith("COMPATIBLE"):
        torch.get_num_threads()  # ATen's lazy per-thread setup, which sets MKL's count, runs at its first call
        _mkl_call("MKL_Set_Num_Threads_Local", 1)
    return requested


def _mkl_call(name: str, *args: int) -> int | None:
    """Call MKL's C function ``name`` inside torch's CPU library; None when torch was built without MKL.
    (MKL is linked into ``libtorch_cpu`` statically; torch has no Python API for these two settings.)"""
    import ctypes

    import torch

    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch.backends.mkl.is_available() or not path.is_file():
        return None
    return getattr(ctypes.CDLL(str(path)), name)(*args)


def describe() -> dict[str, Any]:
    """:func:`host` plus what this process runs with: ATen's kernel level, the pins and the thread count."""
    import torch

    return {
        **host(),
        "aten_capability": _aten_capability(),
        "pins": {key: os.environ.get(key) for key in PIN_VARIABLES},
        "torch_threads": torch.get_num_threads(),
        "blas_threads": _mkl_call("MKL_Get_Max_Threads"),
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
