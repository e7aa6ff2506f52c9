"""Offline dry run of a paper profile: the whole chain with tiny random-weight models of the same families.

``erprm reproduce --profile paper-gsm8k --dry-run`` (and ``paper-math``) proves that every stage of a
GPU-scale profile is wired, on a laptop, without the hub and without a GPU. It

1. makes a folder ``<base>/<profile>/`` (``<base>`` = ``runs/dry-run`` by default, git-ignored) holding
   ``data/`` (a handful of problems in the raw hub format, read from ``../shared/data`` when present,
   else from the fixtures in ``tests/fixtures/dryrun``), ``models/`` (tiny random-weight models saved with
   ``save_pretrained``), and the stage outputs under ``runs/`` and ``results/`` (the artifact roots are
   redirected there through ``ERPRM_RUNS_ROOT`` / ``ERPRM_RESULTS_ROOT``, so ``results/<profile>`` is never
   touched);
2. builds the models of the paper's architecture families with :func:`build_tiny_models`: the policy
   (Mistral-MetaMath-7b -> ``MistralForCausalLM``), the completer (deepseek-math-7b-rl ->
   ``LlamaForCausalLM``) and the PRM base (Llama-3.1-8B -> ``LlamaForCausalLM`` with llama3 RoPE scaling),
   all with the word-level tokenizer of :func:`erprm_core.tiny_lm.build_tokenizer` fitted on the problems'
   text (it holds "ки", "+", "-" as single tokens; unseen words map to ``<unk>``); the policy is also put
   into a local Hugging Face cache (``hf-cache/``, :func:`save_to_hub_cache`) under the hub-style name
   :data:`HUB_POLICY`, and the stages run with ``HF_HUB_CACHE`` pointing there (offline), so the policy goes
   the way of the paper's hub policy: 00 keeps no copy, later stages load it by name; the PRM base is also
   cached as :data:`HUB_RELEASED_PRM`, the stand-in of a released PRM that 07_processbench scores with a pinned
   revision, on six ProcessBench records of the fixtures (``data/processbench``);
3. runs :func:`erprm_core.running.pipeline.run` with the profile's own configs plus the overrides of
   ``configs/<profile>/dry-run.yaml`` (applied like ``-p key=value`` to every stage that declares the key;
   ``{models}`` and ``{data}`` in a value are replaced by the folders above), so the paper configuration is
   validated and executed, only smaller, on the CPU, with the HF backend. The paper's dtypes are kept
(bfloat16 for the policy and completer in 00/01, and for the PRM base in 03: its training runs the bf16 path,
float32 master weights under bf16 autocast, on the CPU).

Random weights never write "The answer is", so every outcome is 0: a dry run checks wiring, not numbers.
To make solutions several steps long and let them stop before the token limit, the models get a fixed bias
towards the newline and end-of-sequence tokens (:func:`bias_tokens`); nothing else is tuned.

Used by :mod:`erprm_core.running.cli` (``--dry-run``) and tests/test_dryrun.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erprm_core import io, steps
from erprm_core.running import artifacts, config, pipeline
from erprm_core.tiny_lm import build_tokenizer

log = logging.getLogger(__name__)

DRY_RUN_FILE = "dry-run.yaml"  # per profile: configs/<profile>/dry-run.yaml (not a stage: plan() ignores it)
MARKER = ".erprm-dry-run"  # written into a dry-run folder; only such folders are ever deleted
PLACEHOLDERS = ("models", "data")
HUB_POLICY = "erprm-dry-run/tiny-metamath-mistral"
"""The hub-style name under which the dry run's policy is cached (configs/<profile>/dry-run.yaml uses it)."""
HUB_CACHE = "hf-cache"  # the dry run's local Hugging Face cache, inside its folder
HUB_RELEASED_PRM = "erprm-dry-run/tiny-released-prm"
"""The hub-style name of the dry run's stand-in for a released PRM (07_processbench's ``released_prms``)."""
PROCESSBENCH_FIXTURE = "processbench"  # fixture folder of ProcessBench records (always used by the dry run)

