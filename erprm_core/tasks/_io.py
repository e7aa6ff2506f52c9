"""Shared plumbing of the benchmark loaders (gsm8k, math500, math_train): local JSONL, hub datasets, checksums.

Local records are yielded with their ``"file:line"`` location so that a bad record is reported where it is;
hub failures (e.g. no network) become an :class:`~erprm_core.io.ArtifactError` that says to pass
``source=<local jsonl>`` instead. Used only inside ``erprm_core.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from erprm_core.io import ArtifactError, Audit

log = logging.getLogger(__name__)


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


def load_dataset_problems(
    *,
    label: str,
    hub: tuple[str, str | None, tuple[str, ...]],
    required: Sequence[str],
    local_hint: str,
    to_problem: Callable[[dict[str, Any], str], dict[str, Any]],
    id_prefix: str,
    split: str,
    source: Path | str | None,
    limit: int | None,
    audit: Audit | None,
) -> list[dict[str, Any]]:
    """The body of a benchmark's ``load_problems``: records from the hub (``hub`` = name, config, splits)
    or a local JSONL, turned into problems by ``to_problem(raw, "<id_prefix>-<split>-<index>")``, the first
    ``limit`` of them. A record ``to_problem`` rejects (ValueError) raises ArtifactError naming its file and
    line (or hub index) and ``label``; ``audit`` counts the records kept."""
    limit = check_limit(limit)
    hub_name, hub_config, splits = hub
    if source is None:
        if split not in splits:
            raise ValueError(f"split must be one of {splits} for {hub_name}, got split={split!r}")
        records = iter_hub(hub_name, hub_config, split, required, local_hint)
    else:
        path = resolve_source(source, split)
        log.info("loading %s %s from %s (sha256 %s)", label, split, path, file_sha256(path)[:12])
        records = iter_local(path, required)
    problems: list[dict[str, Any]] = []
    for where, raw in records:
        if limit is not None and len(problems) >= limit:
            break
        try:
            problems.append(to_problem(raw, f"{id_prefix}-{split}-{len(problems):05d}"))
        except ValueError as exc:
            raise ArtifactError(f"{where}: bad {label} record: {exc}") from exc
    if audit is not None:
        audit.count("kept", len(problems))
    return problems
