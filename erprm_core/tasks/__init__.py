"""Problem sources: ``arith`` (synthetic GSM8K-style generator), ``gsm8k`` and ``math500`` (hub or local JSONL).

Every source yields problem records ``{"id", "question", "answer", "solution", "task"}``; ``answer`` is the
normalised reference answer that :func:`erprm_core.grading.is_correct` compares against.

:func:`load_problems` dispatches on the task name (the gsm8k/math500 modules are imported lazily, so the
embedded default needs nothing but the generator); :func:`write_problem_splits` is what 00_policy calls to
write the stage's problem files (``train_sft``, ``train_prm``, ``raft`` from the train side, ``test``).
"""

from __future__ import annotations

import hashlib
import importlib
import random
from typing import Any

import pandas as pd

# task name -> {side: module}; MATH trains on the MATH train split and tests on MATH500.
TASKS = {
    "arith": {"train": "arith", "test": "arith"},
    "gsm8k": {"train": "gsm8k", "test": "gsm8k"},
    "math": {"train": "math_train", "test": "math500"},
    "math500": {"train": "math_train", "test": "math500"},
}
TRAIN_SPLITS = ("train_sft", "train_prm", "raft")  # drawn, disjoint, from the train side

__all__ = ["TASKS", "TRAIN_SPLITS", "load_problems", "write_problem_splits"]


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
        from erprm_core.tasks import arith

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


def write_problem_splits(
    profile: str,
    task: str,
    sizes: dict[str, int],
    seed: int = 0,
    source: str | dict[str, str] | None = None,
    generator: dict[str, Any] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], pd.DataFrame]:
    """Write ``runs/<profile>/problems/<split>.jsonl`` for each split in ``sizes`` and return them.

    Train-side splits (``train_sft``, ``train_prm``, ``raft``) are consecutive, disjoint slices of one
    seeded train-side list (in that order); ``test`` comes from the test side. A size < 0 means "all"
    (hub tasks only). ``generator`` holds the difficulty knobs of a generated task (arith); hub tasks
    ignore it. Returns ``(problems by split, summary table)``; the summary has one row per split:
    split, n_problems, mean_steps (mean reference lines, the answer line excluded for arith), sha1
    (checksum of the ids, for the manifest).
    """
    from erprm_core import artifacts

    unknown = sorted(set(sizes) - {*TRAIN_SPLITS, "test"})
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown} in sizes; use {[*TRAIN_SPLITS, 'test']}")
    P = artifacts.paths(profile)
    kw = dict(generator or {}) if task == "arith" else {}
    out: dict[str, list[dict[str, Any]]] = {}
    train_names = [s for s in TRAIN_SPLITS if s in sizes]
    if train_names:
        if any(sizes[s] < 0 for s in train_names):
            if len(train_names) > 1 or task == "arith":
                raise ValueError("a train-side size < 0 ('all') is allowed only for one split of a hub task")
            total = None
        else:
            total = sum(sizes[s] for s in train_names)
        pool = load_problems(task, "train", total, seed, source, **kw)
        start = 0
        for name in train_names:
            stop = len(pool) if sizes[name] < 0 else start + sizes[name]
            out[name] = pool[start:stop]
            start = stop
    if "test" in sizes:
        n_test = sizes["test"]
        out["test"] = load_problems(task, "test", None if n_test < 0 else n_test, seed, source, **kw)
    rows = []
    for name, problems in out.items():
        artifacts.atomic_write_jsonl(P.problem_file(name), problems)
        steps = [
            p.get("n_steps", len([s for s in p.get("solution", "").splitlines() if s.strip()]))
            for p in problems
        ]
        digest = hashlib.sha1("\n".join(p["id"] for p in problems).encode()).hexdigest()
        rows.append(
            {
                "split": name,
                "n_problems": len(problems),
                "mean_steps": sum(steps) / len(steps) if steps else float("nan"),
                "sha1": digest,
            }
        )
    return out, pd.DataFrame(rows, columns=["split", "n_problems", "mean_steps", "sha1"])
