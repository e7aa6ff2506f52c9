"""Papermill orchestration of the stage notebooks and the ``erprm`` command line.

``erprm reproduce --profile NAME [--from NN] [--to NN] [-p key=value ...]`` runs notebooks/NN_*.ipynb in
order, each with ``configs/NAME/NN_*.yaml`` plus the overrides. Every parameter name is checked against the
notebook's ``parameters`` cell (papermill.inspect_notebook) before anything runs. Executed notebooks go to
``results/NAME/notebooks/``; the manifest records merged parameters, versions, device and wall times.

Resume: a stage whose inputs (merged parameters, its notebook, the package sources) are unchanged since its
last successful run is skipped, as long as nothing upstream of it was rerun in this invocation; inside a
stage, heavy work resumes from its finished shards/checkpoints. ``--force`` reruns everything.
``python -m erprm_core.pipeline`` is the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from erprm_core import artifacts, numerics, reproducibility

log = logging.getLogger("erprm")

PACKAGES = [
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "datasets",
    "numpy",
    "pandas",
    "scipy",
    "matplotlib",
    "papermill",
    "math-verify",
    "vllm",
    "deepspeed",
]


class ConfigError(ValueError):
    """A profile, config file or parameter override is invalid; the message names the file and key."""


@dataclass
class Stage:
    """One notebook of the pipeline with its resolved parameters."""

    name: str
    notebook: Path
    config: Path | None
    parameters: dict[str, Any]


def stage_notebooks() -> dict[str, Path]:
    """Map stage name (e.g. ``01_rollouts``) -> notebook path, for every notebook present."""
    root = artifacts.notebooks_root()
    return {nb.stem: nb for nb in sorted(root.glob("[0-9][0-9]_*.ipynb"))}


def profiles() -> list[str]:
    """Names of the profiles that have a folder under configs/ (configs/accelerate is not a profile)."""
    root = artifacts.configs_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "accelerate")


def notebook_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """The declared parameters of a notebook (name -> papermill's description incl. inferred type)."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value read as YAML, so 3 -> int, 0.5 -> float, true -> bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise ConfigError(f"override {text!r}: {key!r} is not a parameter name")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: Path) -> dict[str, Any]:
    """Read one flat YAML parameter file; nested values or a non-mapping are errors naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a flat mapping of parameter: value")
    for key, value in data.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{path}: parameter {key!r} must be a literal (flat files only)")
    return data


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(key: str, value: Any, declared: dict[str, Any], where: str) -> Any:
    type_name = declared.get("inferred_type_name", "None")
    allowed = _TYPES.get(type_name)
    if allowed is None:
        return value
    if type_name in ("int", "float") and isinstance(value, bool):
        raise ConfigError(f"{where}: parameter {key!r} expects {type_name}, got bool {value!r}")
    if type_name == "str" and not isinstance(value, str):
        return str(value)  # e.g. an eta grid "0,1" written without quotes
    if not isinstance(value, allowed):
        raise ConfigError(
            f"{where}: parameter {key!r} expects {type_name}, got {type(value).__name__} {value!r}"
        )
    return float(value) if type_name == "float" else value


def plan(
    profile: str, start: str | None = None, stop: str | None = None, overrides: list[str] | None = None
) -> list[Stage]:
    """Resolve the stages to run and their parameters; every error is raised before anything runs."""
    known = profiles()
    if profile not in known:
        raise ConfigError(f"unknown profile {profile!r}; configs/ has {known}")
    notebooks = stage_notebooks()
    if not notebooks:
        raise ConfigError(f"no stage notebooks found in {artifacts.notebooks_root()}")
    names = list(notebooks)
    lo = _stage_index(names, start, default=0)
    hi = _stage_index(names, stop, default=len(names) - 1)
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    parsed = [parse_override(o) for o in overrides or []]
    used: set[str] = set()
    stages = []
    for name in names[lo : hi + 1]:
        declared = notebook_parameters(notebooks[name])
        cfg_path = artifacts.configs_root() / profile / f"{name}.yaml"
        params: dict[str, Any] = {}
        if cfg_path.is_file():
            for key, value in load_config(cfg_path).items():
                if key not in declared:
                    raise ConfigError(
                        f"{cfg_path}: unknown parameter {key!r} for notebook {name} "
                        f"(it declares: {', '.join(sorted(declared))})"
                    )
                params[key] = _check_type(key, value, declared[key], str(cfg_path))
        for key, value in parsed:
            if key in declared:
                params[key] = _check_type(key, value, declared[key], f"-p {key}")
                used.add(key)
        if "profile" not in declared:
            raise ConfigError(f"notebook {notebooks[name]} has no 'profile' parameter")
        if params.get("profile", profile) != profile:
            raise ConfigError(
                f"{cfg_path}: profile: {params['profile']!r} does not match --profile {profile}"
            )
        params["profile"] = profile
        stages.append(Stage(name, notebooks[name], cfg_path if cfg_path.is_file() else None, params))
    unused = [k for k, _ in parsed if k not in used]
    if unused:
        raise ConfigError(f"override(s) {unused} match no parameter of stages {[s.name for s in stages]}")
    return stages


def _stage_index(names: list[str], prefix: str | None, default: int) -> int:
    if prefix is None:
        return default
    matches = [i for i, n in enumerate(names) if n.startswith(str(prefix))]
    if not matches:
        raise ConfigError(f"no stage starts with {prefix!r}; stages are {names}")
    return matches[0]


def source_digest(stage: Stage) -> str:
    """Hash of what decides a stage's outputs: its parameters, its notebook and the package sources."""
    h = hashlib.sha256(json.dumps(stage.parameters, sort_keys=True, default=str).encode())
    h.update(_notebook_code(stage.notebook).encode())
    for src in sorted((artifacts.repo_root() / "erprm_core").rglob("*.py")):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def _notebook_code(notebook: Path) -> str:
    nb = json.loads(notebook.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def environment_info() -> dict[str, Any]:
    """Git commit, package versions, Python, platform and device, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }
    root = artifacts.repo_root()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout
        info["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"], info["git_dirty"] = None, None
    try:
        import torch

        cuda = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"
        info["torch_threads"] = torch.get_num_threads()
        info["cpu"] = numerics.host()  # each stage records the kernel level, pins and threads it ran with
    except ImportError:
        info["device"] = "unknown"
    return info


def kernel_numerics_env(level: str) -> dict[str, str | None]:
    """Environment for a stage kernel under pin level ``level``: its pins set, every other pin unset."""
    env: dict[str, str | None] = dict.fromkeys(numerics.PIN_VARIABLES)
    env.update(numerics.pin_environment(level))
    return env


def _state_path(profile: str) -> Path:
    return artifacts.paths(profile).run / "pipeline_state.json"


def _load_state(profile: str) -> dict[str, Any]:
    path = _state_path(profile)
    return json.loads(path.read_text()) if path.is_file() else {}


def run(
    profile: str,
    start: str | None = None,
    stop: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    cell_timeout: int = 3600,
) -> list[dict[str, Any]]:
    """Run the planned stages with papermill; returns one summary dict per stage (ran or skipped)."""
    import papermill

    stages = plan(profile, start, stop, overrides)
    p = artifacts.paths(profile)
    p.executed_notebooks.mkdir(parents=True, exist_ok=True)
    state = _load_state(profile)
    manifest = artifacts.load_manifest(profile)
    env = environment_info()
    manifest.update(profile=profile, environment=env)
    artifacts.atomic_write_json(p.manifest, manifest)
    previous = {k: v.get("wall_s") for k, v in manifest.get("stages", {}).items()}
    summary = []
    upstream_ran = False
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, start=1):
        digest = source_digest(stage)
        done = state.get(stage.name, {})
        out_nb = p.executed_notebooks / stage.notebook.name
        if not force and not upstream_ran and done.get("digest") == digest and out_nb.is_file():
            log.info("[%d/%d] %s: up to date, skipped (use --force to rerun)", i, len(stages), stage.name)
            summary.append({"stage": stage.name, "status": "skipped"})
            continue
        eta = sum(previous.get(s.name) or 0 for s in stages[i - 1 :])
        log.info(
            "[%d/%d] %s: running (elapsed %.0f s%s)",
            i,
            len(stages),
            stage.name,
            time.perf_counter() - t_start,
            f", last run of the remaining stages took {eta:.0f} s" if eta else "",
        )
        state.pop(stage.name, None)
        artifacts.atomic_write_json(_state_path(profile), state)
        t0 = time.perf_counter()
        kernel_env = kernel_numerics_env(stage.parameters.get("cpu_numerics", "default"))
        try:
            with artifacts.environment_set(kernel_env):
                papermill.execute_notebook(
                    str(stage.notebook),
                    str(out_nb),
                    parameters=stage.parameters,
                    kernel_name="python3",
                    cwd=str(artifacts.repo_root()),
                    progress_bar=sys.stderr.isatty(),
                    execution_timeout=cell_timeout,
                )
        except KeyboardInterrupt:
            raise Interrupted(_resume_hint(stage.name, time.perf_counter() - t0)) from None
        except papermill.PapermillExecutionError as exc:
            if exc.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel first
                raise Interrupted(_resume_hint(stage.name, time.perf_counter() - t0)) from None
            raise StageFailed(
                f"stage {stage.name} failed in cell {exc.cell_index}: {exc.ename}: {exc.evalue}\n"
                f"see the executed notebook {out_nb}"
            ) from None
        wall = time.perf_counter() - t0
        upstream_ran = True
        artifacts.update_manifest(
            profile,
            stage.name,
            parameters=stage.parameters,
            config=str(stage.config.relative_to(artifacts.repo_root())) if stage.config else None,
            wall_s=round(wall, 1),
            digest=digest,
            git_commit=env.get("git_commit"),  # per stage: a later `erprm figures` rewrites "environment"
            git_dirty=env.get("git_dirty"),
        )
        state[stage.name] = {"digest": digest, "wall_s": round(wall, 1)}
        artifacts.atomic_write_json(_state_path(profile), state)
        log.info("[%d/%d] %s: done in %.0f s", i, len(stages), stage.name, wall)
        summary.append({"stage": stage.name, "status": "ran", "wall_s": wall})
    if profile == "tiny" and any(s["stage"] == "06_figures" and s["status"] == "ran" for s in summary):
        from erprm_core import report

        if report.sync_readme(profile):
            log.info("README.md summary table updated from %s", p.results / "summary.md")
    log.info(
        "profile %s: %d stage(s) in %.0f s; results in %s",
        profile,
        len(stages),
        time.perf_counter() - t_start,
        p.results,
    )
    return summary


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the stage, the cell and the executed notebook."""


class Interrupted(RuntimeError):
    """Ctrl-C during a stage; the message says how to resume."""


def _resume_hint(stage: str, elapsed: float) -> str:
    return (
        f"interrupted during stage {stage} after {elapsed:.0f} s; run the same command again to resume: "
        f"finished stages are skipped and {stage} reuses its finished shards and checkpoints"
    )


def compare(profile: str, other: Path) -> int:
    """Print how ``other``'s tables differ from ``results/<profile>/tables``; 0 if all are identical, else 1."""
    mine = artifacts.paths(profile).results / "tables"
    theirs = next((d for d in (other / "tables", other / profile / "tables") if d.is_dir()), other)
    if not theirs.is_dir():
        raise ConfigError(f"compare: {other} is not a results folder (no tables/ inside)")
    frame = reproducibility.comparison_frame(reproducibility.compare_tables(mine, theirs))
    print(f"{mine} (A) vs {theirs} (B)")
    print(frame.to_string(index=False))
    n_same = int((frame["status"] == "identical").sum())
    print(f"{n_same} of {len(frame)} tables identical")
    if "rows_outside_interval" in frame:
        outside = frame["rows_outside_interval"].dropna().sum()
        print(f"{int(outside)} row(s) of B lie outside A's 95% interval (tables with value, ci_low, ci_high)")
    return 0 if n_same == len(frame) else 1


def write_golden_digests() -> Path:
    """Run the smoke chain in a temporary folder and write its table digests to the golden file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="erprm-golden-") as tmp:
        with artifacts.redirected_roots(Path(tmp) / "runs", Path(tmp) / "results"):
            run("smoke", force=True)
            digests = reproducibility.table_digests(artifacts.paths("smoke").results / "tables")
    path = artifacts.repo_root() / reproducibility.GOLDEN_FILE
    reproducibility.write_digests(digests, path)
    log.info("wrote %d table digests to %s", len(digests), path)
    return path


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erprm`` command."""
    parser = argparse.ArgumentParser(prog="erprm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the stage notebooks of a profile in order")
    rep.add_argument("--profile", default="tiny")
    rep.add_argument("--from", dest="start", help="first stage, e.g. 02")
    rep.add_argument("--to", dest="stop", help="last stage, e.g. 04")
    rep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    rep.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    rep.add_argument("--cell-timeout", type=int, default=3600, help="seconds per notebook cell")
    rep.add_argument("--check", action="store_true", help="validate configs and overrides, run nothing")
    rep.add_argument(  # dry run: erprm_core/dryrun.py
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "reproduce":
            if args.dry_run:  # --- dry run (erprm_core/dryrun.py) ---
                from erprm_core import dryrun

                if args.check:
                    for stage in dryrun.plan(args.profile, args.start, args.stop, args.param):
                        print(f"{stage.name}: {json.dumps(stage.parameters, sort_keys=True)}")
                    return 0
                dryrun.run(args.profile, args.start, args.stop, args.param, cell_timeout=args.cell_timeout)
                return 0
            if args.check:
                for stage in plan(args.profile, args.start, args.stop, args.param):
                    print(f"{stage.name}: {json.dumps(stage.parameters, sort_keys=True)}")
                return 0
            run(
                args.profile,
                args.start,
                args.stop,
                args.param,
                force=args.force,
                cell_timeout=args.cell_timeout,
            )
        elif args.command == "figures":
            run(args.profile, "06", "06", force=True)
        elif args.command == "compare":
            return compare(args.profile, Path(args.other))
        elif args.command == "golden":
            write_golden_digests()
        elif args.command == "bench":
            return 1 if run_benchmarks(args.names) else 0
    except (ConfigError, StageFailed, artifacts.ArtifactError) as exc:
        log.error("%s", exc)
        return 2
    except Interrupted as exc:
        log.error("%s", exc)
        return 130
    return 0


if __name__ == "__main__":
    # Import the installed module rather than running this copy as __main__, so that exception classes
    # raised by other modules (which import erprm_core.pipeline) are the ones main() catches.
    from erprm_core.pipeline import main as _main

    sys.exit(_main())
