"""Shared plumbing of the benchmark loaders (gsm8k, math500, math_train): local JSONL, hub datasets, checksums.

Local records are yielded with their ``"file:line"`` location so that a bad record is reported where it is;
hub failures (e.g. no network) become an :class:`~erprm_core.artifacts.ArtifactError` that says to pass
``source=<local jsonl>`` instead. Used only inside ``erprm_core.tasks``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from erprm_core.artifacts import ArtifactError

__all__ = ["file_sha256", "resolve_source", "iter_local", "iter_hub", "check_limit"]


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (recorded in the manifest to identify the data a run used)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_limit(limit: int | None) -> int | None:
    """Validate a loader's ``limit`` (None = all, else a non-negative int)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be None or an int >= 0, got limit={limit!r}")
    return limit


def resolve_source(source: Path | str, split: str) -> Path:
    """The JSONL file of a local ``source``: the file itself, or ``<folder>/<split>.jsonl`` for a folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise ArtifactError(f"source={str(source)!r}: no such JSONL file ({path})")
    return path


def iter_local(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", record)`` for each non-blank line; bad JSON or missing keys name file and line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise ArtifactError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise ArtifactError(f"{where}: missing field(s) {missing}; has {sorted(rec)}")
            yield where, rec


def iter_hub(
    name: str, config: str | None, split: str, required: Sequence[str], local_hint: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("name[config/split]#index", record)`` from a hub dataset (``datasets.load_dataset``).

    Any failure to load (no network, ``HF_HUB_OFFLINE=1`` without a cache, a removed dataset) raises an
    ArtifactError suggesting ``source=<local jsonl>`` (``local_hint`` names an example file).
    """
    label = f"{name}[{config + '/' if config else ''}{split}]"
    try:
        import datasets

        ds = (
            datasets.load_dataset(name, config, split=split)
            if config
            else datasets.load_dataset(name, split=split)
        )
    except Exception as exc:
        raise ArtifactError(
            f"could not load {label} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Without hub access pass source=<local jsonl>, e.g. source={local_hint!r}."
        ) from exc
    missing = [k for k in required if k not in ds.column_names]
    if missing:
        raise ArtifactError(f"{label}: missing column(s) {missing}; has {sorted(ds.column_names)}")
    for index, rec in enumerate(ds):
        yield f"{label}#{index}", dict(rec)
