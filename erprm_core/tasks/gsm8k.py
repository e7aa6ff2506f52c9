"""GSM8K problems (Cobbe et al. 2021) from the hub (``openai/gsm8k``, config "main") or a local JSONL file.

Raw records are ``{"question", "answer"}`` where ``answer`` is the worked solution with calculator annotations
``<<48/2=24>>`` and a final line ``#### N``. They become problem records ``{"id", "question", "answer",
"solution", "task": "gsm8k", "n_steps"}``: ``answer`` is the normalised number (``"1,450,000"`` ->
``"1450000"``), ``solution`` the worked steps one per line without annotations, ending ``The answer is: N``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from erprm_core.grading import normalize_reference
from erprm_core.io import Audit
from erprm_core.steps import join_steps, split_steps
from erprm_core.tasks._io import file_sha256, load_dataset_problems

TASK = "gsm8k"
HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS = ("train", "test")
REQUIRED = ("question", "answer")
_CALC = re.compile(r"<<[^<>]*>>")

__all__ = ["HUB_NAME", "HUB_CONFIG", "load_problems", "to_problem", "solution_from_answer", "file_sha256"]


def solution_from_answer(answer_field: str, answer: str) -> str:
    """The text before ``####`` without ``<<...>>`` annotations, one step per line, + ``The answer is: N``."""
    body = answer_field.rsplit("####", 1)[0]
    steps = split_steps(_CALC.sub("", body))
    return join_steps([*steps, f"The answer is: {answer}"])


def to_problem(raw: dict[str, Any], problem_id: str) -> dict[str, Any]:
    """Turn a raw GSM8K record into a problem record; ValueError when it has no ``#### N`` answer."""
    field = str(raw["answer"])
    if "####" not in field:
        raise ValueError("the answer field has no '#### N' final line")
    answer = normalize_reference(field, TASK)
    solution = solution_from_answer(field, answer)
    return {"id": problem_id, "question": str(raw["question"]).strip(), "answer": answer, "solution": solution,
            "task": TASK, "n_steps": len(split_steps(solution))}  # fmt: skip


def load_problems(
    split: str = "test",
    source: Path | str | None = None,
    limit: int | None = None,
    audit: Audit | None = None,
) -> list[dict[str, Any]]:
    """GSM8K problem records of ``split`` ("train"/"test"), in dataset order, the first ``limit`` of them.

    ``source``: None loads ``openai/gsm8k`` from the hub; otherwise a local JSONL file with the raw fields
    (``question``, ``answer``), or a folder holding ``<split>.jsonl``. Ids are ``gsm8k-<split>-<index>``. A
    malformed record raises ArtifactError naming its file and line (or hub index). ``audit`` (optional)
    counts the records kept.
    """
    return load_dataset_problems(
        label="GSM8K", hub=(HUB_NAME, HUB_CONFIG, SPLITS), required=REQUIRED,
        local_hint=f"../shared/data/gsm8k/{split}.jsonl", to_problem=to_problem, id_prefix=TASK,
        split=split, source=source, limit=limit, audit=audit,
    )  # fmt: skip
