"""The ``erprm`` command line: run the study, redraw its figures, check runs, train and use PRMs.

``erprm reproduce --profile NAME [--from NN] [--to NN] [-p key=value ...]`` runs notebooks/NN_*.ipynb in
order, each with ``configs/NAME/NN_*.yaml`` plus the overrides (:mod:`erprm_core.running.pipeline`);
``--dry-run`` runs a paper profile offline with tiny models (:mod:`erprm_core.running.dryrun`). ``figures``
redraws stage 06, ``compare`` and ``golden`` check tables, ``bench`` runs the speed benchmarks.
``train-prm`` trains one PRM per label rule of a profile with 03_train_prm's parameters (also under
``accelerate launch -m erprm_core.running.cli train-prm ...``), and ``score`` scores the steps of a JSONL
file with any Math-Shepherd-format PRM. ``python -m erprm_core.running.cli`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from erprm_core import io, prm, steps
from erprm_core.running import artifacts, config, dryrun, pipeline, processbench_cmd
from erprm_core.stages import train_prm

log = logging.getLogger("erprm")

OFFLINE_COMMANDS = ("reproduce", "figures", "compare", "golden", "bench")
"""Commands that run with ``HF_HUB_OFFLINE=1`` unless the environment says otherwise (``train-prm`` and
``score`` may load a hub model)."""


def run_benchmarks(names: list[str] | None = None) -> int:
    """Run benchmarks/bench_*.py one after the other; returns the number that failed."""
    bench_dir = artifacts.repo_root() / "benchmarks"
    failed = 0
    for script in sorted(bench_dir.glob("bench_*.py")):
        if names and not any(n in script.stem for n in names):
            continue
        log.info("benchmark %s", script.name)
        rc = subprocess.run([sys.executable, str(script)], cwd=artifacts.repo_root()).returncode
        failed += rc != 0
    return failed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erprm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the stage notebooks of a profile in order")
    rep.add_argument("--profile", default="tiny")
    rep.add_argument("--from", dest="start", help="first stage, e.g. 02")
    rep.add_argument("--to", dest="stop", help="last stage, e.g. 04")
    rep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    rep.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    rep.add_argument(
        "--cell-timeout",
        type=int,
        default=None,
        help="seconds a notebook cell may run (default: no limit; 01, 04 and 05 run a stage in one cell)",
    )
    rep.add_argument("--check", action="store_true", help="validate configs and overrides, run nothing")
    rep.add_argument(
        "--dry-run",
        action="store_true",
        help="offline wiring check of a paper profile: tiny random-weight models, a few problems, CPU, "
        "outputs under runs/dry-run/<profile> (configs/<profile>/dry-run.yaml)",
    )
    fig = sub.add_parser("figures", help="redraw figures and the summary table from the tables (stage 06)")
    fig.add_argument("--profile", default="tiny")
    cmp = sub.add_parser("compare", help="compare another run's tables with results/<profile>/tables")
    cmp.add_argument("--profile", default="tiny")
    cmp.add_argument("other", help="the other run's results/<profile> folder (or its tables/ folder)")
    sub.add_parser(
        "golden", help="rerun the smoke chain in a temporary folder and rewrite the golden digests"
    )
    bench = sub.add_parser("bench", help="run the speed benchmarks")
    bench.add_argument("names", nargs="*")
    tr = sub.add_parser(
        "train-prm",
        help="train one PRM per label rule of a profile with 03_train_prm's parameters "
        "(configs/<profile>/03_train_prm.yaml plus -p overrides)",
    )
    tr.add_argument("--profile", required=True)
    tr.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    sc = sub.add_parser("score", help="score the steps of JSONL records with a PRM")
    sc.add_argument("--model", required=True, help="PRM hub name or folder (Math-Shepherd format)")
    sc.add_argument("--input", required=True, help="JSONL with question and steps per line")
    sc.add_argument("--output", required=True)
    sc.add_argument("--scoring", default="two_token", choices=prm.SCORING_MODES)
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default="auto")
    sc.add_argument("--step-tag", default=steps.STEP_TAG)
    sc.add_argument("--good-token", default=steps.GOOD_TOKEN)
    sc.add_argument("--bad-token", default=steps.BAD_TOKEN)
    pb = sub.add_parser("processbench", help="score ProcessBench with a PRM (first wrong step, F1 per split)")
    processbench_cmd.add_arguments(pb)
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    if args.dry_run:
        if args.check:
            for stage in dryrun.plan(args.profile, args.start, args.stop, args.param):
                print(f"{stage.name}: {json.dumps(stage.parameters, sort_keys=True)}")
            return 0
        limit = {} if args.cell_timeout is None else {"cell_timeout": args.cell_timeout}  # else the dry run's
        dryrun.run(args.profile, args.start, args.stop, args.param, **limit)
        return 0
    if args.check:
        for stage in config.plan(args.profile, args.start, args.stop, args.param):
            print(f"{stage.name}: {json.dumps(stage.parameters, sort_keys=True)}")
        return 0
    pipeline.run(
        args.profile,
        args.start,
        args.stop,
        args.param,
        force=args.force,
        cell_timeout=args.cell_timeout,
    )
    return 0


def _train_prm_command(args: argparse.Namespace) -> int:
    """Train the PRMs of 03_train_prm with the profile's parameters, so ``accelerate launch`` can train
    them on several GPUs and the notebook then evaluates the finished checkpoints."""
    (stage,) = config.plan(args.profile, "03", "03", args.param)
    stage_config = train_prm.TrainPRMConfig(**stage.parameters)
    train_prm.train(stage_config)
    log.info("trained/found the PRMs of profile %s (rules: %s)", stage_config.profile, stage_config.rules)
    return 0


def _score_command(args: argparse.Namespace) -> int:
    """Score JSONL records with ``question`` and ``steps``; write them back with ``step_scores`` and the
    PRM's scoring info."""
    records = artifacts.read_jsonl(args.input, ["question", "steps"])
    model = prm.ProcessRewardModel.from_pretrained(
        args.model, args.step_tag, args.good_token, args.bad_token, args.scoring, device=args.device
    )
    scores = model.score_batch(
        [r["question"] for r in records], [r["steps"] for r in records], args.batch_size, progress=True
    )
    info = model.info()
    artifacts.atomic_write_jsonl(
        args.output,
        [
            {**r, "step_scores": [None if math.isnan(x) else x for x in s], "prm_info": info}
            for r, s in zip(records, scores, strict=True)
        ],
    )
    log.info("scored %d solutions -> %s (%s)", len(records), args.output, dict(model.audit.counts))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erprm`` command; returns the exit status (2: bad input, 130: interrupted)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command in OFFLINE_COMMANDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "figures":
            pipeline.run(args.profile, "06", "06", force=True)
        elif args.command == "compare":
            return pipeline.compare(args.profile, Path(args.other))
        elif args.command == "golden":
            pipeline.write_golden_digests()
        elif args.command == "bench":
            return 1 if run_benchmarks(args.names) else 0
        elif args.command == "train-prm":
            return _train_prm_command(args)
        elif args.command == "score":
            return _score_command(args)
        elif args.command == "processbench":
            return processbench_cmd.run(args)
    except (config.ConfigError, pipeline.StageFailed, io.ArtifactError) as exc:
        log.error("%s", exc)
        return 2
    except pipeline.Interrupted as exc:
        log.error("%s", exc)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