# task of the profile -> {file in the dry-run data folder: (shared data file, fixture file)}.
# MATH train has no copy in ../shared/data, so its fixture is always used.
DATA_FILES = {
    "gsm8k": {
        "train.jsonl": ("gsm8k/train.jsonl", "gsm8k/train.jsonl"),
        "test.jsonl": ("gsm8k/test.jsonl", "gsm8k/test.jsonl"),
    },
    "math": {
        "train.jsonl": (None, "math/train.jsonl"),
        "test.jsonl": ("math500/test.jsonl", "math/test.jsonl"),
    },
}
DATA_FILES["math500"] = DATA_FILES["math"]

# The paper's models and the architecture family each tiny stand-in copies.
MODEL_FAMILIES = {
    "policy": ("meta-math/MetaMath-Mistral-7B", "mistral"),
    "completer": ("deepseek-ai/deepseek-math-7b-rl", "llama"),
    "prm_base": ("meta-llama/Llama-3.1-8B", "llama3"),
}

__all__ = [
    "DRY_RUN_FILE",
    "DryRun",
    "bias_tokens",
    "build_tiny_models",
    "dry_run_overrides",
    "fixtures_root",
    "load_dry_run_file",
    "plan",
    "prepare",
    "reuse",
    "run",
    "save_to_hub_cache",
    "texts_of",
    "write_dry_run_data",
]


@dataclass
class DryRun:
    """A prepared dry-run folder: where everything lives and the overrides to run the profile with."""

    profile: str
    root: Path
    models: dict[str, Path] = field(default_factory=dict)
    data: Path | None = None
    data_sources: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def runs_root(self) -> Path:
        """``<root>/runs``: the redirected ERPRM_RUNS_ROOT."""
        return self.root / "runs"

    @property
    def results_root(self) -> Path:
        """``<root>/results``: the redirected ERPRM_RESULTS_ROOT."""
        return self.root / "results"

    @property
    def hub_cache(self) -> Path:
        """``<root>/hf-cache``: the local Hugging Face cache holding :data:`HUB_POLICY` (``HF_HUB_CACHE``)."""
        return self.root / HUB_CACHE


def fixtures_root() -> Path:
    """``tests/fixtures/dryrun``: the small committed copies used when ``../shared/data`` is absent."""
    return artifacts.repo_root() / "tests" / "fixtures" / "dryrun"


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository (may not exist)."""
    return artifacts.repo_root().parent / "shared" / "data"


def default_base() -> Path:
    """``<runs root>/dry-run``: the default parent folder of dry runs (git-ignored like runs/)."""
    return artifacts.runs_root() / "dry-run"


def load_dry_run_file(profile: str) -> dict[str, Any]:
    """The overrides of ``configs/<profile>/dry-run.yaml`` (flat ``key: value``); ConfigError if missing."""
    path = artifacts.configs_root() / profile / DRY_RUN_FILE
    if not path.is_file():
        raise config.ConfigError(
            f"profile {profile!r} has no dry-run overrides: {path} is missing "
            "(only the paper profiles define a dry run)"
        )
    return config.load_config(path)


def _profile_value(profile: str, stage: str, key: str, default: Any = None) -> Any:
    path = artifacts.configs_root() / profile / f"{stage}.yaml"
    return config.load_config(path).get(key, default) if path.is_file() else default


def _substitute(value: Any, folders: dict[str, Path], where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return value.format(**{k: str(v) for k, v in folders.items()})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"{where}: cannot fill {value!r}; placeholders allowed: {['{' + p + '}' for p in PLACEHOLDERS]}"
        ) from exc


def dry_run_overrides(profile: str, models_dir: Path, data_dir: Path) -> list[str]:
    """The dry-run overrides of ``profile`` as ``key=value`` strings for :func:`erprm_core.running.config.plan`.

    Values are JSON-encoded (read back as YAML, so types survive: ``1e-4`` stays a float, a path a string);
    ``{models}`` / ``{data}`` are replaced by ``models_dir`` / ``data_dir``.
    """
    folders = {"models": models_dir, "data": data_dir}
    where = str(artifacts.configs_root() / profile / DRY_RUN_FILE)
    out = []
    for key, value in load_dry_run_file(profile).items():
        out.append(f"{key}={json.dumps(_substitute(value, folders, f'{where}: {key}'))}")
    return out


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def _first_records(path: Path, n: int) -> list[str]:
    lines = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip("\n"))
            if len(lines) >= n:
                break
    return lines


def write_dry_run_data(task: str, folder: Path, n_train: int, n_test: int) -> dict[str, str]:
    """Write ``folder/train.jsonl`` (``n_train`` records) and ``folder/test.jsonl`` (``n_test``) for ``task``.

    Records keep the raw hub format of the task's loaders (GSM8K ``question``/``answer``; MATH train
    ``problem``/``solution``; MATH500 ``problem``/``solution``/``answer``...), so the dry run goes through the
    real loaders with ``source=<folder>``. Each file comes from ``../shared/data`` when present, else from
    the fixture; returns ``{file name: the file it was read from}``. Too few records raise ValueError.
    """
    if task not in DATA_FILES:
        raise ValueError(f"no dry-run data for task {task!r}; known: {sorted(DATA_FILES)}")
    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, (shared, fixture) in DATA_FILES[task].items():
        n = n_train if name.startswith("train") else n_test
        src = shared_data_root() / shared if shared else None
        if src is None or not src.is_file():
            src = fixtures_root() / fixture
        lines = _first_records(src, n)
        if len(lines) < n:
            raise ValueError(f"{src} holds {len(lines)} records; the dry run needs {n} for {name}")
        io.atomic_write_text(folder / name, "\n".join(lines) + "\n")
        sources[name] = str(src)
    return sources


def texts_of(folder: Path) -> list[str]:
    """Every string value of every record of the ``*.jsonl`` files in ``folder`` (the tokenizer's corpus)."""
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values() if isinstance(v, str))
    return texts


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def build_dry_run_tokenizer(texts: list[str], model_max_length: int = 4096):
    """The kit's word-level tokenizer fitted on ``texts``, the prompt templates and the answer line.

    Holds the step tag "ки" and "+" / "-" as single tokens (with and without a leading space), every number
    0..999 and every ASCII symbol; words it has not seen become ``<unk>``.
    """
    extra = [t.format(question="") for t in steps.PROMPT_TEMPLATES.values()] + ["The answer is: 1"]
    return build_tokenizer(list(texts) + extra, max_number=999, model_max_length=model_max_length)


