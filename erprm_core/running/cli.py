"""The ``erprm`` command line: run the study, redraw its figures, check runs, train and use PRMs.

``erprm reproduce --profile NAME [--from NN] [--to NN] [-p key=value ...]`` runs notebooks/NN_*.ipynb in
order, each with ``configs/NAME/NN_*.yaml`` plus the overrides (:mod:`erprm_core.running.pipeline`);
``--dry-run`` runs a paper profile offline with tiny models (:mod:`erprm_core.running.dryrun`). ``figures``
redraws stage 06, ``compare`` and ``golden`` check tables, ``bench`` runs the speed benchmarks, ``seeds``
retrains the PRMs with other seeds for the run-to-run variance (:mod:`erprm_core.running.seeds`).
``train-prm`` trains one PRM per label rule of a profile with 03_train_prm's parameters (also under
``accelerate launch -m erprm_core.running.cli train-prm ...``), and ``score`` scores the steps of a JSONL
file with any Math-Shepherd-format PRM. ``python -m erprm_core.running.cli`` is the same command.

The modules that load torch (the dry run, ProcessBench, PRM scoring and training) are imported by the command
that uses them, so that ``erprm reproduce`` reaches the profile's lock in a second or two: a second run of a
busy profile stops at once (exit status 75), naming the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from erprm_core import io, steps
from erprm_core.running import artifacts, bench, config, pipeline

log = logging.getLogger("erprm")

BUSY = 75  # exit status when another process runs the profile (EX_TEMPFAIL: try again later)
OFFLINE_COMMANDS = ("reproduce", "figures", "compare", "golden", "bench", "seeds")
"""Commands that run with ``HF_HUB_OFFLINE=1`` unless the environment says otherwise (``train-prm`` and
``score`` may load a hub model)."""


def run_benchmarks(names: list[str] | None = None, json_path: str | None = None, threads: int = 0,
                   quick: bool = False) -> int:  # fmt: skip
    """Measure the matmul peak, run the workload benchmarks (:mod:`erprm_core.running.bench`), print throughput,
    ratio and MFU per workload, write them to ``json_path`` if given; returns the number that failed."""
    return bench.run(names, json_path, threads=threads, quick=quick)


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
    sd = sub.add_parser("seeds", help="retrain the headline PRMs with other seeds: run-to-run variance table")
    sd.add_argument("--profile", default="tiny")
    sd.add_argument(
        "--seeds", default="1,2", help="comma list of further 03 seeds (the main run is the first)"
    )
    sd.add_argument("--rules", default="er_1,soft,hard,orm", help="03 rules retrained per seed")
    sd.add_argument("--reward-models", default="er_1,soft,hard,orm", help="05 reward models ('': skip RAFT)")
    fig = sub.add_parser("figures", help="redraw figures and the summary table from the tables (stage 06)")
    fig.add_argument("--profile", default="tiny")
    cmp = sub.add_parser(
        "compare", help="this run's results/<profile> against the committed ones (git HEAD), or against OTHER"
    )
    cmp.add_argument("--profile", default="tiny")
    cmp.add_argument(
        "other", nargs="?", help="another run's results/<profile> folder (or its tables/ folder); "
        "without it: this checkout's results against the committed results"
    )  # fmt: skip
    sub.add_parser(
        "golden", help="rerun the smoke chain in a temporary folder and rewrite the golden digests"
    )
    bn = sub.add_parser("bench", help="speed benchmarks: matmul peak, tokens/s, ratio and MFU per workload")
    bn.add_argument(
        "names", nargs="*", help="workloads to run (sampling, scoring, training; numerics if named)"
    )
    bn.add_argument("--json", dest="json_path", metavar="FILE", help="also write the figures as JSON")
    bn.add_argument("--threads", type=int, default=0, help="CPU threads (0: the stages' rule, idle cores)")
    bn.add_argument("--quick", action="store_true", help="tiny workloads (seconds; for tests)")
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
    sc.add_argument("--scoring", default="two_token", help="one of erprm_core.prm.SCORING_MODES")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default="auto")
    sc.add_argument("--step-tag", default=steps.STEP_TAG)
    sc.add_argument("--good-token", default=steps.GOOD_TOKEN)
    sc.add_argument("--bad-token", default=steps.BAD_TOKEN)
    sub.add_parser(  # its options are parsed by erprm_core.running.processbench_cmd (loaded when used)
        "processbench", help="score ProcessBench with a PRM (first wrong step, F1 per split)", add_help=False
    )
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    if args.dry_run:
        from erprm_core.running import dryrun

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


def _seeds_command(args: argparse.Namespace) -> int:
    from erprm_core.running import seeds

    c = seeds.SeedsConfig(args.profile, args.seeds, args.rules, args.reward_models)
    try:
        table = seeds.run(c)
    except ValueError as exc:  # bad --seeds, the main run's seed among them, no tables to summarise
        log.error("%s", exc)
        return 2
    spread = table[table["seed"].isin(["mean", "sd", "min", "max"])]
    print(spread.pivot(index="quantity", columns="seed", values="value")[["mean", "sd", "min", "max"]]
          .to_string(float_format=lambda v: f"{v:.3f}"))  # fmt: skip
    print(
        f"per-seed rows and intervals: {artifacts.repo_relative(artifacts.paths(c.profile).table('seed_variance'))}"
    )
    return 0


def _train_prm_command(args: argparse.Namespace) -> int:
    """Train the PRMs of 03_train_prm with the profile's parameters, so ``accelerate launch`` can train
    them on several GPUs and the notebook then evaluates the finished checkpoints."""
    from erprm_core.stages import train_prm

    (stage,) = config.plan(args.profile, "03", "03", args.param)
    stage_config = train_prm.TrainPRMConfig(**stage.parameters)
    train_prm.train(stage_config)
    log.info("trained/found the PRMs of profile %s (rules: %s)", stage_config.profile, stage_config.rules)
    return 0


def _score_command(args: argparse.Namespace) -> int:
    """Score JSONL records with ``question`` and ``steps``; write them back with ``step_scores`` and the
    PRM's scoring info."""
    from erprm_core import prm

    if args.scoring not in prm.SCORING_MODES:
        raise config.ConfigError(f"--scoring {args.scoring!r} unknown; choose one of {prm.SCORING_MODES}")
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
    """Entry point of the ``erprm`` command; returns the exit status (2: bad input, 75: the profile is being
    run by another process, 130: interrupted)."""
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command != "processbench":
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("papermill").setLevel(logging.WARNING)  # the pipeline logs each stage itself
    if args.command in OFFLINE_COMMANDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "figures":
            pipeline.run(args.profile, "06", "06", force=True)
        elif args.command == "compare":
            return pipeline.compare(args.profile, Path(args.other) if args.other else None)
        elif args.command == "golden":
            pipeline.write_golden_digests()
        elif args.command == "bench":
            return 1 if run_benchmarks(args.names, args.json_path, args.threads, args.quick) else 0
        elif args.command == "seeds":
            return _seeds_command(args)
        elif args.command == "train-prm":
            return _train_prm_command(args)
        elif args.command == "score":
            return _score_command(args)
        elif args.command == "processbench":
            from erprm_core.running import processbench_cmd

            return processbench_cmd.main(rest)
    except (config.ConfigError, pipeline.StageFailed, io.ArtifactError) as exc:
        log.error("%s", exc)
        return 2
    except pipeline.ProfileBusy as exc:
        log.error("%s", exc)
        return BUSY
    except pipeline.Interrupted as exc:
        log.error("%s", exc)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
