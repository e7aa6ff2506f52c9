"""Papermill orchestration of the stage notebooks: run a profile's stages in order, resumably.

:func:`run` executes notebooks/NN_*.ipynb in order, each with ``configs/NAME/NN_*.yaml`` plus the overrides
(resolved and checked up front by :func:`erprm_core.running.config.plan`). Executed notebooks go to
``results/NAME/notebooks/``; the manifest records merged parameters, versions, device and wall times. Each
kernel starts with the pinned CPU numerics of its ``cpu_numerics`` parameter in its environment.

Resume: a stage whose inputs (merged parameters, its notebook, the package sources) are unchanged since its
last successful run is skipped, as long as nothing upstream of it was rerun in this invocation; inside a
stage, heavy work resumes from its finished shards/checkpoints. ``force=True`` reruns everything. No notebook
cell has a time limit unless ``cell_timeout`` (seconds) sets one: 01, 04 and 05 run a whole paper-scale stage
in one cell (hours), so a default limit would stop them.
:func:`compare` and :func:`write_golden_digests` check two runs against each other and against the golden
digests. The ``erprm`` command (:mod:`erprm_core.running.cli`) calls these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from erprm_core import io
from erprm_core.report import summary as report_summary
from erprm_core.running import artifacts, config, numerics, reproducibility
from erprm_core.running.config import ConfigError, Stage

log = logging.getLogger("erprm")


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
    for name in config.PACKAGES:
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
    cell_timeout: int | None = None,
) -> list[dict[str, Any]]:
    """Run the planned stages with papermill; returns one summary dict per stage (ran or skipped).

    ``cell_timeout``: seconds one notebook cell may run (None or 0: no limit, the default).
    """
    import papermill

    stages = config.plan(profile, start, stop, overrides)
    p = artifacts.paths(profile)
    p.executed_notebooks.mkdir(parents=True, exist_ok=True)
    state = _load_state(profile)
    manifest = artifacts.load_manifest(profile)
    env = environment_info()
    manifest.update(profile=profile, environment=env)
    io.atomic_write_json(p.manifest, manifest)
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
        io.atomic_write_json(_state_path(profile), state)
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
                    execution_timeout=cell_timeout or None,
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
        io.atomic_write_json(_state_path(profile), state)
        log.info("[%d/%d] %s: done in %.0f s", i, len(stages), stage.name, wall)
        summary.append({"stage": stage.name, "status": "ran", "wall_s": wall})
    if profile == "tiny" and any(s["stage"] == "06_figures" and s["status"] == "ran" for s in summary):
        if report_summary.sync_readme(p.results / "summary.md", artifacts.repo_root() / "README.md"):
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