def _config(family: str, tokenizer, hidden_size: int, num_layers: int):
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "mistral":  # Mistral-7B: grouped-query attention, sliding window 4096
        return MistralConfig(
            **common, num_key_value_heads=2, max_position_embeddings=32768, sliding_window=4096
        )
    if family == "llama":  # deepseek-math-7b: plain Llama, no GQA, 4k context
        return LlamaConfig(**common, num_key_value_heads=4, max_position_embeddings=4096)
    if family == "llama3":  # Llama-3.1-8B: GQA, llama3 RoPE scaling, 128k context
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        return LlamaConfig(
            **common, num_key_value_heads=2, max_position_embeddings=131072, rope_parameters=rope
        )
    raise ValueError(f"unknown model family {family!r}")


def bias_tokens(model, tokenizer, probabilities: dict[str, float], probe_text: str) -> None:
    """Give a random-weight model a fixed bias towards some tokens (e.g. newline and EOS), in place.

    Llama/Mistral heads have no bias, so hidden unit 0 is made a constant feature: every input embedding gets
    the same positive value there, the final RMSNorm keeps it positive (its mean ``h0`` is measured on
    ``probe_text``), and the head row of each token gets ``log(p * V / (1 - p)) / h0`` on that unit, which
    gives the token a probability of about ``p`` next to ~uniform random logits over the vocabulary ``V``.
    """
    import math

    import torch

    vocab = len(tokenizer)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 4.0 * emb[:, 1:].abs().mean()
        ids = tokenizer(probe_text, return_tensors="pt").input_ids
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        h0 = float(hidden[0, :, 0].mean())
        if h0 <= 0:
            raise RuntimeError(f"bias_tokens: the constant feature came out non-positive ({h0:.3g})")
        head = model.get_output_embeddings().weight
        for token, p in probabilities.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"bias_tokens: {token!r} is not in the vocabulary")
            head[token_id, :] = 0.0
            head[token_id, 0] = math.log(p * vocab / (1 - p)) / h0


