"""ProcessBench (Zheng et al. 2024, arXiv 2412.06559): data, the first-error prediction and the F1 metric.

A ProcessBench record is a problem, a solution split into ``steps`` and a ``label``: the 0-based index of the
first wrong step, or -1 when every step is correct. A PRM predicts the first step whose score falls below a
threshold (:func:`first_error`); per split, the accuracy is taken separately on the records with an error
and on the all-correct ones, and the benchmark's F1 is their harmonic mean (:func:`f1`).

:func:`load` reads one split from the hub (``Qwen/ProcessBench``, through ``datasets``) or from a local
folder of ``<split>.json`` files (a JSON list of records, the layout of the benchmark's GitHub release),
checks every record and records the file's sha256. Note that the hub copy was corrected after the first
release: report which one a result used (:attr:`ProcessBenchSplit.source`, ``sha256``). Scoring, the
threshold sweep and the tables are :mod:`erprm_core.stages.processbench_eval` (``erprm processbench``, stage
07_processbench).
"""

from __future__ import annotations

import json
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erprm_core.tasks._io import ArtifactError, file_sha256

log = logging.getLogger(__name__)

HUB_NAME = "Qwen/ProcessBench"
SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
REQUIRED_FIELDS = ("id", "problem", "steps", "label")

__all__ = ["HUB_NAME", "SPLITS", "REQUIRED_FIELDS", "ProcessBenchSplit", "load", "stratified_sample", "first_error",
           "f1"]  # fmt: skip


