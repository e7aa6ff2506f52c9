"""What several stages share: the policy and PRMs of a profile, problem slices, the Config habit, the manifest.

Every stage Config inherits :class:`StageConfig`, so a notebook builds it from its parameters cell with
``<Name>Config.from_namespace(globals())``; :func:`record` writes ``asdict(config)`` plus the stage's
statistics to the manifest, with every path in them relative to the repository root (:func:`repo_relative`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from erprm_core import io, labels
from erprm_core.running import artifacts
from erprm_core.running.artifacts import repo_relative

log = logging.getLogger(__name__)

PROBLEM_COLUMNS = ("id", "question", "answer", "task")
"""The columns every problem file has (00_policy writes them)."""


class StageConfig:
    """Mixin of the stage Config dataclasses: build one from a notebook's namespace."""

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> Any:
        """The Config whose fields take the values of the same names in ``namespace`` (e.g. ``globals()``)."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def _from_repo_relative(name: str) -> Any:
    """The folder that :func:`repo_relative` wrote as ``name`` when it exists (under the repository root or the
    runs/results roots' parents), else ``name`` itself (a hub name, or an absolute path)."""
    if os.path.isabs(name):
        return name
    for root in (artifacts.repo_root(), artifacts.runs_root().parent, artifacts.results_root().parent):
        if (root / name).exists():
            return root / name
    return name


def record(profile: str, stage: str, config: Any, **stats: Any) -> dict[str, Any]:
    """Write ``asdict(config)`` and ``stats`` as the manifest entry of ``stage``; return the entry.

    The entry is replaced, not merged: what a previous run recorded (and what the pipeline added after it:
    parameters, wall time, commit) does not linger beside this run's values; the pipeline adds its keys again
    when the notebook ends. A statistic with the name of a field wins: it is the resolved value (e.g.
    ``torch_threads``, the thread count actually used when the field says 0 = auto). The ``profile`` field is
    left out: the manifest is the profile's (its top-level ``profile`` key). Paths are written relative to the
    repository root (:func:`repo_relative`).
    """
    entry = repo_relative({**{k: v for k, v in asdict(config).items() if k != "profile"}, **stats})
    manifest = artifacts.load_manifest(profile)
    manifest.setdefault("stages", {})[stage] = entry
    io.atomic_write_json(artifacts.paths(profile).manifest, manifest)
    return entry


def resolve_policy(profile: str) -> Any:
    """The policy of a profile: the 00_policy checkpoint folder, else the manifest's ``policy_name``.

    Paper profiles may load a hub policy without saving a copy; 00_policy then records its name in the
    manifest entry ``stages["00_policy"]["policy_name"]``. Raises an ArtifactError naming 00_policy when
    neither exists.
    """
    p = artifacts.paths(profile)
    if (p.policy / "config.json").is_file():
        return p.policy
    name = artifacts.load_manifest(profile).get("stages", {}).get("00_policy", {}).get("policy_name")
    if name:
        return _from_repo_relative(str(name))
    return artifacts.require(p.policy / "config.json", "00_policy", profile, "policy checkpoint")


def trained_rules(profile: str) -> dict[str, Any]:
    """Rule name -> checkpoint folder of every PRM that 03_train_prm saved (``runs/<profile>/prms/<rule>``)."""
    p = artifacts.paths(profile)
    root = p.run / "prms"
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (p.prm(d.name) / "config.json").is_file():
                found[d.name] = p.prm(d.name)
    return {rule: found[rule] for rule in sorted(found, key=labels.rule_sort_key)}


def take_problems(
    path: Path | str, n: int, what: str, profile: str, stage: str, *, strict: bool, quiet: bool = False
) -> list[dict[str, Any]]:
    """The first ``n`` problems of a problem file (0 = all), after checking that 00_policy wrote it.

    Three behaviours, one per caller: ``strict`` (RAFT) raises ValueError when ``n`` < 0 or when the file
    holds fewer than ``n`` problems; not strict (best-of-N) raises for ``n`` < 0 and warns, then uses all,
    when ``n`` is too large; ``quiet`` (rollouts) is the plain slice ``[: n or None]``.
    """
    artifacts.require(path, stage, profile, what)
    problems = artifacts.read_jsonl(path, PROBLEM_COLUMNS)
    if quiet:
        return problems[: n or None]
    if strict:
        if n < 0:
            raise ValueError(f"{what}: the count must be >= 0 (0 = all), got {n}")
        if n > len(problems):
            raise ValueError(f"{what}: asked for {n} but {path} holds only {len(problems)} problems")
        return problems[:n] if n else problems
    if n < 0:
        raise ValueError(f"n_test must be >= 0 (0 = all), got {n}")
    if n:
        if n > len(problems):
            log.warning("n_test=%d but %s holds %d problems: using all", n, path, len(problems))
        problems = problems[:n]
    return problems