def build_tiny_models(
    folder: Path,
    tokenizer,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    newline_p: float = 0.12,
    eos_p: float = 0.04,
) -> dict[str, Path]:
    """Save tiny random-weight stand-ins of the paper's models under ``folder/<role>`` (save_pretrained).

    Roles (see MODEL_FAMILIES): ``policy`` (MistralForCausalLM), ``completer`` (LlamaForCausalLM) and
    ``prm_base`` (LlamaForCausalLM with Llama-3.1's RoPE scaling), each with ``tokenizer``, float32, seeded
    (``seed`` + role index). Policy and completer get :func:`bias_tokens` towards newline (``newline_p``)
    and EOS (``eos_p``), so solutions have several steps and most end before the token limit.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    probe = "Tom has 3 apples.\nHe buys 4 more.\nThe answer is: 7"
    for index, (role, (hub_name, family)) in enumerate(MODEL_FAMILIES.items()):
        model_config = _config(family, tokenizer, hidden_size, num_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            model = AutoModelForCausalLM.from_config(model_config)
        model.eval()
        if role != "prm_base":
            bias_tokens(model, tokenizer, {"\n": newline_p, tokenizer.eos_token: eos_p}, probe)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        path = folder / role
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        io.atomic_write_json(
            path / "dry_run.json", {"stands_in_for": hub_name, "family": family, "seed": seed + index}
        )
        log.info("dry run: %s (%s, stands in for %s) -> %s", role, type(model).__name__, hub_name, path)
        out[role] = path
    return out


def save_to_hub_cache(folder: Path | str, cache: Path | str, repo_id: str, revision: str = "0" * 40) -> Path:
    """Copy a ``save_pretrained`` folder into a Hugging Face cache as the model ``repo_id`` ("org/name").

    The layout is the hub cache's (``models--org--name/refs/main`` naming the snapshot ``revision``, the files
    under ``snapshots/<revision>/``), so with ``HF_HUB_CACHE=cache`` and ``HF_HUB_OFFLINE=1`` the loaders
    resolve ``repo_id`` to it as to a downloaded hub model. Returns the snapshot folder.
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# ----------------------------------------------------------------------------------------------------
# The dry run
# ----------------------------------------------------------------------------------------------------


def _fresh_folder(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).is_file():
            if any(root.iterdir()):
                raise config.ConfigError(
                    f"{root} exists and is not a dry-run folder (no {MARKER}); choose another base folder"
                )
        else:
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by erprm_core.running.dryrun; deleted and rebuilt by every dry run\n")


def prepare(profile: str, base: Path | str | None = None, seed: int = 0) -> DryRun:
    """Make a fresh ``<base>/<profile>`` dry-run folder: data, tiny models, and the resolved overrides.

    The problem counts come from the dry-run file (``n_train_prm`` + ``n_raft`` train problems, ``n_test``
    test problems); the task from the profile's ``00_policy.yaml``. A previous dry run of the profile in
    the same place is deleted first (only folders carrying the dry-run marker are ever deleted).
    """
    dry = load_dry_run_file(profile)
    task = _profile_value(profile, "00_policy", "task", "arith")
    root = Path(base or default_base()).expanduser().resolve() / profile
    _fresh_folder(root)
    prepared = DryRun(profile, root)
    data_dir = root / "data"
    if "source" in dry:
        n_train = int(dry.get("n_train_prm", 0)) + int(dry.get("n_raft", 0))
        n_test = int(dry.get("n_test", 0))
        prepared.data_sources = write_dry_run_data(task, data_dir, n_train, n_test)
        prepared.data = data_dir
        shutil.copytree(fixtures_root() / PROCESSBENCH_FIXTURE, data_dir / "processbench")
        prepared.data_sources["processbench"] = str(fixtures_root() / PROCESSBENCH_FIXTURE)
    texts = texts_of(data_dir) if prepared.data else []
    for path in sorted((data_dir / "processbench").glob("*.json")) if prepared.data else []:
        texts.extend(t for rec in json.loads(path.read_text()) for t in [rec["problem"], *rec["steps"]])
    tokenizer = build_dry_run_tokenizer(texts)
    prepared.models = build_tiny_models(root / "models", tokenizer, seed=seed)
    save_to_hub_cache(prepared.models["policy"], prepared.hub_cache, HUB_POLICY)
    save_to_hub_cache(prepared.models["prm_base"], prepared.hub_cache, HUB_RELEASED_PRM)
    prepared.overrides = dry_run_overrides(profile, root / "models", data_dir)
    io.atomic_write_json(
        root / "dry_run.json",
        {
            "profile": profile,
            "task": task,
            "data_sources": prepared.data_sources,
            "models": {k: str(v) for k, v in prepared.models.items()},
            "hub_policy": {"name": HUB_POLICY, "cache": str(prepared.hub_cache)},
            "hub_released_prm": HUB_RELEASED_PRM,
            "overrides": prepared.overrides,
        },
    )
    return prepared