@dataclass
class ProcessBenchSplit(Sequence):
    """The checked records of one split and where they came from.

    ``records`` are dicts with at least ``id`` (str), ``problem`` (str), ``steps`` (list of str) and
    ``label`` (int, -1 = no error), plus whatever else the source holds (``generator``,
    ``final_answer_correct``). ``source`` is the file path or ``"Qwen/ProcessBench[split]@revision"``;
    ``sha256`` is the local file's digest (None for the hub). Behaves as a sequence of records.
    """

    split: str
    records: list[dict[str, Any]]
    source: str
    sha256: str | None = None
    revision: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    @property
    def n_errors(self) -> int:
        """Number of records with a wrong step (``label != -1``)."""
        return sum(r["label"] != -1 for r in self.records)


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    """Validate one raw record; raise ArtifactError naming ``where`` (file and record index)."""
    if not isinstance(rec, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise ArtifactError(f"{where}: missing field(s) {missing}; has {sorted(rec)}")
    where = f"{where} (id {rec['id']!r})"
    if not isinstance(rec["problem"], str):
        raise ArtifactError(f"{where}: 'problem' must be a string, got {type(rec['problem']).__name__}")
    steps = rec["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ArtifactError(f"{where}: 'steps' must be a list of strings")
    label = rec["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ArtifactError(f"{where}: 'label' must be an int (-1 = no wrong step), got {label!r}")
    if not -1 <= label < len(steps):
        raise ArtifactError(
            f"{where}: label {label} is outside [-1, {len(steps) - 1}] for a solution of {len(steps)} steps"
        )
    return {**rec, "id": str(rec["id"])}


def _check_split_name(split: str) -> str:
    if not isinstance(split, str) or not split or "/" in split or "\\" in split or split.startswith("."):
        raise ValueError(f"split must be a plain name such as one of {SPLITS}, got split={split!r}")
    return split


def load(split: str, path: Path | str | None = None, *, revision: str | None = None) -> ProcessBenchSplit:
    """One ProcessBench split: from ``path`` (a folder holding ``<split>.json``, or that file) or, when
    ``path`` is None, from the hub dataset ``Qwen/ProcessBench`` (split = file name; ``revision`` picks a
    hub revision; the hub is never used when ``path`` is given).

    Every record is checked (fields ``id``, ``problem``, ``steps`` as a list of strings, ``label`` an int in
    [-1, n_steps - 1], ids unique); a problem raises :class:`~erprm_core.io.ArtifactError` naming
    the file and line/column (bad JSON) or the record's index and id. Returns a :class:`ProcessBenchSplit`
    (a sequence of record dicts with the file's sha256).

    >>> data = load("gsm8k", "../shared/data/processbench")  # doctest: +SKIP
    >>> len(data), data.n_errors, data[0]["label"]  # doctest: +SKIP
    (400, 207, 1)
    """
    _check_split_name(split)
    if path is None:
        return _load_hub(split, revision)
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / f"{split}.json"
    if not file.is_file():
        raise ArtifactError(
            f"{file}: no such file; a local ProcessBench folder holds <split>.json files "
            f"(splits {', '.join(SPLITS)}), e.g. ../shared/data/processbench"
        )
    text = file.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, list):
        raise ArtifactError(f"{file}: expected a JSON list of records, got a {type(raw).__name__}")
    records = [_check_record(rec, f"{file}: record {i}") for i, rec in enumerate(raw)]
    _check_unique(records, str(file))
    digest = file_sha256(file)
    log.info("ProcessBench %s: %d records from %s (sha256 %s)", split, len(records), file, digest[:12])
    return ProcessBenchSplit(split, records, str(file), digest, None)


def _load_hub(split: str, revision: str | None) -> ProcessBenchSplit:
    label = f"{HUB_NAME}[{split}]" + (f"@{revision}" if revision else "")
    try:
        import datasets

        ds = datasets.load_dataset(HUB_NAME, split=split, revision=revision)
    except Exception as exc:
        raise ArtifactError(
            f"could not load {label} from the Hugging Face hub ({type(exc).__name__}: {exc}). Without hub "
            "access pass a local folder of <split>.json files instead (e.g. ../shared/data/processbench)."
        ) from exc
    records = [_check_record(dict(rec), f"{label}: record {i}") for i, rec in enumerate(ds)]
    _check_unique(records, label)
    log.info("ProcessBench %s: %d records from %s", split, len(records), label)
    return ProcessBenchSplit(split, records, label, None, revision)


def stratified_sample(data: ProcessBenchSplit, n: int, seed: int = 0) -> ProcessBenchSplit:
    """``n`` records drawn with ``numpy.random.default_rng(seed)``, stratified by label (errors and all-correct
    in the split's proportions, at least one of each when ``n >= 2`` and both exist), in file order; all of
    ``data`` when ``n`` >= its size. The released files list the errors first: their first ``n`` have no
    all-correct record, and F1 is undefined."""
    if n >= len(data.records):
        return data
    errors = [i for i, r in enumerate(data.records) if r["label"] != -1]
    correct = [i for i, r in enumerate(data.records) if r["label"] == -1]
    low, high = (1, n - 1) if n >= 2 and errors and correct else (0, n)
    n_errors = max(min(round(n * len(errors) / len(data.records)), high, len(errors)), low, n - len(correct))
    rng = np.random.default_rng(seed)
    chosen = [*rng.choice(errors, n_errors, replace=False), *rng.choice(correct, n - n_errors, replace=False)]
    records = [data.records[i] for i in sorted(int(i) for i in chosen)]
    return ProcessBenchSplit(data.split, records, data.source, data.sha256, data.revision)


def _check_unique(records: Sequence[dict[str, Any]], where: str) -> None:
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec["id"] in seen:
            raise ArtifactError(f"{where}: records {seen[rec['id']]} and {i} share the id {rec['id']!r}")
        seen[rec["id"]] = i


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; ValueError when it is not a number (or NaN)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got threshold={threshold!r}") from None
    if math.isnan(value):
        raise ValueError("threshold must be a number, got threshold=nan")
    return value


def is_missing(score: Any) -> bool:
    """Whether a step score is absent (None or NaN: a step whose tag was not located)."""
    return score is None or math.isnan(float(score))


def first_error(step_scores: Sequence[float | None], threshold: float = 0.5) -> int | None:
    """Index of the first step scored strictly below ``threshold``; -1 when none is (or there are no steps).

    A score exactly equal to the threshold counts as a correct step ("below" is strict). A missing score
    (None or NaN: a step whose tag the PRM could not locate, e.g. cut by its length limit) ends what can be
    judged: the result is None when it comes before any step below the threshold.

    >>> first_error([0.9, 0.7, 0.2, 0.1])
    2
    >>> first_error([0.9, 0.5], threshold=0.5)  # a tie counts as correct
    -1
    >>> first_error([])
    -1
    >>> first_error([0.9, 0.1, None]), first_error([0.9, None, 0.1])
    (1, None)
    """
    threshold = check_threshold(threshold)
    for i, score in enumerate(step_scores):
        if is_missing(score):
            return None
        if float(score) < threshold:
            return i
    return -1


def _check_label(value: Any, name: str, index: int) -> int:
    try:
        as_int = operator.index(value)  # ints and numpy integers, not floats or strings
    except TypeError:
        as_int = None
    if isinstance(value, bool) or as_int is None or as_int < -1:
        raise ValueError(f"{name}[{index}] = {value!r}: expected an int >= -1 (-1 = no wrong step)")
    return as_int


def f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """ProcessBench's metric: ``error_acc`` = accuracy on the records with a wrong step (``label != -1``;
    the prediction must equal the label exactly), ``correct_acc`` = accuracy on the all-correct records
    (``label == -1``; the prediction must be -1), ``f1`` = their harmonic mean, as fractions in [0, 1].

    ``f1`` is 0 when both accuracies are 0. When a subset is empty its accuracy is undefined: it is NaN,
    and so is ``f1`` (no warning; the other accuracy is still reported). Raises ValueError when the lengths
    differ or a value is not an int >= -1.

    >>> f1([1, -1, 2, -1], [1, 3, -1, -1])
    {'error_acc': 0.5, 'correct_acc': 0.5, 'f1': 0.5}
    >>> f1([-1, -1], [-1, -1])["error_acc"]  # no record with an error
    nan
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    preds = [_check_label(p, "predictions", i) for i, p in enumerate(predictions)]
    labs = [_check_label(v, "labels", i) for i, v in enumerate(labels)]
    err = [p == v for p, v in zip(preds, labs, strict=True) if v != -1]
    cor = [p == -1 for p, v in zip(preds, labs, strict=True) if v == -1]
    error_acc = sum(err) / len(err) if err else math.nan
    correct_acc = sum(cor) / len(cor) if cor else math.nan
    if math.isnan(error_acc) or math.isnan(correct_acc):
        score = math.nan
    elif error_acc + correct_acc == 0:
        score = 0.0
    else:
        score = 2 * error_acc * correct_acc / (error_acc + correct_acc)
    return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": score}
