"""MATH train problems (Hendrycks et al. 2021) for the paper-math profile: PRM rollouts and RAFT prompts.

The original hub copy (``lighteval/MATH``, used by the authors' code) was taken down in January 2025; this
loader reads the maintained mirror ``EleutherAI/hendrycks_math`` (one config per subject, fields
``{"problem", "level", "type", "solution"}``, splits "train" 7,500 / "test" 5,000) or a local JSONL file with
``problem`` and ``solution`` (optional ``answer``, ``type``/``subject``, ``level``, ``unique_id``). The reference
answer is the last ``\\boxed{}`` of the solution (or the ``answer`` field); a record without one is skipped and
counted under ``no_boxed_answer`` in the optional audit (and logged). Records have the schema of
:mod:`erprm_core.tasks.math500` (solution one paragraph per line, ending ``The answer is: X``). Note that the
MATH test split contains MATH500: train on "train", evaluate on MATH500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from erprm_core.grading import last_boxed, normalize_reference
from erprm_core.io import Audit
from erprm_core.steps import split_steps
from erprm_core.tasks._io import check_limit, file_sha256, iter_hub, iter_local, resolve_source
from erprm_core.tasks.math500 import format_math_solution

log = logging.getLogger(__name__)

TASK = "math"
HUB_NAME = "EleutherAI/hendrycks_math"
SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip
SPLITS = ("train", "test")
REQUIRED = ("problem", "solution")


def to_problem(raw: dict[str, Any], problem_id: str) -> dict[str, Any] | None:
    """Turn a MATH record into a problem record; None when it has no answer (no ``\\boxed{}``, no field)."""
    solution = str(raw["solution"])
    given = raw.get("answer")
    source = str(given) if given not in (None, "") else last_boxed(solution)
    if source is None:
        return None
    try:
        answer = normalize_reference(source, TASK)
    except ValueError:
        return None
    steps = format_math_solution(solution, answer)
    rec: dict[str, Any] = {"id": str(raw.get("unique_id") or problem_id), "question": str(raw["problem"]).strip(),
                           "answer": answer, "solution": steps, "task": TASK,
                           "n_steps": len(split_steps(steps))}  # fmt: skip
    subject = raw.get("subject", raw.get("type"))
    if subject is not None:
        rec["subject"] = subject
    if "level" in raw:
        rec["level"] = raw["level"]
    return rec


def _hub_records(split: str, subjects: Iterable[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for subject in subjects:
        hint = "<a local MATH train jsonl with problem/solution fields>"
        for index, (where, raw) in enumerate(iter_hub(HUB_NAME, subject, split, REQUIRED, hint)):
            yield where, f"{TASK}-{split}-{subject}-{index:05d}", raw


def _local_records(path: Path, split: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for index, (where, raw) in enumerate(iter_local(path, REQUIRED)):
        yield where, f"{TASK}-{split}-{index:05d}", raw


def load_problems(
    split: str = "train",
    source: Path | str | None = None,
    limit: int | None = None,
    audit: Audit | None = None,
    subjects: Iterable[str] = SUBJECTS,
) -> list[dict[str, Any]]:
    """MATH problem records of ``split`` in dataset order (subjects in ``subjects`` order), the first ``limit``.

    ``source``: None loads ``EleutherAI/hendrycks_math`` (one config per subject) from the hub; otherwise a
    local JSONL file (or a folder holding ``<split>.jsonl``). Malformed lines raise ArtifactError naming file
    and line; records without an answer are skipped, logged, and counted in ``audit`` ("no_boxed_answer";
    kept ones under "kept").
    """
    limit = check_limit(limit)
    subjects = tuple(subjects)
    if source is None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} for {HUB_NAME}, got split={split!r}")
        unknown = [s for s in subjects if s not in SUBJECTS]
        if unknown:
            raise ValueError(f"subjects must be among {SUBJECTS}, got unknown {unknown}")
        records = _hub_records(split, subjects)
    else:
        path = resolve_source(source, split)
        log.info("loading MATH %s from %s (sha256 %s)", split, path, file_sha256(path)[:12])
        records = _local_records(path, split)
    problems: list[dict[str, Any]] = []
    skipped: list[str] = []
    for where, problem_id, raw in records:
        if limit is not None and len(problems) >= limit:
            break
        rec = to_problem(raw, problem_id)
        if rec is None:
            skipped.append(where)
            if audit is not None:
                audit.count("no_boxed_answer", example=where)
            continue
        problems.append(rec)
    if skipped:
        log.warning(
            "skipped %d MATH record(s) without a \\boxed{} answer, first at %s", len(skipped), skipped[0]
        )
    if audit is not None:
        audit.count("kept", len(problems))
    return problems
