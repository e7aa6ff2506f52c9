"""Problem sources: ``arith`` (synthetic GSM8K-style generator), ``gsm8k`` and ``math500`` (hub or local JSONL).

Every source yields problem records ``{"id", "question", "answer", "solution", "task"}``; ``answer`` is the
normalised reference answer that :func:`erprm_core.grading.is_correct` compares against.

:func:`load_problems` dispatches on the task name (the gsm8k/math500 modules are imported lazily, so the
embedded default needs nothing but the generator).
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from erprm_core.tasks import arith

# task name -> {side: module}; MATH trains on the MATH train split and tests on MATH500.
TASKS = {
    "arith": {"train": "arith", "test": "arith"},
    "gsm8k": {"train": "gsm8k", "test": "gsm8k"},
    "math": {"train": "math_train", "test": "math500"},
    "math500": {"train": "math_train", "test": "math500"},
}
TRAIN_SPLITS = ("train_sft", "train_prm", "raft")  # drawn, disjoint, from the train side


def _side(split: str) -> str:
    if split in ("train", *TRAIN_SPLITS):
        return "train"
    if split == "test":
        return "test"
    raise ValueError(f"split {split!r} unknown; use 'train', 'test' or one of {TRAIN_SPLITS}")


def load_problems(
    task: str,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    source: str | dict[str, str] | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Problems of ``task`` ("arith", "gsm8k", "math500"/"math") from its ``split`` side ("train"/"test").

    ``arith``: the first ``n`` generated problems for ``seed`` (``kw`` are the generator's difficulty knobs,
    see :func:`erprm_core.tasks.arith.generate_problems`). ``gsm8k``/``math500``: the records of
    ``source`` (local JSONL file or folder; None: the module's hub default; a dict maps side -> source;
    MATH reads its train side from :mod:`~erprm_core.tasks.math_train` and its test side from
    :mod:`~erprm_core.tasks.math500`); ``n`` (None or < 0: all) problems,
    a seeded random subset for the train side and the first ``n`` in file order for the test side.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; choose one of {sorted(TASKS)}")
    side = _side(split)
    if task == "arith":
        if n is None or n < 0:
            raise ValueError("task 'arith' is unlimited: pass the number of problems n >= 0")
        if source:
            raise ValueError(f"task 'arith' is generated and takes no source (got {source!r})")
        return arith.generate_problems(n, seed, side, **kw)
    if kw:
        raise ValueError(f"task {task!r} takes no generator knobs, got {sorted(kw)}")
    module = importlib.import_module(f"erprm_core.tasks.{TASKS[task][side]}")
    side_source = source.get(side) if isinstance(source, dict) else source
    records = list(module.load_problems(split=side, source=side_source, limit=None))
    if side == "train":
        rng = random.Random(f"{task}:{seed}")
        rng.shuffle(records)
    if n is not None and n >= 0:
        if n > len(records):
            raise ValueError(f"asked for n={n} {task} {side} problems but the source has only {len(records)}")
        records = records[:n]
    return records
