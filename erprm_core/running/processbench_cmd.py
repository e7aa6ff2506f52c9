"""``erprm processbench``: score ProcessBench with a PRM and report the benchmark's F1 per split.

``erprm processbench --prm PATH_OR_NAME [--revision REV] --data DIR_OR_HUB --splits gsm8k,math,...
[--limit N [--seed S]] [--threshold T] [--batch-size B] --out FILE.csv``

``--limit N`` scores N records of each split drawn at random with seed ``--seed`` (default 0), stratified by
label: records with an error and all-correct ones in the split's proportions, at least one of each when N >= 2
(:func:`erprm_core.processbench.stratified_sample`). The released files list the erroneous records first, so
the first N would all have an error and F1 would be undefined. The command says so when it samples, and the
seed is recorded with the other options in ``<stem>_info.json`` (``parameters``).

Every record's steps are scored in the Math-Shepherd format by :class:`erprm_core.prm.ProcessRewardModel`
(on the GPU when there is one: ``--device auto``), the first step below ``--threshold`` is the prediction
(:func:`erprm_core.processbench.first_error`) and :func:`erprm_core.processbench.f1` gives the split's numbers;
the work is :func:`erprm_core.stages.processbench_eval.evaluate` (shared with stage 07_processbench).
Outputs, beside ``FILE.csv`` (``<stem>`` = FILE):

- ``FILE.csv``: one row per split: split, n, n_error, n_correct, n_excluded, error_acc, correct_acc, f1,
  f1_low, f1_high (95% bootstrap interval over records), threshold, prm, scoring (accuracies as fractions; an
  empty subset leaves its accuracy and f1 blank = NaN).
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
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from erprm_core import processbench
from erprm_core.io import ArtifactError
from erprm_core.report import figures, style
from erprm_core.stages import processbench_eval as pbe

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "build_parser", "run", "main"]


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
        "--limit", type=int, default=None,
        help="score N records of each split: a seeded sample stratified by label (errors and all-correct "
        "records in the split's proportions, at least one of each)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
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
    if args.revision and pbe.local_folder(args.prm) is not None:
        raise ArtifactError(f"--revision applies to hub names only; --prm {args.prm} is a local folder")
    if args.data_revision and pbe.data_folder(args.data) is not None:
        raise ArtifactError(f"--data-revision applies to the hub only; --data {args.data} is a local folder")
    return splits


def _options(args: argparse.Namespace) -> pbe.ScoringOptions:
    return pbe.ScoringOptions(
        scoring=args.scoring, max_length=args.max_length, device=args.device, dtype=args.dtype,
        share_prefix=args.share_prefix, batch_size=args.batch_size, shard_size=args.shard_size,
        step_tag=args.step_tag, good_token=args.good_token, bad_token=args.bad_token,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the command with parsed arguments (see the module docstring); returns the exit status 0.

    Raises :class:`~erprm_core.io.ArtifactError` for a bad option, bad data or a PRM that cannot be
    loaded (the message names the option or file).
    """
    splits = _check_args(args)
    data = pbe.load_splits(args.data, splits, args.limit, args.data_revision, seed=args.seed)
    for split, one in data.items() if args.limit is not None else ():
        print(f"{split}: {len(one)} records, {one.n_errors} with an error and {len(one) - one.n_errors} all "
              f"correct: a sample stratified by label with seed {args.seed} (--limit {args.limit}; every record "
              "when the split has no more)")  # fmt: skip
    parameters = {k: v for k, v in vars(args).items() if not callable(v)}
    res = pbe.evaluate(
        args.prm, data, args.out, revision=args.revision, threshold=args.threshold, options=_options(args),
        parameters=parameters,
    )  # fmt: skip
    short = Path(res.prm).name if pbe.local_folder(args.prm) is not None else res.prm
    fig = figures.figure_processbench_sweep(
        res.sweep, args.threshold, f"ProcessBench F1 against the threshold ({short})"
    )
    style.save_figure(fig, res.paths["sweep_figure"].parent, res.paths["sweep_figure"].name)
    plt.close(fig)
    _report(res.summary, res.audit, res.paths, res.scored)
    return 0


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
