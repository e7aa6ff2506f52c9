"""Do two runs agree? Table digests for the golden check, and a table-by-table comparison of two results.

With pinned CPU numerics (:mod:`erprm_core.running.numerics`) the CPU profiles give the same bits on every
x86-64 machine, so their tables can be checked byte for byte:

- the golden check: ``tests/golden/smoke_tables.sha256`` holds the sha256 of every table of the smoke chain
  (``sha256sum`` format). ``make test`` reruns the smoke chain and fails naming each table that moved.
  A change that is meant to change results regenerates the file with ``make golden``.
- ``erprm compare --profile tiny OTHER``: compares the committed ``results/tiny/tables`` with another run's
  tables: identical, or where they differ, by how much, against the 95% intervals in the tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GOLDEN_FILE = Path("tests") / "golden" / "smoke_tables.sha256"
"""The committed digests of the smoke chain's tables, relative to the repository root."""

LOCK_FILE = Path("requirements-lock.txt")
"""Exact versions of every package of the CPU profiles' environment (``make setup`` installs them), relative
to the repository root. A later release of transformers or accelerate may move bits, so results name it."""


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of a lock file (``name==version`` lines; comments and blanks skipped). Names are
    normalised (PEP 503: lower case, runs of ``-_.`` as ``-``); a line of another form is an error."""
    pins = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, ver = line.partition("==")
        if not sep or not name.strip() or not ver.strip():
            raise ValueError(f"{path}:{lineno}: expected 'package==version', got {raw!r}")
        pins[_normalise(name)] = ver.strip()
    return pins


def _normalise(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def lock_status(path: Path) -> dict[str, object]:
    """The lock file's sha256 and the packages whose installed version differs from it (``name: installed
    (lock X)``; a local build label such as ``+cpu`` does not count). Empty ``differs``: the environment is
    the locked one. A missing lock file gives ``{"file": None}``."""
    from importlib.metadata import PackageNotFoundError, version

    if not path.is_file():
        return {"file": None}
    differs = []
    for name, locked in sorted(read_lock(path).items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed.split("+", 1)[0] != locked.split("+", 1)[0]:
            differs.append(f"{name} {installed} (lock {locked})")
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "differs": differs}


def table_digests(tables: Path) -> dict[str, str]:
    """sha256 of every ``*.csv`` in the folder ``tables``, by file name (sorted)."""
    if not tables.is_dir():
        raise FileNotFoundError(f"tables folder {tables} not found")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tables.glob("*.csv"))}


def digests_written_since(tables: Path, since: float) -> dict[str, str]:
    """sha256 of the tables in ``tables`` written at or after the time ``since`` (a stage's own tables, for
    the manifest: :func:`first_differing_stage` finds where two runs part)."""
    if not tables.is_dir():
        return {}
    return {n: h for n, h in table_digests(tables).items() if (tables / n).stat().st_mtime >= since}


def write_digests(digests: dict[str, str], path: Path) -> None:
    """Write ``digests`` in ``sha256sum`` format (``<hex>  <name>`` per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h}  {name}\n" for name, h in sorted(digests.items())))


def read_digests(path: Path) -> dict[str, str]:
    """Read a ``sha256sum``-format file; a malformed line is an error naming the file and line."""
    digests = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{lineno}: expected '<sha256>  <table>.csv', got {line!r}")
        digests[parts[1]] = parts[0]
    return digests


def digest_mismatches(expected: dict[str, str], actual: dict[str, str]) -> dict[str, list[str]]:
    """Tables whose digest ``moved``, that are ``missing`` from ``actual``, or ``new`` in it."""
    return {
        "moved": sorted(n for n in expected.keys() & actual.keys() if expected[n] != actual[n]),
        "missing": sorted(expected.keys() - actual.keys()),
        "new": sorted(actual.keys() - expected.keys()),
    }


@dataclass
class TableDifference:
    """How one table of run B differs from the same table of run A."""

    table: str
    """File name of the table."""
    status: str
    """``identical`` (same bytes), ``same values`` (same parsed values), ``differs``, ``missing`` or ``new``."""
    rows: int = 0
    """Rows of the table in run A."""
    cells_differing: int = 0
    """Cells (numeric or not) that differ between the two runs, after aligning rows by position."""
    max_abs_diff: float = 0.0
    """Largest absolute difference of a numeric cell."""
    rows_outside_interval: int | None = None
    """For tables with ``value``, ``ci_low``, ``ci_high``: rows whose B value lies outside A's interval."""


def compare_tables(a: Path, b: Path) -> list[TableDifference]:
    """Compare every ``*.csv`` of the folders ``a`` and ``b`` (rows aligned by position)."""
    names = sorted({p.name for p in a.glob("*.csv")} | {p.name for p in b.glob("*.csv")})
    return [_compare_one(a / name, b / name) for name in names]


