"""Run a profile's stages in one process (no notebook kernels) and check their tables against the golden digests.

The stage notebooks call one ``run(config)`` each; this driver calls the same functions with the profile's
parameters, so the whole chain runs inside ONE process. That makes it possible to run it under QEMU's
user-mode emulator, which shows the libraries another CPU (vendor, family, caches) while the kit's code runs
unchanged; a notebook kernel would be a new native process and escape the emulator.

    python -m research.cross_vendor run --profile smoke --to 02_labels --out /tmp/xv
    python -m research.cross_vendor check /tmp/xv              # the tables it wrote vs tests/golden
    qemu-x86_64 -cpu Haswell-v4 .venv/bin/python -m research.cross_vendor run --profile smoke --to 02_labels \
        -p 00.train_steps=12 -p n_test=8 -p n_passk_problems=4 --out /tmp/xv-intel
    python -m research.cross_vendor check /tmp/xv-intel --against /tmp/xv-native   # the same -p, run natively

The emulator is 100-300x slower than the native machine under these pins (a smoke training step: about 2
minutes), so emulated runs take a shortened chain (``-p``) and are compared with a native run of the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

STAGE_MODULES = {
    "00_policy": ("policy", "PolicyConfig"),
    "01_rollouts": ("rollouts", "RolloutsConfig"),
    "02_labels": ("labels", "LabelsConfig"),
    "03_train_prm": ("train_prm", "TrainPRMConfig"),
    "04_best_of_n": ("best_of_n", "BestOfNConfig"),
    "05_rlhf_raft": ("raft", "RaftConfig"),
    "07_processbench": ("processbench", "ProcessBenchConfig"),
}
"""Stage notebook -> (module of erprm_core.stages, its Config class); 06 draws figures only."""


def run_chain(profile: str, stop: str, out: Path, overrides: list[str] | None = None) -> list[str]:
    """Run the stages of ``profile`` up to ``stop`` in this process with runs/ and results/ under ``out``
    (``overrides``: ``-p`` settings as ``erprm reproduce`` takes them); return the names of the stages run."""
    from erprm_core.running import artifacts, config, numerics

    stages = [s for s in config.plan(profile, None, stop, overrides) if s.name in STAGE_MODULES]
    level = stages[0].parameters.get("cpu_numerics", "default")
    numerics.configure(level)  # the pins before the first tensor operation, as erprm reproduce does
    with artifacts.redirected_roots(out / "runs", out / "results"):
        for stage in stages:
            module_name, cls_name = STAGE_MODULES[stage.name]
            module = importlib.import_module(f"erprm_core.stages.{module_name}")
            cfg_cls = getattr(module, cls_name)
            known = {f for f in cfg_cls.__dataclass_fields__}
            module.run(cfg_cls(**{k: v for k, v in stage.parameters.items() if k in known}))
            print(f"{stage.name}: done", flush=True)
    return [s.name for s in stages]


def check(out: Path, against: Path | None = None, profile: str = "smoke") -> int:
    """Compare the tables under ``out`` with those under ``against`` (another run's ``--out``) or, without
    it, with the golden digests; print each; return the number that differ."""
    from erprm_core.running import artifacts, reproducibility

    if against is None:
        reference = reproducibility.read_digests(artifacts.repo_root() / reproducibility.GOLDEN_FILE)
        label = str(reproducibility.GOLDEN_FILE)
    else:
        reference, label = (
            reproducibility.table_digests(against / "results" / profile / "tables"),
            str(against),
        )
    mine = reproducibility.table_digests(out / "results" / profile / "tables")
    moved = [name for name in mine if reference.get(name) != mine[name]]
    for name in sorted(mine):
        print(f"{'identical' if name not in moved else 'DIFFERS  '}  {name}")
    print(f"{len(mine) - len(moved)} of {len(mine)} tables identical to {label}")
    return len(moved)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``run`` a chain prefix, ``check`` its tables against the golden digests."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--profile", default="smoke")
    run.add_argument("--to", default="02_labels")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument(
        "-p", dest="overrides", action="append", default=[], help="key=value, as erprm reproduce"
    )
    chk = sub.add_parser("check")
    chk.add_argument("out", type=Path)
    chk.add_argument(
        "--against", type=Path, default=None, help="another run's --out (default: the golden digests)"
    )
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run_chain(args.profile, args.to, args.out, args.overrides)
        return
    sys.exit(1 if check(args.out, args.against) else 0)


if __name__ == "__main__":
    main()
