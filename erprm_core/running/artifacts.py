"""Where every artifact of a profile lives, how stages check and resume, and the manifest.

Paths are resolved from the repository root (the folder holding pyproject.toml), never from the current
directory, because papermill runs kernels in the caller's folder and nbval in the notebook's. Two
environment variables redirect the roots (tests use them to run the pipeline in a temporary folder):
``ERPRM_RUNS_ROOT`` (heavy artifacts, default ``<repo>/runs``) and ``ERPRM_RESULTS_ROOT`` (committed
tables/figures/notebooks/manifest, default ``<repo>/results``).

Generic file I/O (atomic writes, :class:`~erprm_core.io.Audit`) is :mod:`erprm_core.io`; this module adds
JSONL files (written atomically, read with the file and line of any bad record), the profile layout, sharded
resumable work, tables, the manifest, and the one model/checkpoint :func:`fingerprint` and JSON
:func:`digest` used to notice stale work on resume. Used by every stage and by the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from erprm_core.io import ArtifactError, atomic_write_json, atomic_write_text
from erprm_core.running.workers import fork_map

log = logging.getLogger(__name__)

_IMPORTED_AT = time.monotonic()  # a stage kernel imports the package in its first cell: the stage's start

STAGES = [
    "00_policy",
    "01_rollouts",
    "02_labels",
    "03_train_prm",
    "04_best_of_n",
    "05_rlhf_raft",
    "06_figures",
]


def atomic_write_jsonl(path: Path | str, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    lines = [json.dumps(rec, ensure_ascii=False, sort_keys=True) for rec in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def iter_jsonl(path: Path | str, required: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Yield records of a JSONL file; a bad line raises :class:`ArtifactError` naming file and line.

    ``required`` lists keys every record must have (a "wrong columns" check).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); the file is corrupt"
                ) from exc
            if not isinstance(rec, dict):
                raise ArtifactError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise ArtifactError(f"{path}:{lineno}: missing column(s) {missing}; has {sorted(rec)}")
            yield rec


def read_jsonl(path: Path | str, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """All records of a JSONL file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, required))


def repo_root(start: Path | None = None) -> Path:
    """Walk up from ``start`` (default: this file) to the folder holding pyproject.toml."""
    here = (start or Path(__file__)).resolve()
    for folder in [here, *here.parents]:
        if (folder / "pyproject.toml").is_file() and (folder / "erprm_core").is_dir():
            return folder
    raise ArtifactError(f"cannot find the repository root (pyproject.toml) above {here}")


def runs_root() -> Path:
    """Root of heavy, git-ignored artifacts (``$ERPRM_RUNS_ROOT`` or ``<repo>/runs``)."""
    return Path(os.environ.get("ERPRM_RUNS_ROOT") or repo_root() / "runs")


def results_root() -> Path:
    """Root of committed results (``$ERPRM_RESULTS_ROOT`` or ``<repo>/results``)."""
    return Path(os.environ.get("ERPRM_RESULTS_ROOT") or repo_root() / "results")


def repo_relative(value: Any) -> Any:
    """``value`` with every absolute path in it (a ``Path``, or a ``str`` that is an absolute path; in dicts,
    lists and tuples too, a tuple becoming a list as in JSON) written relative to the repository root, e.g.
    ``runs/tiny/policy``.

    A path under a redirected runs or results root (``$ERPRM_RUNS_ROOT``, ``$ERPRM_RESULTS_ROOT``) is written
    relative to that root's parent, so it reads the same (``runs/<profile>/...``). Other values, hub names
    and paths outside these folders are returned unchanged (a ``Path`` as its ``str``).

    >>> repo_relative({"base_model": repo_root() / "runs" / "tiny" / "policy", "seed": 0})
    {'base_model': 'runs/tiny/policy', 'seed': 0}
    """
    if isinstance(value, Mapping):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [repo_relative(v) for v in value]  # as JSON writes both
    if not isinstance(value, Path | str) or not os.path.isabs(value):
        return str(value) if isinstance(value, Path) else value
    roots = [repo_root(), runs_root().parent, results_root().parent]
    roots = [r for root in roots for r in (root, root.resolve()) if r.parent != r]  # never "/" itself
    for path in (Path(value), Path(value).resolve()):
        for root in roots:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix() or "."
    return str(value)


