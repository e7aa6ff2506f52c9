"""MATH500 problems (the 500-problem MATH test subset of Lightman et al.) from the hub or a local JSONL file.

Hub: ``HuggingFaceH4/MATH-500`` (split "test"); local files have the same fields ``{"problem", "solution",
"answer", "subject", "level", "unique_id"}``. Records become ``{"id" (the unique_id), "question", "answer"
(normalised LaTeX), "solution", "task": "math", "subject", "level", "n_steps"}``. MATH solutions are
paragraphs; :func:`format_math_solution` makes each paragraph one step (one line) and appends
``The answer is: <answer>`` so that every task's reference solutions end the same way (math_train reuses it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from erprm_core.grading import normalize_reference
from erprm_core.io import Audit
from erprm_core.steps import join_steps, split_steps
from erprm_core.tasks._io import file_sha256, load_dataset_problems

TASK = "math"
HUB_NAME = "HuggingFaceH4/MATH-500"
SPLITS = ("test",)
REQUIRED = ("problem", "solution", "answer")
_PARAGRAPH = re.compile(r"\n\s*\n")
# blocks kept whole (their blank lines do not start a new step): Asymptote code, \[...\], environments
_BLOCK = re.compile(r"\[asy\].*?\[/asy\]|\\\[.*?\\\]|\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)

__all__ = ["HUB_NAME", "load_problems", "to_problem", "format_math_solution", "file_sha256"]


def format_math_solution(solution: str, answer: str) -> str:
    """One step per line: each blank-line-separated paragraph joined into one line, + ``The answer is: X``.

    Asymptote blocks, display math ``\\[...\\]`` and ``\\begin{env}...\\end{env}`` are never split (their
    line breaks become spaces).
    """
    solution = _BLOCK.sub(lambda m: " ".join(m.group(0).split()), solution)
    steps = [" ".join(split_steps(par)) for par in _PARAGRAPH.split(solution)]
    return join_steps([s for s in steps if s] + [f"The answer is: {answer}"])


def to_problem(raw: dict[str, Any], problem_id: str) -> dict[str, Any]:
    """Turn a MATH500 record into a problem record; ValueError when the answer is empty."""
    answer = normalize_reference(str(raw["answer"]), TASK)
    solution = format_math_solution(str(raw["solution"]), answer)
    rec: dict[str, Any] = {"id": str(raw.get("unique_id") or problem_id), "question": str(raw["problem"]).strip(),
                           "answer": answer, "solution": solution, "task": TASK,
                           "n_steps": len(split_steps(solution))}  # fmt: skip
    for extra in ("subject", "level"):
        if extra in raw:
            rec[extra] = raw[extra]
    return rec


def load_problems(
    split: str = "test",
    source: Path | str | None = None,
    limit: int | None = None,
    audit: Audit | None = None,
) -> list[dict[str, Any]]:
    """MATH500 problem records in dataset order, the first ``limit`` of them.

    ``source``: None loads ``HuggingFaceH4/MATH-500`` (split "test") from the hub; otherwise a local JSONL
    file with the hub's fields, or a folder holding ``<split>.jsonl``. Ids are the dataset's ``unique_id``
    (``math500-<split>-<index>`` when absent). A malformed record raises ArtifactError naming file and line.
    ``audit`` (optional) counts the records kept.
    """
    return load_dataset_problems(
        label="MATH500", hub=(HUB_NAME, None, SPLITS), required=REQUIRED,
        local_hint="../shared/data/math500/test.jsonl", to_problem=to_problem, id_prefix="math500",
        split=split, source=source, limit=limit, audit=audit,
    )  # fmt: skip
