"""Profiles, stage notebooks and their parameters: what ``erprm reproduce`` will run, checked up front.

``configs/<profile>/NN_*.yaml`` holds one flat file of parameters per stage notebook; ``-p key=value``
overrides them. Every name and type is checked against the notebook's ``parameters`` cell (papermill's
inspection) before anything runs, and every error names the file and key. :func:`parse_names` and
:func:`parse_eta_grid` read the parameter values that are comma lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from erprm_core.running import artifacts

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
"""Packages whose versions the manifest records."""


def parse_eta_grid(text: str) -> list[float]:
    """Parse a notebook parameter such as ``"0,0.1,1,inf"`` into floats (``inf``/``-inf`` allowed).

    Raises ValueError naming the bad entry; NaN and duplicates are rejected.
    """
    etas: list[float] = []
    for part in parse_names(str(text)):
        try:
            eta = float(part)
        except ValueError:
            raise ValueError(f"eta grid {text!r}: {part!r} is not a number (use e.g. 0,0.1,1,inf)") from None
        if math.isnan(eta):
            raise ValueError(f"eta grid {text!r}: NaN is not a valid eta")
        if eta in etas:
            raise ValueError(f"eta grid {text!r}: {part!r} appears twice")
        etas.append(eta)
    if not etas:
        raise ValueError(f"eta grid {text!r} is empty")
    return etas


def parse_names(value: str | Sequence[str] | None, *, unique: bool = False, what: str = "") -> list[str]:
    """A comma list (``"er_1, hard"``) or a sequence of names as a list of strings.

    Entries of a string are stripped and empty ones dropped; a sequence passes through as ``str``s; ``None``
    gives ``[]``. ``unique=True`` raises ValueError (``"<what> lists a name twice: [...]"``) on a repeat.
    """
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    else:
        names = [str(v) for v in value]
    if unique and len(set(names)) != len(names):
        raise ValueError(f"{what} lists a name twice: {names}")
    return names


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
    """Parse ``key=value`` (value read as YAML, so 3 -> int, 0.5 -> float, true -> bool).

    ``key`` is a parameter name (every stage that declares it) or ``stage.name`` for one stage only, the
    stage given by its number or its full notebook name (``03.seed=1``, ``03_train_prm.seed=1``).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    stage, _, name = key.rpartition(".")
    if not name.isidentifier() or (stage and not stage.replace("_", "").isalnum()):
        raise ConfigError(f"override {text!r}: {key!r} is not a parameter name (or stage.name)")
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
            stage, _, name_ = key.rpartition(".")
            if name_ in declared and (not stage or _names_stage(name, stage)):
                params[name_] = _check_type(name_, value, declared[name_], f"-p {key}")
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


def _names_stage(name: str, qualifier: str) -> bool:
    """Whether an override's stage qualifier names stage ``name``: its number (``03``) or its full name
    (``03_train_prm``); a mere prefix such as ``0`` or ``03_train`` names no stage."""
    return qualifier in (name, name.split("_", 1)[0])


def _stage_index(names: list[str], prefix: str | None, default: int) -> int:
    if prefix is None:
        return default
    matches = [i for i, n in enumerate(names) if n.startswith(str(prefix))]
    if not matches:
        raise ConfigError(f"no stage starts with {prefix!r}; stages are {names}")
    return matches[0]