@contextmanager
def environment_set(variables: dict[str, str | None]) -> Iterator[None]:
    """Set (``None``: unset) environment variables while the block runs (stage kernels inherit them), then
    restore the previous values."""
    old = {k: os.environ.get(k) for k in variables}
    try:
        for k, v in variables.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def redirected_roots(runs: Path | str, results: Path | str):
    """Point ``ERPRM_RUNS_ROOT`` / ``ERPRM_RESULTS_ROOT`` at other folders while the block runs."""
    return environment_set({"ERPRM_RUNS_ROOT": str(runs), "ERPRM_RESULTS_ROOT": str(results)})


def configs_root() -> Path:
    """``<repo>/configs``: one folder of papermill parameter files per profile."""
    return repo_root() / "configs"


def notebooks_root() -> Path:
    """``<repo>/notebooks``: the ordered stage notebooks."""
    return repo_root() / "notebooks"


@dataclass(frozen=True)
class ProfilePaths:
    """Every path a stage reads or writes for one profile; the only place paths are built."""

    profile: str

    @property
    def run(self) -> Path:
        """``runs/<profile>``: heavy artifacts."""
        return runs_root() / self.profile

    @property
    def results(self) -> Path:
        """``results/<profile>``: tables, figures, executed notebooks, manifest."""
        return results_root() / self.profile

    @property
    def tables(self) -> Path:
        """``results/<profile>/tables``: tidy CSV tables."""
        return self.results / "tables"

    @property
    def figures(self) -> Path:
        """``results/<profile>/figures``: PNG + PDF figures."""
        return self.results / "figures"

    @property
    def executed_notebooks(self) -> Path:
        """``results/<profile>/notebooks``: papermill's executed copies."""
        return self.results / "notebooks"

    @property
    def manifest(self) -> Path:
        """``results/<profile>/manifest.json``."""
        return self.results / "manifest.json"

    # --- stage artifacts (runs/<profile>/...) ---
    @property
    def problems(self) -> Path:
        """Folder of problem sets: ``<split>.jsonl`` (00_policy writes them)."""
        return self.run / "problems"

    def problem_file(self, split: str) -> Path:
        """Problems of one split (``train_sft``, ``train_prm``, ``test``, ``raft``)."""
        return self.problems / f"{split}.jsonl"

    @property
    def policy(self) -> Path:
        """The policy checkpoint (save_pretrained folder) written by 00_policy."""
        return self.run / "policy"

    @property
    def rollouts(self) -> Path:
        """Folder of rollout shards written by 01_rollouts."""
        return self.run / "rollouts"

    @property
    def rollouts_file(self) -> Path:
        """All rollouts merged (01_rollouts)."""
        return self.run / "rollouts.jsonl"

    @property
    def labels_file(self) -> Path:
        """Stepwise labels for every rule (02_labels)."""
        return self.run / "labels.jsonl"

    def prm(self, rule: str) -> Path:
        """Checkpoint folder of the PRM trained on label rule ``rule`` (03_train_prm)."""
        return self.run / "prms" / rule

    @property
    def pool(self) -> Path:
        """Folder of the best-of-N candidate pool and its scores (04_best_of_n)."""
        return self.run / "pool"

    @property
    def raft(self) -> Path:
        """Folder of RAFT iterations (05_rlhf_raft)."""
        return self.run / "raft"

    def table(self, name: str) -> Path:
        """``results/<profile>/tables/<name>.csv``."""
        return self.tables / f"{name}.csv"


def paths(profile: str) -> ProfilePaths:
    """The :class:`ProfilePaths` of a profile."""
    return ProfilePaths(profile)


def require(path: Path | str, stage: str, profile: str, what: str = "") -> Path:
    """Return ``path`` if it exists, else raise an error naming the stage (and command) that makes it."""
    path = Path(path)
    if not path.exists():
        desc = f" ({what})" if what else ""
        raise ArtifactError(
            f"missing {path}{desc}. It is produced by stage {stage}: run "
            f"`erprm reproduce --profile {profile} --from {stage[:2]} --to {stage[:2]}`"
        )
    return path


# ----------------------------------------------------------------------------------------------------
# Sharded, resumable work
# ----------------------------------------------------------------------------------------------------


