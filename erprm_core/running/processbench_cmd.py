"""``erprm processbench``: score ProcessBench with a PRM and report the benchmark's F1 per split.

``erprm processbench --prm PATH_OR_NAME [--revision REV] --data DIR_OR_HUB --splits gsm8k,math,...
[--limit N] [--threshold T] [--batch-size B] --out FILE.csv``

Every record's steps are scored in the Math-Shepherd format by :class:`erprm_core.prm.ProcessRewardModel`
(on the GPU when there is one: ``--device auto``), the first step below ``--threshold`` is the prediction
(:func:`predict`) and :func:`erprm_core.processbench.f1` gives the split's numbers.
Outputs, beside ``FILE.csv`` (``<stem>`` = FILE):

- ``FILE.csv``: one row per split: split, n, n_error, n_correct, n_excluded, error_acc, correct_acc, f1,
  threshold, prm, scoring (accuracies as fractions; an empty subset leaves its accuracy and f1 blank = NaN).
- ``<stem>_records.csv``: one row per record: split, id, label, prediction, n_steps, status, n_tokens and the
  step scores as a JSON list (null = a step whose tag was not located).
- ``<stem>_audit.csv``: per split and reason, how many records were encoded "ok", "truncated" (tags cut by
  the length limit), "tag_count_mismatch" or "empty", how many steps got no score (``steps_unscored``) and
  how many records had to be left out of the metric because their prediction depends on an unscored step
  (``excluded_undetermined``). Anything other than "ok" is also printed. Nothing is dropped silently.
- ``<stem>_sweep.csv`` and ``<stem>_sweep.png`` / ``.pdf``: the metrics at thresholds 0.05, 0.10, ..., 0.95.
- ``<stem>_info.json``: the PRM, data sources and sha256s, parameters and counts.
- ``<stem>_shards/<split>/``: the step scores, in shards written atomically; a rerun with the same PRM, data
  and scoring parameters reuses them (resume, no rescoring; the threshold is not part of the scores, so
  changing it rescores nothing). Other parameters discard the folder (with a warning).

Steps are passed to the PRM verbatim; every question is usually scored once, so the question-prefix sharing
of the scorer is off unless ``--share-prefix on``. ``python -m erprm_core.running.processbench_cmd`` is the same
command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from erprm_core import processbench
from erprm_core.io import ArtifactError, Audit, atomic_write_json, atomic_write_text
from erprm_core.prm import ProcessRewardModel
from erprm_core.report import figures, style
from erprm_core.running.artifacts import prepare_shard_folder, run_sharded

log = logging.getLogger(__name__)

HUB_DATA = ("hub", processbench.HUB_NAME)
SHARD_COLUMNS = ("id", "label", "n_steps", "status", "step_scores")
SUMMARY_COLUMNS = [
    "split", "n", "n_error", "n_correct", "n_excluded", "error_acc", "correct_acc", "f1", "threshold",
    "prm", "scoring",
]  # fmt: skip
RECORD_COLUMNS = ["split", "id", "label", "prediction", "n_steps", "status", "n_tokens", "step_scores"]
# The threshold grid of the sweep: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))

__all__ = [
    "DEFAULT_THRESHOLDS", "predict", "metrics", "threshold_sweep", "score_records",
    "add_arguments", "build_parser", "output_paths", "run", "main",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Prediction, metrics and scoring
# ----------------------------------------------------------------------------------------------------


def predict(step_scores: Sequence[float | None], threshold: float = 0.5) -> int | None:
    """:func:`erprm_core.processbench.first_error` of a solution whose later steps may be unscored (NaN or
    None, e.g. a tag cut by the PRM's length limit): the first step below ``threshold`` if it comes before
    the first unscored step, -1 if every step is scored and none is below, None when the answer depends on
    an unscored step.

    >>> predict([0.9, 0.1, float("nan")])
    1
    >>> predict([0.9, float("nan"), 0.1]) is None
    True
    """
    threshold = processbench.check_threshold(threshold)
    for i, score in enumerate(step_scores):
        if processbench.is_missing(score):
            return None
        if float(score) < threshold:
            return i
    return -1


def metrics(
    step_scores: Sequence[Sequence[float | None]], labels: Sequence[int], threshold: float = 0.5
) -> dict[str, Any]:
    """The split's numbers at one threshold: :func:`~erprm_core.processbench.f1` of the :func:`predict`
    predictions, plus counts.

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
    preds = [predict(s, threshold) for s in step_scores]
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


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the command's options on ``parser`` (an ``erprm`` subparser or a fresh parser)."""
    parser.add_argument(
        "--prm", required=True, help="PRM hub name or save_pretrained folder (Math-Shepherd format)"
    )
    parser.add_argument("--revision", default=None, help="hub revision of --prm (branch, tag or commit)")
    parser.add_argument(
        "--data",
        default="hub",
        help='folder of <split>.json files (e.g. ../shared/data/processbench), or "hub" / '
        f'"{processbench.HUB_NAME}" for the hub copy (default: hub)',
    )
    parser.add_argument("--data-revision", default=None, help="hub revision of the data set (hub only)")
    parser.add_argument(
        "--splits", default=",".join(processbench.SPLITS), help="comma list (default: all four splits)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="score only the first N records of each split"
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="a step below it is an error (default 0.5)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="solutions per forward pass")
    parser.add_argument("--shard-size", type=int, default=100, help="records per resumable shard")
    parser.add_argument("--out", required=True, help="summary CSV; the other outputs are written beside it")
    parser.add_argument("--scoring", default="two_token", choices=("two_token", "full_vocab"))
    parser.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's)")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when available), "cpu", "cuda:0", ...')
    parser.add_argument("--dtype", default="auto", help='"auto" (bf16 on a GPU that has it), "float32", ...')
    parser.add_argument("--share-prefix", default="off", choices=("off", "on", "auto"))
    parser.add_argument("--step-tag", default="ки")
    parser.add_argument("--good-token", default="+")
    parser.add_argument("--bad-token", default="-")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m erprm_core.running.processbench_cmd``."""
    parser = argparse.ArgumentParser(
        prog="erprm processbench", description="Score ProcessBench with a PRM: first-error F1 per split."
    )
    return add_arguments(parser)


def _check_args(args: argparse.Namespace) -> list[str]:
    """Validate the options; return the split list. Raises ArtifactError naming the option."""
    splits = [s.strip() for s in str(args.splits).split(",") if s.strip()]
    if not splits:
        raise ArtifactError(f"--splits: no split named in {args.splits!r}")
    if len(set(splits)) != len(splits):
        raise ArtifactError(f"--splits: a split is named twice in {args.splits!r}")
    if not math.isfinite(args.threshold):
        raise ArtifactError(f"--threshold must be a finite number, got {args.threshold}")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ArtifactError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 0:
        raise ArtifactError(f"--limit must be >= 0, got {args.limit}")
    if args.max_length is not None and args.max_length < 2:
        raise ArtifactError(f"--max-length must be >= 2, got {args.max_length}")
    if args.revision and _local_folder(args.prm) is not None:
        raise ArtifactError(f"--revision applies to hub names only; --prm {args.prm} is a local folder")
    if args.data_revision and _data_folder(args.data) is not None:
        raise ArtifactError(f"--data-revision applies to the hub only; --data {args.data} is a local folder")
    return splits


def output_paths(out: Path | str) -> dict[str, Path]:
    """Every file the command writes, from ``--out``: summary, records, audit, sweep, sweep figure stem
    (``sweep_figure``, without suffix), info and the shard folder."""
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


# ----------------------------------------------------------------------------------------------------
# Inputs: data, model, fingerprints
# ----------------------------------------------------------------------------------------------------


def _local_folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _data_folder(data: str) -> Path | None:
    """The local data folder (or file) of ``--data``, None for the hub; anything else is an error."""
    if data in HUB_DATA:
        return None
    path = Path(data).expanduser()
    if not path.exists():
        raise ArtifactError(
            f"--data {data}: no such folder; pass a folder of <split>.json files or "
            f'"hub" for {processbench.HUB_NAME}'
        )
    return path


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


def _prm_fingerprint(prm: str, revision: str | None) -> str:
    folder = _local_folder(prm)
    if folder is not None:
        return f"folder:{_folder_digest(folder)}"
    return f"hub:{prm}@{revision or 'default'}"


def _records_digest(records: Sequence[dict[str, Any]]) -> str:
    keys = [[r["id"], r["problem"], r["steps"], r["label"]] for r in records]
    return hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode()).hexdigest()[:16]


def _load_prm(args: argparse.Namespace) -> Any:
    """The PRM of ``--prm`` (``--revision``: model and tokenizer of that hub revision)."""
    share = {"off": False, "on": True, "auto": "auto"}[args.share_prefix]
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "share_prefix": share}
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    if args.revision:
        kwargs["revision"] = args.revision
    tokens = (args.step_tag, args.good_token, args.bad_token)
    try:
        scorer = ProcessRewardModel.from_pretrained(args.prm, *tokens, args.scoring, **kwargs)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ArtifactError(f"--prm {args.prm}: cannot load the PRM ({type(exc).__name__}: {exc})") from exc
    if args.revision:
        scorer.name = f"{args.prm}@{args.revision}"  # the name in the tables says which revision scored
    return scorer


# ----------------------------------------------------------------------------------------------------
# Tables and the figure
# ----------------------------------------------------------------------------------------------------


def _audit_frame(split: str, rows: Sequence[dict[str, Any]], threshold: float) -> Any:
    """Counts by reason for one split (see the module docstring)."""
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
        if predict(r["step_scores"], threshold) is None:
            audit.count(
                "excluded_undetermined",
                example=f"{r['id']}: label {r['label']}, an unscored step before any step below {threshold}",
            )
    return audit.to_frame().assign(split=split)[["split", "reason", "count", "example"]]


def _csv(df: Any) -> str:
    return df.to_csv(index=False, float_format="%.6g", lineterminator="\n")


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the command with parsed arguments (see the module docstring); returns the exit status 0.

    Raises :class:`~erprm_core.io.ArtifactError` for a bad option, bad data or a PRM that cannot be
    loaded (the message names the option or file).
    """
    splits = _check_args(args)
    paths = output_paths(args.out)
    data = _load_splits(args, splits)
    state: dict[str, Any] = {"scored": 0}
    prm_fp = _prm_fingerprint(args.prm, args.revision)
    scored = {split: _score_split(args, loaded, paths, state, prm_fp) for split, loaded in data.items()}
    prm_name = (
        state["prm"].name if "prm" in state else args.prm + (f"@{args.revision}" if args.revision else "")
    )
    summary_df, records_df, audit_df, sweep_df = _tables(args, scored, prm_name)
    atomic_write_text(paths["summary"], _csv(summary_df))
    atomic_write_text(paths["records"], _csv(records_df))
    atomic_write_text(paths["audit"], _csv(audit_df))
    atomic_write_text(paths["sweep"], _csv(sweep_df))
    info = {
        "prm": prm_name,
        "prm_fingerprint": prm_fp,
        "prm_info": state["prm"].info() if "prm" in state else None,
        "data": {split: {**_split_info(loaded), "limit": args.limit} for split, loaded in data.items()},
        "parameters": {k: v for k, v in vars(args).items() if not callable(v)},
        "records_scored_this_run": state["scored"],
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_json(paths["info"], info)
    short = Path(prm_name).name if _local_folder(args.prm) is not None else prm_name
    fig = figures.figure_processbench_sweep(
        sweep_df, args.threshold, f"ProcessBench F1 against the threshold ({short})"
    )
    style.save_figure(fig, paths["sweep_figure"].parent, paths["sweep_figure"].name)
    plt.close(fig)
    _report(summary_df, audit_df, paths, state["scored"])
    return 0


def _split_info(loaded: processbench.ProcessBenchSplit) -> dict[str, Any]:
    """What to record with a result: split, source, sha256, revision, record and error counts."""
    return {
        "split": loaded.split,
        "source": loaded.source,
        "sha256": loaded.sha256,
        "revision": loaded.revision,
        "n": len(loaded.records),
        "n_errors": loaded.n_errors,
    }


def _load_splits(args: argparse.Namespace, splits: Sequence[str]) -> dict[str, Any]:
    """Each split's records from ``--data`` (first ``--limit`` of them)."""
    folder = _data_folder(args.data)
    data = {}
    for split in splits:
        loaded = processbench.load(split, folder, revision=args.data_revision)
        if args.limit is not None:
            loaded = processbench.ProcessBenchSplit(
                split, loaded.records[: args.limit], loaded.source, loaded.sha256, loaded.revision
            )
        data[split] = loaded
    return data


def _score_split(
    args: argparse.Namespace, loaded: Any, paths: dict[str, Path], state: dict[str, Any], prm_fp: str
) -> list[dict[str, Any]]:
    """Score one split in resumable shards; the PRM is loaded on the first shard that needs it."""
    split = loaded.split
    fingerprint = {
        "split": split,
        "records": _records_digest(loaded.records),
        "n": len(loaded),
        "source_sha256": loaded.sha256,
        "prm": prm_fp,
        "scoring": args.scoring,
        "max_length": args.max_length,
        "tokens": [args.step_tag, args.good_token, args.bad_token],
        "shard_size": args.shard_size,
    }
    shard_folder = paths["shards"] / split
    prepare_shard_folder(shard_folder, fingerprint)

    def compute(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        if "prm" not in state:
            state["prm"] = _load_prm(args)
        rows = score_records(state["prm"], chunk, args.batch_size)
        state["scored"] += len(rows)
        return [{"split": split, **r} for r in rows]

    rows = run_sharded(
        loaded.records, args.shard_size, shard_folder, compute, SHARD_COLUMNS, f"ProcessBench {split}"
    )
    if [r["id"] for r in rows] != [r["id"] for r in loaded.records]:
        raise ArtifactError(
            f"{shard_folder}: the shards do not hold the records of {loaded.source} in order; "
            "delete the folder and rerun"
        )
    return rows


def _tables(
    args: argparse.Namespace, scored: dict[str, list[dict[str, Any]]], prm_name: str
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The summary (one row per split), per-record, audit and threshold-sweep tables."""
    summary, records, audits, sweeps = [], [], [], []
    for split, rows in scored.items():
        scores = [r["step_scores"] for r in rows]
        labels = [int(r["label"]) for r in rows]
        m = metrics(scores, labels, args.threshold)
        summary.append({"split": split, **m, "prm": prm_name, "scoring": args.scoring})
        records.extend(
            {
                "split": split,
                "id": r["id"],
                "label": r["label"],
                "prediction": predict(r["step_scores"], args.threshold),
                "n_steps": r["n_steps"],
                "status": r["status"],
                "n_tokens": r.get("n_tokens"),
                "step_scores": json.dumps(r["step_scores"]),
            }
            for r in rows
        )
        audits.append(_audit_frame(split, rows, args.threshold))
        sweeps.extend({"split": split, **row} for row in threshold_sweep(scores, labels))
    summary_df = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    records_df = pd.DataFrame(records, columns=RECORD_COLUMNS).astype({"prediction": "Int64"})
    audit_df = pd.concat(audits, ignore_index=True)
    sweep_df = pd.DataFrame(sweeps)[
        ["split", "threshold", "n", "n_excluded", "error_acc", "correct_acc", "f1"]
    ]
    return summary_df, records_df, audit_df, sweep_df


def _report(summary: Any, audit: Any, paths: dict[str, Path], n_scored: int) -> None:
    """Print the results, the audit (every reason other than "ok") and where the files are."""
    print(summary.drop(columns=["prm"]).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if len(summary) > 1:
        print(f"mean F1 over {len(summary)} splits: {summary['f1'].mean(skipna=False):.4f}")
    issues = audit[audit["reason"] != "ok"]
    if len(issues):
        print("audit (records not fully scored are counted here, never dropped):")
        print(issues.to_string(index=False))
    else:
        print(f"audit: every step tag of all {int(audit['count'].sum())} records located and scored")
    print(f"scored {n_scored} record(s) in this run; wrote {paths['summary']} and the files beside it")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default: the command line) and :func:`run`; returns the exit status
    (0; 2 with the message logged for a bad option, bad data or a PRM that cannot be loaded)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except ArtifactError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