def _compare_one(pa: Path, pb: Path) -> TableDifference:
    if not pb.is_file():
        return TableDifference(pa.name, "missing")
    if not pa.is_file():
        return TableDifference(pb.name, "new")
    if pa.read_bytes() == pb.read_bytes():
        return TableDifference(pa.name, "identical", rows=_count_rows(pa))
    da, db = pd.read_csv(pa), pd.read_csv(pb)
    if list(da.columns) != list(db.columns) or len(da) != len(db):
        return TableDifference(pa.name, "differs", rows=len(da), cells_differing=max(da.size, db.size))
    differing, max_abs = 0, 0.0
    for col in da.columns:
        x, y = da[col], db[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            xv, yv = x.to_numpy(float), y.to_numpy(float)
            same = (xv == yv) | (np.isnan(xv) & np.isnan(yv))
            if (~same).any():
                max_abs = max(max_abs, float(np.nanmax(np.abs(xv - yv)[~same], initial=0.0)))
        else:
            same = (x.astype(str) == y.astype(str)).to_numpy()
        differing += int((~same).sum())
    outside = None
    if {"value", "ci_low", "ci_high"} <= set(da.columns):
        outside = int(((db["value"] < da["ci_low"] - 1e-12) | (db["value"] > da["ci_high"] + 1e-12)).sum())
    status = "differs" if differing else "same values"
    return TableDifference(pa.name, status, len(da), differing, max_abs, outside)


def _count_rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1)


def comparison_frame(differences: list[TableDifference]) -> pd.DataFrame:
    """The comparison as a table, one row per table file."""
    return pd.DataFrame([vars(d) for d in differences])


MANIFEST_FIELDS = {
    "CPU": ("environment", "cpu", "cpu_model"),
    "CPU flags": ("environment", "cpu", "cpu_flags"),
    "MKL": ("environment", "cpu", "blas"),
    "oneDNN": ("environment", "cpu", "onednn"),
    "lock file": ("environment", "lock", "sha256"),
    "python": ("environment", "python"),
}
"""The machine facts of a manifest that :func:`manifest_differences` compares, by label."""


def _get(tree: dict, keys: tuple[str, ...]):
    for key in keys:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None


def manifest_differences(a: dict, b: dict) -> list[str]:
    """What differs between two runs' manifests, one ``label: A -> B`` line each: the CPU and its libraries,
    the lock file, each package version, and per stage the thread count, worker processes and pins."""
    lines = []
    for label, keys in MANIFEST_FIELDS.items():
        if _get(a, keys) != _get(b, keys):
            lines.append(f"{label}: {_get(a, keys)} -> {_get(b, keys)}")
    pa, pb = _get(a, ("environment", "packages")) or {}, _get(b, ("environment", "packages")) or {}
    for name in sorted(pa.keys() | pb.keys()):
        if pa.get(name) != pb.get(name):
            lines.append(f"package {name}: {pa.get(name)} -> {pb.get(name)}")
    sa, sb = a.get("stages", {}), b.get("stages", {})
    for stage in sorted(sa.keys() & sb.keys()):
        for field in ("torch_threads", "workers", "cpu_numerics"):
            if sa[stage].get(field) != sb[stage].get(field):
                lines.append(f"{stage} {field}: {sa[stage].get(field)} -> {sb[stage].get(field)}")
    return lines


def first_differing_stage(manifest: dict, differing: set[str]) -> tuple[str, list[str]] | None:
    """The first stage (in the manifest's order) that wrote one of the ``differing`` tables, and those
    tables; None when no stage's record names them (a manifest written before stages recorded tables)."""
    for stage, info in manifest.get("stages", {}).items():
        mine = sorted(differing & set(info.get("tables") or {}))
        if mine:
            return stage, mine
    return None


def committed_results(results: Path, into: Path) -> Path:
    """Copy the committed (git ``HEAD``) tables and manifest of the results folder ``results`` into the
    folder ``into``; return it. An error names the folder when git has no committed copy of it."""
    import subprocess

    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=results.parent, capture_output=True, text=True
    ).stdout.strip()
    if not root:
        raise FileNotFoundError(f"{results} is not inside a git checkout: give the folder to compare with")
    rel = results.resolve().relative_to(Path(root).resolve()).as_posix()
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", "HEAD", "--", rel], cwd=root, capture_output=True, text=True
    ).stdout.split()
    wanted = [f for f in listed if (f.endswith(".csv") and "/tables/" in f) or f == f"{rel}/manifest.json"]
    if not wanted:
        raise FileNotFoundError(f"git HEAD holds no committed results under {rel}/")
    (into / "tables").mkdir(parents=True, exist_ok=True)
    for name in wanted:
        blob = subprocess.run(
            ["git", "show", f"HEAD:{name}"], cwd=root, capture_output=True, check=True
        ).stdout
        target = (
            into / "manifest.json" if name.endswith("manifest.json") else into / "tables" / Path(name).name
        )
        target.write_bytes(blob)
    return into
