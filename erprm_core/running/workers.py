"""Independent units of a stage (sampling shards, RAFT chains) in several one-thread processes on the CPU.

Sampling a model this small keeps two cores busier as two processes of one thread than as one process of
two: the decoding loop's Python and its many small tensor operations do not spread over threads, processes
do (01's rollouts: 1.27x on 2 idle cores, measured back to back; ``erprm bench`` prints the figure per
workload). Batched training and scoring do spread over threads, and gained nothing as one process per PRM,
so they stay in one process. The results do not change: the CPU profiles pin their numerics
(:mod:`erprm_core.running.numerics`), and the pinned kernels give the same bits at 1 and 2 threads.

Processes are forked, so a unit sees everything its stage loaded (a sampler, a model, the prompts) without
pickling it; only its result travels back, pickled. Forking is used only where it is safe and pays: on the
CPU (a CUDA context does not survive a fork), with more than one thread to spread, and never from inside a
worker (a worker runs nested units itself, one after the other). Otherwise :func:`fork_map` is a plain loop
in this process, so the serial path is the same code.

>>> fork_map(abs, [-2, 3, -4], workers=1)
[2, 3, 4]
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from erprm_core.io import SILENT_ENV, progress
from erprm_core.running import numerics

_IN_WORKER = False
"""True inside a forked worker: its own units run serially there (pool workers cannot fork)."""

_TASK: tuple[Callable[[Any], Any], Sequence[Any]] | None = None
"""The function and items of the running :func:`fork_map`; inherited by the forked workers."""


def worker_count(threads: int, pinned: bool, backend: str = "hf") -> int:
    """How many one-thread processes a stage given ``threads`` CPU threads runs its units in: ``threads`` on
    a CPU-only Linux machine with pinned numerics (``pinned``: the same bits at any thread count) and the HF
    sampling ``backend``, else 1 (on a GPU the units share the device in one process; a vLLM engine is one
    process; unpinned kernels may round differently at 1 thread; macOS and Windows do not fork safely)."""
    if _IN_WORKER or threads <= 1 or not pinned or backend != "hf" or not sys.platform.startswith("linux"):
        return 1
    import torch

    if torch.cuda.is_available():
        return 1
    return threads


def _start_worker() -> None:
    global _IN_WORKER
    _IN_WORKER = True
    os.environ[SILENT_ENV] = "1"  # the parent's bar counts the units; workers draw none
    numerics.set_cpu_threads(1)


def _run_unit(index: int) -> tuple[int, Any]:
    fn, items = _TASK  # type: ignore[misc]
    return index, fn(items[index])


def fork_map(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str = "units", unit: str = "unit"
) -> list[Any]:
    """``[fn(item) for item in items]``, with the items spread over ``workers`` forked one-thread processes
    when ``workers > 1`` and there are at least two items (see the module docstring); results in item order.

    ``fn`` may be a closure: the workers inherit it. Side effects of ``fn`` on objects of this process
    (counters, caches in memory) stay in the worker, so ``fn`` must return what the caller needs; files it
    writes are shared. The first exception raised by a unit is raised here, after the running units stop.
    """
    global _TASK
    items = list(items)
    if workers <= 1 or len(items) <= 1 or _IN_WORKER:
        return [fn(item) for item in progress(items, desc=desc, unit=unit)]
    results: list[Any] = [None] * len(items)
    _TASK = (fn, items)
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(items)), initializer=_start_worker) as pool:
            done = pool.imap_unordered(_run_unit, range(len(items)))
            for index, result in progress(done, total=len(items), desc=desc, unit=unit):
                results[index] = result
    finally:
        _TASK = None
    return results
