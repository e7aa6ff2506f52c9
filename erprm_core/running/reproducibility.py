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


def table_digests(tables: Path) -> dict[str, str]:
    """sha256 of every ``*.csv`` in the folder ``tables``, by file name (sorted)."""
    if not tables.is_dir():
        raise FileNotFoundError(f"tables folder {tables} not found")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tables.glob("*.csv"))}


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
