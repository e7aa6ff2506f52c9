"""First-error evaluation of a PRM (ProcessBench's protocol): scoring, metrics with intervals, sweep, tables.

Shared by ``erprm processbench`` (:mod:`erprm_core.running.processbench_cmd`), stage 07_processbench (the real
benchmark at paper scale, its synthetic twin at tiny scale) and 03_train_prm's held-out checks.

- :func:`metrics` / :func:`threshold_sweep`: ProcessBench's F1 (:func:`erprm_core.processbench.f1`) of the
  first step scored below a threshold (:func:`erprm_core.processbench.first_error`); a record whose prediction
  hinges on an unscored step is left out and counted (``n_excluded``).
- :func:`first_error_f1`: the same F1 with a percentile-bootstrap interval, over records or, with ``groups``,
  over groups of records (e.g. the candidates of one problem, which are not independent).
- :func:`score_records`: step scores of ProcessBench-format records with a
  :class:`~erprm_core.prm.ProcessRewardModel`; :func:`evaluate` does it for whole splits in resumable shards
  and writes the tables (:func:`output_paths`): summary, per record, audit (every record not fully scored is
  counted by reason, never dropped), threshold sweep, info with data sha256s and the PRM's revision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import processbench, stats
from erprm_core.io import ArtifactError, Audit, atomic_write_json, atomic_write_text
from erprm_core.prm import ProcessRewardModel
from erprm_core.running.artifacts import prepare_shard_folder, run_sharded

log = logging.getLogger(__name__)

HUB_DATA = ("hub", processbench.HUB_NAME)
SHARD_COLUMNS = ("id", "label", "n_steps", "status", "step_scores")
SUMMARY_COLUMNS = [
    "split", "n", "n_error", "n_correct", "n_excluded", "error_acc", "correct_acc", "f1", "f1_low", "f1_high",
    "threshold", "prm", "scoring",
]  # fmt: skip
RECORD_COLUMNS = ["split", "id", "label", "prediction", "n_steps", "status", "n_tokens", "step_scores"]
SWEEP_COLUMNS = ["split", "threshold", "n", "n_excluded", "error_acc", "correct_acc", "f1"]
# The threshold grid of the sweep: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def metrics(
    step_scores: Sequence[Sequence[float | None]], labels: Sequence[int], threshold: float = 0.5
) -> dict[str, Any]:
    """The numbers at one threshold: :func:`~erprm_core.processbench.f1` of the
    :func:`~erprm_core.processbench.first_error` predictions, plus counts.

    Records whose prediction is undetermined (None: an unscored step comes before any step below the
    threshold) are left out of the accuracies and counted in ``n_excluded``. Returns ``n`` (all records),
    ``n_error`` / ``n_correct`` (records in each subset that enter the metric), ``n_excluded``,
    ``error_acc``, ``correct_acc``, ``f1`` and ``threshold``.

    >>> metrics([[0.9, 0.2], [0.8, 0.7]], [1, -1])["f1"]
    1.0
    """
    if len(step_scores) != len(labels):
        raise ValueError(f"{len(step_scores)} step-score lists but {len(labels)} labels")
    threshold = processbench.check_threshold(threshold)
    preds = [processbench.first_error(s, threshold) for s in step_scores]
    kept = [(p, v) for p, v in zip(preds, labels, strict=True) if p is not None]
    result = processbench.f1([p for p, _ in kept], [v for _, v in kept])
    return {
        "n": len(labels),
        "n_error": sum(v != -1 for _, v in kept),
        "n_correct": sum(v == -1 for _, v in kept),
        "n_excluded": len(labels) - len(kept),
        **result,
        "threshold": threshold,
    }


def threshold_sweep(
    step_scores: Sequence[Sequence[float | None]],
    labels: Sequence[int],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[dict[str, Any]]:
    """:func:`metrics` at every threshold of ``thresholds`` (default 0.05, 0.10, ..., 0.95): one dict per
    threshold, in the given order.

    >>> [round(r["f1"], 2) for r in threshold_sweep([[0.9, 0.2], [0.8, 0.7]], [1, -1], [0.1, 0.5, 0.75])]
    [0.0, 1.0, 0.0]
    """
    if not len(thresholds):
        raise ValueError("thresholds is empty")
    return [metrics(step_scores, labels, t) for t in thresholds]


def first_error_f1(
    predictions: Sequence[int],
    truth: Sequence[int],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: Sequence[Any] | None = None,
) -> dict[str, float]:
    """ProcessBench's :func:`~erprm_core.processbench.f1` of first-error ``predictions`` against the
    ``truth`` (both ProcessBench-style: index of the first wrong step, -1 for none), with a percentile
    bootstrap interval of ``f1`` (``f1_low``, ``f1_high``; resamples where F1 is undefined are left out),
    plus ``n``, ``n_error`` and ``n_correct`` (records with and without a wrong step).

    The bootstrap resamples records, or whole groups when ``groups`` gives each record's group (use the
    problem id when several solutions of one problem are scored: they are not independent). Each resample's
    two accuracies are ratios of per-group sums (:func:`erprm_core.stats.problem_resample_weights`).

    >>> r = first_error_f1([1, -1, 2, -1], [1, 3, -1, -1], n_boot=200)
    >>> (r["error_acc"], r["correct_acc"], r["f1"], r["n_error"])
    (0.5, 0.5, 0.5, 2)
    """
    preds, labs = np.asarray(list(predictions), dtype=int), np.asarray(list(truth), dtype=int)
    point = processbench.f1(preds.tolist(), labs.tolist())
    names = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(preds))]
    if len(names) != len(preds):
        raise ValueError(f"{len(names)} groups for {len(preds)} predictions")
    low = high = math.nan
    if len(preds):
        group, draws = stats.problem_resample_weights(names, n_boot, seed)
        is_error = labs != -1
        hit = np.where(is_error, preds == labs, preds == -1).astype(float)
        sums = [np.bincount(group, weights=hit * mask) for mask in (is_error, ~is_error)]
        counts = [np.bincount(group, weights=mask.astype(float)) for mask in (is_error, ~is_error)]
        with np.errstate(invalid="ignore", divide="ignore"):
            err, cor = ((draws @ s_) / (draws @ c_) for s_, c_ in zip(sums, counts, strict=True))
            f1 = np.where(err + cor > 0, 2 * err * cor / (err + cor), 0.0)
        low, high = stats.percentile_interval(np.where(np.isnan(err) | np.isnan(cor), np.nan, f1), confidence)
    n_error = int((labs != -1).sum())
    return {**point, "f1_low": float(low), "f1_high": float(high), "n": len(labs), "n_error": n_error,
            "n_correct": len(labs) - n_error}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


def score_records(
    model: ProcessRewardModel, records: Sequence[dict[str, Any]], batch_size: int = 8
) -> list[dict[str, Any]]:
    """Score every step of ``records`` (ProcessBench dicts) with a PRM, in input order.

    Each record becomes ``{"id", "label", "n_steps", "status", "n_tags_found", "n_tokens", "step_scores"}``
    where ``status`` is the encoding status of :func:`erprm_core.prm.encode_for_prm` ("ok", "truncated",
    "tag_count_mismatch", "empty") and ``step_scores`` holds one P(good) per step, None for a step whose
    tag was not located (cut by the length limit, or not a single tag token). JSON-ready.
    """
    records = list(records)
    if not records:
        return []
    encodings = [model.encode(r["problem"], r["steps"]) for r in records]
    scores = model.score_batch([r["problem"] for r in records], [r["steps"] for r in records], batch_size)
    out = []
    for rec, enc, ss in zip(records, encodings, scores, strict=True):
        out.append(
            {
                "id": rec["id"],
                "label": int(rec["label"]),
                "n_steps": len(rec["steps"]),
                "status": enc.status,
                "n_tags_found": int(enc.n_tags_found),
                "n_tokens": len(enc.input_ids),
                "step_scores": [None if math.isnan(s) else float(s) for s in ss],
            }
        )
    return out


@dataclass(frozen=True)
class ScoringOptions:
    """How a PRM is loaded and run by :func:`evaluate` (the options of ``erprm processbench``)."""

    scoring: str = "two_token"
    """two_token (softmax over the good/bad tokens at the tag) or full_vocab"""
    max_length: int | None = None
    """token limit of a formatted solution (None: the model's); tags beyond it get no score (audited)"""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda:0", ..."""
    dtype: str = "auto"
    """"auto" (bf16 on a GPU that has it), "float32", ..."""
    share_prefix: str = "off"
    """question-prefix sharing of the scorer: off, on or auto (each question is usually scored once)"""
    batch_size: int = 8
    """solutions per forward pass"""
    shard_size: int = 100
    """records per resumable shard"""
    step_tag: str = "ки"
    """the PRM's step tag"""
    good_token: str = "+"
    """the token whose probability is the step's score"""
    bad_token: str = "-"
    """the other token of the two-token softmax"""


def local_folder(name: str) -> Path | None:
    """``name`` as a local folder, or None (a hub name)."""
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def data_folder(data: str) -> Path | None:
    """The local data folder (or file) of ``data``, None for the hub; anything else is an error."""
    if data in HUB_DATA:
        return None
    path = Path(data).expanduser()
    if not path.exists():
        raise ArtifactError(
            f"--data {data}: no such folder; pass a folder of <split>.json files or "
            f'"hub" for {processbench.HUB_NAME}'
        )
    return path


def split_prm_name(name: str) -> tuple[str, str | None]:
    """``"org/name@revision"`` -> ``("org/name", "revision")``; no ``@``: revision None.

    >>> split_prm_name("HanningZhang/Llama3.1-Math-PRM@abc123")
    ('HanningZhang/Llama3.1-Math-PRM', 'abc123')
    """
    base, sep, revision = str(name).partition("@")
    return base, (revision or None) if sep else None


def _folder_digest(folder: Path) -> str:
    """Digest of a checkpoint folder: file names and sizes, and contents up to 64 MiB (mtime above)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}|{st.st_size}|".encode())
        if st.st_size <= 64 << 20:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def prm_fingerprint(prm: str, revision: str | None) -> str:
    """What identifies a PRM's scores: its folder's digest, or its hub name and revision."""
    folder = local_folder(prm)
    if folder is not None:
        return f"folder:{_folder_digest(folder)}"
    return f"hub:{prm}@{revision or 'default'}"


def _records_digest(records: Sequence[dict[str, Any]]) -> str:
    keys = [[r["id"], r["problem"], r["steps"], r["label"]] for r in records]
    return hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode()).hexdigest()[:16]


def load_prm(prm: str, revision: str | None, opts: ScoringOptions) -> ProcessRewardModel:
    """The PRM ``prm`` (hub name or folder; ``revision``: model and tokenizer of that hub revision)."""
    share = {"off": False, "on": True, "auto": "auto"}[opts.share_prefix]
    kwargs: dict[str, Any] = {"device": opts.device, "dtype": opts.dtype, "share_prefix": share}
    if opts.max_length is not None:
        kwargs["max_length"] = opts.max_length
    if revision:
        kwargs["revision"] = revision
    tokens = (opts.step_tag, opts.good_token, opts.bad_token)
    try:
        scorer = ProcessRewardModel.from_pretrained(prm, *tokens, opts.scoring, **kwargs)
    except (FileNotFoundError, OSError, ValueError, ImportError) as exc:
        raise ArtifactError(f"--prm {prm}: cannot load the PRM ({type(exc).__name__}: {exc})") from exc
    if revision:
        scorer.name = f"{prm}@{revision}"  # the name in the tables says which revision scored
    return scorer


# ----------------------------------------------------------------------------------------------------
# A whole evaluation: splits -> resumable shards -> tables and files
# ----------------------------------------------------------------------------------------------------


def output_paths(out: Path | str) -> dict[str, Path]:
    """Every file :func:`evaluate` writes, from ``out`` (the summary CSV): summary, records, audit, sweep,
    sweep figure stem (``sweep_figure``, without suffix), info and the shard folder."""
    out = Path(out)
    stem = out.with_suffix("").name if out.suffix else out.name
    base = out.parent
    return {
        "summary": out,
        "records": base / f"{stem}_records.csv",
        "audit": base / f"{stem}_audit.csv",
        "sweep": base / f"{stem}_sweep.csv",
        "sweep_figure": base / f"{stem}_sweep",
        "info": base / f"{stem}_info.json",
        "shards": base / f"{stem}_shards",
    }


def load_splits(
    data: str,
    splits: Sequence[str],
    limit: int | None = None,
    revision: str | None = None,
    seed: int | None = None,
) -> dict[str, processbench.ProcessBenchSplit]:
    """Each split's records from ``data`` (a local folder, or "hub"); with ``limit``, ``limit`` of them: a
    sample stratified by label drawn with ``seed`` (:func:`erprm_core.processbench.stratified_sample`; what
    ``erprm processbench --limit N --seed S`` scores), or, without a seed, the first ``limit`` (which in the
    released files all have an error)."""
    folder = data_folder(data)
    loaded = {}
    for split in splits:
        one = processbench.load(split, folder, revision=revision)
        if limit is not None and seed is not None:
            one = processbench.stratified_sample(one, limit, seed)
        elif limit is not None:
            one = processbench.ProcessBenchSplit(
                split, one.records[:limit], one.source, one.sha256, one.revision
            )
        loaded[split] = one
    return loaded


def split_info(loaded: processbench.ProcessBenchSplit) -> dict[str, Any]:
    """What to record with a result: split, source, sha256, revision, record and error counts."""
    return {
        "split": loaded.split,
        "source": loaded.source,
        "sha256": loaded.sha256,
        "revision": loaded.revision,
        "n": len(loaded.records),
        "n_errors": loaded.n_errors,
    }


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the tables it wrote, the PRM's name and how many records it scored."""

    summary: pd.DataFrame
    records: pd.DataFrame
    audit: pd.DataFrame
    sweep: pd.DataFrame
    prm: str
    scored: int
    paths: dict[str, Path]


def evaluate(
    prm: str,
    data: dict[str, processbench.ProcessBenchSplit],
    out: Path | str,
    *,
    revision: str | None = None,
    threshold: float = 0.5,
    options: ScoringOptions = ScoringOptions(),
    n_boot: int = 2000,
    parameters: dict[str, Any] | None = None,
) -> Evaluation:
    """Score every split of ``data`` with the PRM ``prm`` (``revision`` for a hub name) and write the tables
    of :func:`output_paths` beside ``out``; the PRM is loaded only if a shard needs scoring.

    Shards under ``<stem>_shards/<split>/`` are reused when the PRM, the records and the scoring options
    are unchanged (a different threshold rescores nothing). ``parameters`` are recorded in the info file.
    Raises :class:`~erprm_core.io.ArtifactError` for a PRM that cannot be loaded or shards that do not hold
    the records. The figure of the sweep is drawn by the caller (the report layer is above this one).
    """
    paths = output_paths(out)
    state: dict[str, Any] = {"scored": 0}
    fp = prm_fingerprint(prm, revision)
    scored = {
        split: _score_split(prm, revision, loaded, paths, state, fp, options)
        for split, loaded in data.items()
    }
    name = state["prm"].name if "prm" in state else prm + (f"@{revision}" if revision else "")
    summary, records, audit, sweep = _tables(scored, name, threshold, options.scoring, n_boot)
    for key, df in (("summary", summary), ("records", records), ("audit", audit), ("sweep", sweep)):
        atomic_write_text(paths[key], _csv(df))
    info = {
        "prm": name,
        "prm_fingerprint": fp,
        "prm_info": state["prm"].info() if "prm" in state else None,
        # the hub commit the weights came from (a branch such as "main" resolves to one); None for a folder
        "prm_commit": getattr(state["prm"].model.config, "_commit_hash", None) if "prm" in state else None,
        "data": {split: split_info(loaded) for split, loaded in data.items()},
        "threshold": threshold,
        "options": asdict(options),
        "parameters": parameters or {},
        "records_scored_this_run": state["scored"],
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_json(paths["info"], info)
    return Evaluation(summary, records, audit, sweep, name, state["scored"], paths)


def _score_split(
    prm: str, revision: str | None, loaded: Any, paths: dict[str, Path], state: dict[str, Any], prm_fp: str,
    opts: ScoringOptions,
) -> list[dict[str, Any]]:  # fmt: skip
    """Score one split in resumable shards; the PRM is loaded on the first shard that needs it."""
    split = loaded.split
    fingerprint = {
        "split": split,
        "records": _records_digest(loaded.records),
        "n": len(loaded),
        "source_sha256": loaded.sha256,
        "prm": prm_fp,
        "scoring": opts.scoring,
        "max_length": opts.max_length,
        "tokens": [opts.step_tag, opts.good_token, opts.bad_token],
        "shard_size": opts.shard_size,
    }
    shard_folder = paths["shards"] / split
    prepare_shard_folder(shard_folder, fingerprint)

    def compute(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        if "prm" not in state:
            state["prm"] = load_prm(prm, revision, opts)
        rows = score_records(state["prm"], chunk, opts.batch_size)
        state["scored"] += len(rows)
        return [{"split": split, **r} for r in rows]

    rows = run_sharded(
        loaded.records, opts.shard_size, shard_folder, compute, SHARD_COLUMNS, f"ProcessBench {split}"
    )
    if [r["id"] for r in rows] != [r["id"] for r in loaded.records]:
        raise ArtifactError(
            f"{shard_folder}: the shards do not hold the records of {loaded.source} in order; "
            "delete the folder and rerun"
        )
    return rows


def audit_frame(split: str, rows: Sequence[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """Counts by reason for one split's scored records: encoding status, unscored steps, and records left
    out of the metric because their prediction hinges on an unscored step."""
    audit = Audit(f"processbench/{split}")
    for r in rows:
        unscored = sum(s is None for s in r["step_scores"])
        audit.count(
            r["status"],
            example=f"{r['id']}: {r['n_steps'] - unscored} of {r['n_steps']} step tags located "
            f"({r.get('n_tags_found', '?')} tag tokens in the full text), {r.get('n_tokens', '?')} tokens kept",
        )
        if unscored:
            audit.count("steps_unscored", unscored, example=f"{r['id']}: {unscored} of {r['n_steps']} steps")
        if processbench.first_error(r["step_scores"], threshold) is None:
            audit.count(
                "excluded_undetermined",
                example=f"{r['id']}: label {r['label']}, an unscored step before any step below {threshold}",
            )
    return audit.to_frame().assign(split=split)[["split", "reason", "count", "example"]]


def _csv(df: Any) -> str:
    return df.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def _tables(
    scored: dict[str, list[dict[str, Any]]], prm_name: str, threshold: float, scoring: str, n_boot: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The summary (one row per split, F1 with a bootstrap interval over records), per-record, audit and
    threshold-sweep tables."""
    summary, records, audits, sweeps = [], [], [], []
    for split, rows in scored.items():
        scores = [r["step_scores"] for r in rows]
        labels = [int(r["label"]) for r in rows]
        preds = [processbench.first_error(s, threshold) for s in scores]
        m = metrics(scores, labels, threshold)
        kept = [(p, v) for p, v in zip(preds, labels, strict=True) if p is not None]
        ci = first_error_f1([p for p, _ in kept], [v for _, v in kept], n_boot=n_boot)
        summary.append({"split": split, **m, "f1_low": ci["f1_low"], "f1_high": ci["f1_high"],
                        "prm": prm_name, "scoring": scoring})  # fmt: skip
        records.extend(
            {
                "split": split,
                "id": r["id"],
                "label": r["label"],
                "prediction": p,
                "n_steps": r["n_steps"],
                "status": r["status"],
                "n_tokens": r.get("n_tokens"),
                "step_scores": json.dumps(r["step_scores"]),
            }
            for r, p in zip(rows, preds, strict=True)
        )
        audits.append(audit_frame(split, rows, threshold))
        sweeps.extend({"split": split, **row} for row in threshold_sweep(scores, labels))
    summary_df = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    records_df = pd.DataFrame(records, columns=RECORD_COLUMNS).astype({"prediction": "Int64"})
    audit_df = pd.concat(audits, ignore_index=True)
    sweep_df = pd.DataFrame(sweeps)[SWEEP_COLUMNS]
    return summary_df, records_df, audit_df, sweep_df