def reuse(profile: str, base: Path | str | None = None) -> DryRun:
    """The folder of a previous :func:`prepare` (for a partial rerun); ConfigError when there is none."""
    root = Path(base or default_base()).expanduser().resolve() / profile
    info_path = root / "dry_run.json"
    if not (root / MARKER).is_file() or not info_path.is_file():
        raise config.ConfigError(
            f"no previous dry run of {profile} in {root}: run the whole chain first "
            f"(erprm reproduce --profile {profile} --dry-run)"
        )
    info = json.loads(info_path.read_text())
    data = root / "data"
    return DryRun(
        profile,
        root,
        models={k: Path(v) for k, v in info["models"].items()},
        data=data if data.is_dir() else None,
        data_sources=info["data_sources"],
        overrides=dry_run_overrides(profile, root / "models", data),
    )


@contextmanager
def redirected_roots(run: DryRun) -> Iterator[None]:
    """Point ERPRM_RUNS_ROOT / ERPRM_RESULTS_ROOT at the dry-run folder and HF_HUB_CACHE at its hub cache,
    offline (kernels inherit them); restore."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with artifacts.redirected_roots(run.runs_root, run.results_root):
        with artifacts.environment_set({"HF_HUB_CACHE": str(run.hub_cache), "HF_HUB_OFFLINE": "1"}):
            yield


def _for_stages(profile: str, start: str | None, stop: str | None, dry: list[str]) -> list[str]:
    """The dry-run overrides that a stage from ``start`` to ``stop`` declares (all, for the full chain)."""
    if start is None and stop is None:
        return dry  # the full chain: a key no stage declares is an error in plan()
    declared: set[str] = set()
    for stage in config.plan(profile, start, stop):
        declared.update(config.notebook_parameters(stage.notebook))
    return [o for o in dry if o.split("=", 1)[0] in declared]


def plan(
    profile: str,
    start: str | None = None,
    stop: str | None = None,
    overrides: list[str] | None = None,
    base: Path | str | None = None,
):
    """The stages a dry run would execute, validated (:func:`erprm_core.running.config.plan`); builds nothing.

    Model and data paths point where :func:`prepare` would put them.
    """
    root = Path(base or default_base()).expanduser().resolve() / profile
    dry = _for_stages(profile, start, stop, dry_run_overrides(profile, root / "models", root / "data"))
    return config.plan(profile, start, stop, dry + list(overrides or []))


def run(
    profile: str,
    start: str | None = None,
    stop: str | None = None,
    overrides: list[str] | None = None,
    base: Path | str | None = None,
    cell_timeout: int = 600,
) -> tuple[DryRun, list[dict[str, Any]]]:
    """Dry-run ``profile`` and return the dry-run folder and the stage summaries of the pipeline.

    The full chain (no ``start``) first rebuilds the dry-run folder from scratch (:func:`prepare`); a partial
    run (``start`` given, e.g. to rerun 04 after a fix) reuses the folder of the previous dry run, so its
    upstream artifacts are there. ``overrides`` (``key=value``) apply after the dry-run file's. The
    selected stages always rerun.
    """
    plan(profile, start, stop, overrides, base)  # fail on a bad config before building anything
    if start is None:
        prepared = prepare(profile, base)
    else:
        prepared = reuse(profile, base)
    log.info("dry run of %s in %s (data: %s)", profile, prepared.root, prepared.data_sources or "none")
    dry = _for_stages(profile, start, stop, prepared.overrides)
    with redirected_roots(prepared):
        summary = pipeline.run(
            profile, start, stop, dry + list(overrides or []), force=True, cell_timeout=cell_timeout
        )
    return prepared, summary