def run_sharded(
    items: Sequence[Any],
    shard_size: int,
    folder: Path | str,
    compute: Callable[[Sequence[Any], int], list[dict[str, Any]]],
    required: Sequence[str] = (),
    desc: str = "shards",
    *,
    workers: int = 1,
    tallies: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Process ``items`` in shards of ``shard_size``, each written atomically to ``folder/shard-NNNNN.jsonl``.

    A shard file that already exists and reads cleanly is reused (resume); one that is corrupt is reported
    (file and line, as a warning) and recomputed. ``compute(chunk, shard_index)`` must be deterministic
    given its arguments (seed per item, not per process). Returns all records in shard order.

    With ``workers > 1`` the missing shards are computed in that many forked one-thread processes
    (:func:`erprm_core.running.workers.fork_map`; the same records). ``tallies`` are counter dicts that
    ``compute`` adds to (e.g. a sampler's ``stats``): what the workers add comes back into them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(items) + shard_size - 1) // shard_size
    present = sum((folder / f"shard-{i:05d}.jsonl").exists() for i in range(n_shards))
    if present:  # shown in the notebook (print), not only in the log: a resume should be visible
        message = f"{desc}: resuming, {present} of {n_shards} shards already in {repo_relative(folder)}\n"
        print(message, end="", flush=True)  # one write: lines of worker processes do not interleave
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for index in range(n_shards):
        shard_path = folder / f"shard-{index:05d}.jsonl"
        if shard_path.exists():
            try:
                by_shard[index] = read_jsonl(shard_path, required)
                continue
            except ArtifactError as exc:
                log.warning("recomputing corrupt shard: %s", exc)
    reused = len(by_shard)
    missing = [i for i in range(n_shards) if i not in by_shard]

    def compute_shard(index: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The shard's records, written; and what computing it added to each tally (taken back out of the
        tally here, so that the caller adds it once, whichever process ran the shard)."""
        before = [dict(t) for t in tallies]
        records = compute(items[index * shard_size : (index + 1) * shard_size], index)
        atomic_write_jsonl(folder / f"shard-{index:05d}.jsonl", records)
        deltas = [_tally_delta(b, t) for b, t in zip(before, tallies, strict=True)]
        for tally, b in zip(tallies, before, strict=True):
            tally.clear()
            tally.update(b)
        return records, deltas

    computed = fork_map(compute_shard, missing, workers, desc, "shard")
    for index, (records, deltas) in zip(missing, computed, strict=True):
        by_shard[index] = records
        for tally, delta in zip(tallies, deltas, strict=True):
            for key, value in delta.items():
                tally[key] = tally.get(key, 0) + value
    if reused:
        log.info("reused %d of %d finished shards in %s", reused, n_shards, folder)
    return [r for index in range(n_shards) for r in by_shard[index]]


def _tally_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a computation added to the numeric counters of ``after`` since ``before``."""
    numbers = {k: v for k, v in after.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: v - before.get(k, 0) for k, v in numbers.items() if v != before.get(k, 0)}


def prepare_shard_folder(folder: Path | str, fingerprint: dict[str, Any]) -> None:
    """Keep the finished work in ``folder`` only if its ``params.json`` equals ``fingerprint`` (the
    parameters, inputs and model that made it); otherwise discard the folder, with a warning that counts
    the shards lost, and start afresh with ``params.json`` = ``fingerprint``."""
    import shutil

    folder = Path(folder)
    meta = folder / "params.json"
    if folder.is_dir():
        try:
            old = json.loads(meta.read_text()) if meta.is_file() else None
        except json.JSONDecodeError:
            old = None
        if old == json.loads(json.dumps(fingerprint, default=str)):
            return
        if any(folder.iterdir()):
            log.warning(
                "%s was made with other parameters or inputs: discarding it (%d shard(s))",
                folder,
                len(shard_status(folder)),
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta, fingerprint)


def shard_status(folder: Path | str) -> list[str]:
    """Names of the shard files present in ``folder`` (sorted); used by tests and progress reports."""
    folder = Path(folder)
    return sorted(p.name for p in folder.glob("shard-*.jsonl")) if folder.is_dir() else []


# ----------------------------------------------------------------------------------------------------
# Tables, manifest, fingerprints
# ----------------------------------------------------------------------------------------------------


def write_table(df: pd.DataFrame, profile: str, name: str) -> Path:
    """Write a tidy table to ``results/<profile>/tables/<name>.csv`` atomically (stable float format)."""
    path = paths(profile).table(name)
    return atomic_write_text(path, df.to_csv(index=False, float_format="%.6g", lineterminator="\n"))


def read_table(profile: str, name: str, stage: str | None = None) -> pd.DataFrame:
    """Read ``results/<profile>/tables/<name>.csv``; a missing table names the stage that writes it."""
    path = paths(profile).table(name)
    if stage is not None:
        require(path, stage, profile, f"table {name}")
    return pd.read_csv(path)


def load_manifest(profile: str) -> dict[str, Any]:
    """The profile's manifest.json as a dict ({} when absent)."""
    path = paths(profile).manifest
    return json.loads(path.read_text()) if path.is_file() else {}


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the repository at ``root`` (default :func:`repo_root`): HEAD's hash, and whether
    anything but ``results/`` (what the pipeline writes) differs from it; ``(None, None)`` outside git."""
    root = root or repo_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--", ".", ":(exclude)results"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(dirty.strip())


def run_line(profile: str, stage: str) -> str:
    """One Markdown line saying what ran: commit, profile, this stage's wall time so far (since the kernel
    imported the package), its CPU numerics and threads, and a link to the full manifest (relative to the
    executed notebook in ``results/<profile>/notebooks/``). The closing line of every stage notebook."""
    entry = load_manifest(profile).get("stages", {}).get(stage, {})
    commit, dirty = git_state()
    numerics = entry.get("numerics") or {}
    level = numerics.get("cpu_numerics") or entry.get("cpu_numerics")
    threads = numerics.get("torch_threads") or entry.get("torch_threads")
    parts = [
        f"commit `{commit[:10]}`{' (with uncommitted changes)' if dirty else ''}"
        if commit
        else "commit unknown",
        f"profile `{profile}`",
        f"{stage} {time.monotonic() - _IMPORTED_AT:,.0f} s",
    ]
    if level:  # a stage without torch (02's label arithmetic) records none
        parts.append(f"numerics `{level}`" + (f" on {threads} threads" if threads else ""))
    return f"*Run:* {' · '.join(parts)} · full record: [manifest.json](../manifest.json)\n"


def update_manifest(profile: str, stage: str, **info: Any) -> dict[str, Any]:
    """Merge ``info`` into ``manifest["stages"][stage]`` (seeds, token counts, checksums, ...)."""
    manifest = load_manifest(profile)
    manifest.setdefault("stages", {}).setdefault(stage, {}).update(info)
    atomic_write_json(paths(profile).manifest, manifest)
    return manifest


def digest(obj: Any, n: int = 16, **dumps_kwargs: Any) -> str:
    """The first ``n`` hex digits of the sha256 of ``json.dumps(obj, sort_keys=True, **dumps_kwargs)``.

    Each caller passes the exact ``json.dumps`` options its digests were made with (``ensure_ascii=False``,
    ``default=str`` or none), because they change the bytes hashed and so which finished work is reused.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, **dumps_kwargs).encode()).hexdigest()[:n]


