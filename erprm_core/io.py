"""Generic I/O for every layer: the artifact error, atomic writes, the audit of skipped samples, progress bars.

Files are written atomically (temp file + rename), finished folders replace older ones by rename. Nothing
here knows about profiles or paths; ``erprm_core.running.artifacts`` builds those (and the checked JSONL
files) on top.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm


class ArtifactError(RuntimeError):
    """A stage's input is missing or malformed; the message names the file (and line) and the fix."""


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the mode open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """Write pretty, key-sorted JSON atomically (stable diffs)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def replace_folder(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` (never left half-written)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


class Audit:
    """Counts of kept and skipped samples by reason, for a stage's audit table."""

    def __init__(self, stage: str):
        self.stage = stage
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def count(self, reason: str, n: int = 1, example: str | None = None) -> None:
        """Add ``n`` samples under ``reason`` (e.g. "kept", "no_answer", "truncated")."""
        self.counts[reason] += n
        if example is not None and reason not in self.examples:
            self.examples[reason] = example[:200]

    def to_frame(self) -> pd.DataFrame:
        """One row per reason: stage, reason, count, an example."""
        rows = [
            {"stage": self.stage, "reason": r, "count": c, "example": self.examples.get(r, "")}
            for r, c in sorted(self.counts.items())
        ]
        return pd.DataFrame(rows, columns=["stage", "reason", "count", "example"])


PROGRESS_ENV = "ERPRM_PROGRESS_FILE"  # set by `erprm reproduce` in its stage kernels: see progress()
SILENT_ENV = "ERPRM_NO_PROGRESS"  # set in the worker processes of a stage: their parent counts the units
INTERACTIVE_ENV = "ERPRM_INTERACTIVE"  # "1" (set by `make lab`): notebooks show widgets; see report.style


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm (same arguments) by the kit's one rule: ``tqdm.auto`` draws the bar (a widget in Jupyter, text in a
    terminal), except in a stage kernel of ``erprm reproduce`` (:data:`PROGRESS_ENV` set), where the open bars
    go to that JSON file instead, at most once a second, and the pipeline shows them in the terminal. No bar
    is drawn where :data:`SILENT_ENV` is set (a stage's worker processes)."""
    if os.environ.get(SILENT_ENV):
        return std_tqdm(iterable, **{**kwargs, "disable": True})
    if not os.environ.get(PROGRESS_ENV):
        return auto_tqdm(iterable, **kwargs)
    return _FileBar(iterable, **{"disable": False, **kwargs, "file": StringIO(), "mininterval": 1.0})


class _FileBar(std_tqdm):
    """A tqdm that draws nothing: each refresh writes every open bar (outermost first) to the progress file."""

    monitor_interval = 0  # no monitor thread

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write description, count, total, unit, elapsed seconds and rate of each open bar."""
        bars = sorted((b for b in self._instances if isinstance(b, _FileBar)), key=lambda b: abs(b.pos))
        keys = ("prefix", "n", "total", "unit", "elapsed", "rate")
        atomic_write_json(os.environ[PROGRESS_ENV], [{k: b.format_dict[k] for k in keys} for b in bars])
        return True
