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

One run per profile at a time: :func:`run` holds ``runs/<profile>/.lock`` (:func:`profile_lock`); a second run
of the profile stops at once with :class:`ProfileBusy`, naming the first. While a stage runs, its kernel keeps
``runs/<profile>/progress.json`` up to date (:func:`erprm_core.io.progress`: no bars in the executed notebooks)
and :class:`StageProgress` shows it in the terminal: what the stage does, done/total and an ETA.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm.std import tqdm as std_tqdm

from erprm_core import io
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
    info["lock"] = reproducibility.lock_status(root / reproducibility.LOCK_FILE)
    info["git_commit"], info["git_dirty"] = artifacts.git_state(root)
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


def kernel_progress_env(progress_file: Path) -> dict[str, str]:
    """Environment for a stage kernel: the kit's bars report to ``progress_file`` (:func:`erprm_core.io.progress`),
    the bars of transformers, the hub, datasets and any other tqdm are off (no noise in the notebook), and so
    are widgets (:data:`erprm_core.io.INTERACTIVE_ENV`, even when started from a `make lab` terminal): the
    executed notebook holds static figures and no widget state."""
    off = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
    return {io.PROGRESS_ENV: str(progress_file), io.INTERACTIVE_ENV: "0", **dict.fromkeys(off, "1")}


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

    ``cell_timeout``: seconds one notebook cell may run (None or 0: no limit, the default). The profile's
    lock is held throughout (:func:`profile_lock`): :class:`ProfileBusy` when another process runs it.
    """
    with profile_lock(profile):
        return _run_stages(profile, start, stop, overrides, force, cell_timeout)


def _run_stages(
    profile: str, start: str | None, stop: str | None, overrides: list[str] | None, force: bool,
    cell_timeout: int | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The body of :func:`run`, under the profile's lock."""
    stages = config.plan(profile, start, stop, overrides)
    p = artifacts.paths(profile)
    p.executed_notebooks.mkdir(parents=True, exist_ok=True)
    state = _load_state(profile)
    manifest = artifacts.load_manifest(profile)
    env = environment_info()
    if env.get("lock", {}).get("differs"):
        log.warning(
            "installed packages differ from %s, with which the committed results were made; results may "
            "differ for that reason (`make setup` installs the locked versions): %s",
            env["lock"]["file"], "; ".join(env["lock"]["differs"]),
        )  # fmt: skip
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
        label = f"[{i}/{len(stages)}] {stage.name}"
        stage_start = time.time()
        wall = _execute(stage, out_nb, p.run / PROGRESS_FILE, label, previous.get(stage.name), cell_timeout)
        upstream_ran = True
        artifacts.update_manifest(
            profile,
            stage.name,
            parameters=artifacts.repo_relative(stage.parameters),
            config=str(stage.config.relative_to(artifacts.repo_root())) if stage.config else None,
            wall_s=round(wall, 1),
            digest=digest,
            git_commit=env.get("git_commit"),  # per stage: a later `erprm figures` rewrites "environment"
            git_dirty=env.get("git_dirty"),
            tables=reproducibility.digests_written_since(p.results / "tables", stage_start),
        )
        state[stage.name] = {"digest": digest, "wall_s": round(wall, 1)}
        io.atomic_write_json(_state_path(profile), state)
        log.info("[%d/%d] %s: done in %.0f s", i, len(stages), stage.name, wall)
        summary.append({"stage": stage.name, "status": "ran", "wall_s": wall})
    if profile == "tiny" and any(s["stage"] == "06_figures" and s["status"] == "ran" for s in summary):
        # imported here: matplotlib would double the time `erprm reproduce` takes to reach the profile lock
        from erprm_core.report import summary as report_summary

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