def fingerprint(source: Any) -> str:
    """A short digest naming a model, to notice a retrained policy or PRM between runs.

    - a folder (``str`` or ``Path``): names, sizes and the first/last MiB of every file (cheap for any model
      size, unchanged by copying, changed by retraining); a ``Path`` that is not a folder raises
      ``FileNotFoundError``;
    - any other ``str``: ``"hub:<name>"``;
    - an in-memory model (or a ``(model, tokenizer)`` tuple, or an object with ``.model``): its config and the
      sum of each weight tensor; an object without parameters: its ``name_or_path``.
    """
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir() or isinstance(source, Path):
            return _folder_fingerprint(path)
        return f"hub:{source}"
    model = source[0] if isinstance(source, tuple) else getattr(source, "model", source)
    return _model_fingerprint(model)


def _folder_fingerprint(path: Path) -> str:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} not found")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}|{size}|".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _model_fingerprint(model: Any) -> str:
    if not hasattr(model, "parameters"):
        return str(getattr(model, "name_or_path", type(model).__name__))
    import torch

    with torch.no_grad():
        sums = [float(p.detach().float().sum()) for p in model.parameters()]
    config = model.config.to_json_string() if hasattr(model, "config") else ""
    return hashlib.sha256((config + json.dumps(sums)).encode()).hexdigest()[:16]