def _execute(
    stage: Stage,
    out_nb: Path,
    progress_file: Path,
    label: str,
    last_run: float | None,
    cell_timeout: int | None,
) -> float:
    """Execute one stage notebook into ``out_nb`` with papermill, its progress shown in the terminal
    (:class:`StageProgress`); returns the wall time. Raises :class:`Interrupted` on Ctrl-C and
    :class:`StageFailed` when a cell fails."""
    import papermill

    t0 = time.perf_counter()
    kernel_env = kernel_numerics_env(stage.parameters.get("cpu_numerics", "default"))
    kernel_env.update(kernel_progress_env(progress_file))
    try:
        with artifacts.environment_set(kernel_env), StageProgress(progress_file, label, last_run) as shown:
            papermill.execute_notebook(
                str(stage.notebook),
                str(out_nb),
                parameters=stage.parameters,
                kernel_name="python3",
                cwd=str(artifacts.repo_root()),
                progress_bar=shown.papermill_bar(),  # its cell count goes to the progress line
                execution_timeout=cell_timeout or None,
                # the kernel's own warnings (TCP without encryption) would break the terminal's progress line
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
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
    finally:
        _relative_notebook_paths(out_nb)
    return time.perf_counter() - t0


def _relative_notebook_paths(notebook: Path) -> None:
    """Write the paths that papermill records in an executed notebook's metadata (input and output path)
    relative to the repository root, so the committed notebooks name no machine's folders."""
    if not notebook.is_file():
        return
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    meta = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = artifacts.repo_relative(meta[key])
    io.atomic_write_text(notebook, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# One run per profile: the lock
# ----------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_HELD_LOCKS: set[Path] = set()


class ProfileBusy(RuntimeError):
    """Another process is running the profile; the message names it (pid, host, start time, command)."""


@contextmanager
def profile_lock(profile: str) -> Iterator[Path]:
    """Hold ``runs/<profile>/.lock`` while the block runs, so that one run at a time writes the profile's
    ``runs/`` and ``results/`` folders; yields the lock file.

    The lock is an advisory ``flock`` on the file, which the system releases when its process ends in any way
    (``kill -9`` too). The file names the holder (pid, host, start time, command): a second run raises
    :class:`ProfileBusy` at once with that name. A file that names a holder whose lock is free is left over
    from a run that was killed: it is taken over with a warning. A clean exit empties the file. Re-entrant
    within a process (``erprm golden`` and the dry run call :func:`run` inside their own work).
    """
    path = artifacts.paths(profile).run / LOCK_FILE
    if path in _HELD_LOCKS:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProfileBusy(_busy_message(profile, path, _lock_holder(fd, wait_s=1.0))) from None
        stale = _lock_holder(fd)
        if stale:
            log.warning(
                "%s: the run of pid %s on %s (started %s: %s) ended without releasing its lock (killed?); "
                "taking the lock over",
                path, stale.get("pid"), stale.get("host"), stale.get("started"), stale.get("command"),
            )  # fmt: skip
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _HELD_LOCKS.add(path)
        try:
            yield path
        finally:
            _HELD_LOCKS.discard(path)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(fd: int, wait_s: float = 0.0) -> dict[str, Any]:
    """The holder named in the lock file (empty if none); waits up to ``wait_s`` for a new holder to write it."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        try:
            return dict(json.loads(text))
        except (ValueError, TypeError):  # empty (released, or a new holder about to write) or not a holder
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.1)


def _busy_message(profile: str, path: Path, holder: dict[str, Any]) -> str:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command')})"
        if holder
        else "another process (it has not written its name yet)"
    )
    return (
        f"profile {profile} is already being run by {who}: it writes runs/{profile} and results/{profile}. "
        f"Wait for it to finish, or stop it (kill {holder.get('pid', '<pid>')}) and run again; lock: {path}"
    )


# ----------------------------------------------------------------------------------------------------
# Progress within a stage, in the terminal
# ----------------------------------------------------------------------------------------------------

PROGRESS_FILE = "progress.json"
LOG_EVERY_S = 60.0  # without a terminal: one plain log line per minute at most


def progress_line(
    label: str, bars: list[dict[str, Any]], elapsed: float, last_run: float | None, cell: str = ""
) -> str:
    """One line for a running stage: ``label``, the time it has run (and what the last run took), the notebook
    cell it runs (``cell``: "done/total"), then each open bar of its kernel, outermost first (``desc
    done/total unit``, and an ETA once it has a rate)."""
    fmt = std_tqdm.format_interval
    head = f"{label} running {fmt(elapsed)}" + (f" (last run {fmt(last_run)})" if last_run else "")
    parts = [head + (f", {cell} cells done" if cell else "")]
    for bar in bars:
        n, total, rate = bar.get("n") or 0, bar.get("total"), bar.get("rate")
        text = f"{bar.get('prefix') or 'working'} {n:,.0f}" + (f"/{total:,.0f}" if total else "")
        text += f" {bar.get('unit') or 'it'}"
        if total and rate and n < total:
            text += f", ETA {fmt((total - n) / rate)}"
        parts.append(text)
    return " | ".join(parts)


class StageProgress:
    """Shows a running stage's progress from the file its kernel keeps (:func:`erprm_core.io.progress`).

    A thread reads the file every ``poll_s`` seconds; papermill's cell count comes in through
    :meth:`papermill_bar`. On a terminal (``stream.isatty()``) it redraws one line
    in place (:func:`progress_line`) and clears it at the end; otherwise it logs the line every
    ``log_every_s`` seconds (none for a shorter stage), so that CI logs stay short.
    """

    def __init__(
        self, path: Path, label: str, last_run: float | None = None, stream: TextIO | None = None,
        poll_s: float = 0.5, log_every_s: float = LOG_EVERY_S,
    ):  # fmt: skip
        self.path, self.label, self.last_run = Path(path), label, last_run
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.poll_s, self.log_every_s = poll_s, log_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stage-progress", daemon=True)
        self._start = self._logged_at = time.monotonic()
        self._last_line = self.cell = ""

    def papermill_bar(self) -> dict[str, Any]:
        """papermill's ``progress_bar`` options: its bar writes the cells done ("5/23") to :meth:`write`."""
        return {"file": self, "bar_format": "{n}/{total}", "disable": False, "mininterval": 0, "ascii": True}

    def write(self, text: str) -> None:
        """Keep the cell count that papermill's bar writes."""
        if text.strip():
            self.cell = text.strip()

    def flush(self) -> None:
        """Nothing to flush (papermill's bar calls it)."""

    def __enter__(self) -> StageProgress:
        self.path.unlink(missing_ok=True)  # a previous stage's bars
        self._start = self._logged_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty and self._last_line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.tick()

    def bars(self) -> list[dict[str, Any]]:
        """The open bars in the progress file (none while it is missing or being replaced)."""
        try:
            bars = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return bars if isinstance(bars, list) else []

    def tick(self, now: float | None = None) -> str:
        """Read the file and show the line (see the class docstring); returns it."""
        now = time.monotonic() if now is None else now
        line = progress_line(self.label, self.bars(), now - self._start, self.last_run, self.cell)
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:width] + "\x1b[K")
            self.stream.flush()
        elif now - self._logged_at >= self.log_every_s:
            log.info("%s", line)
            self._logged_at = now
        self._last_line = line
        return line


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the stage, the cell and the executed notebook."""


class Interrupted(RuntimeError):
    """Ctrl-C during a stage; the message says how to resume."""


def _resume_hint(stage: str, elapsed: float) -> str:
    return (
        f"interrupted during stage {stage} after {elapsed:.0f} s; run the same command again to resume: "
        f"finished stages are skipped and {stage} reuses its finished shards and checkpoints"
    )


def compare(profile: str, other: Path | None = None) -> int:
    """Compare two runs' tables and print a one-line verdict; 0 when every table is identical, else 1.

    With ``other``: the committed-style ``results/<profile>`` (A) against the results folder ``other`` (B).
    Without: the committed results (git ``HEAD``, A) against this checkout's ``results/<profile>`` (B), the
    run ``erprm reproduce`` just wrote. When they differ, the verdict names the first stage whose tables
    differ and the manifest fields (CPU, packages, threads, pins) that differ between the two runs.
    """
    import tempfile

    mine = artifacts.paths(profile).results
    with tempfile.TemporaryDirectory(prefix="erprm-compare-") as tmp:
        if other is None:
            a, b = reproducibility.committed_results(mine, Path(tmp)), mine
        else:
            a = mine
            candidates = (other, other / profile, other.parent if other.name == "tables" else other)
            b = next((d for d in candidates if (d / "tables").is_dir()), None)
            if b is None:
                raise ConfigError(f"compare: {other} is not a results folder (no tables/ inside)")
        frame = reproducibility.comparison_frame(reproducibility.compare_tables(a / "tables", b / "tables"))
        manifests = [
            json.loads(m.read_text()) if m.is_file() else {}
            for m in (a / "manifest.json", b / "manifest.json")
        ]
    label_a = "committed results (git HEAD)" if other is None else str(mine)
    print(f"A: {label_a}\nB: {b}")
    print(frame.to_string(index=False))
    differing = set(frame.loc[frame["status"] != "identical", "table"])
    if not differing:
        print(f"REPRODUCED: all {len(frame)} tables of B are identical to A")
        return 0
    print(f"NOT REPRODUCED: {len(differing)} of {len(frame)} tables differ")
    first = reproducibility.first_differing_stage(manifests[1], differing)
    if first:
        print(f"first stage whose tables differ: {first[0]} ({', '.join(first[1])})")
    if "rows_outside_interval" in frame:
        outside = frame["rows_outside_interval"].dropna().sum()
        print(f"{int(outside)} row(s) of B lie outside A's 95% interval (tables with value, ci_low, ci_high)")
    fields = reproducibility.manifest_differences(*manifests)
    print("manifest fields that differ (A -> B):" + "".join(f"\n  {line}" for line in fields) if fields
          else "the manifests record the same CPU, packages, threads and pins")  # fmt: skip
    return 1


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
