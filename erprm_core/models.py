"""Models: a loader for any causal LM, and the device and dtype it runs in.

:func:`load_causal_lm` loads any hub name or local folder through the Auto classes (the tiny policy of the
embedded default, built by ``erprm_core.stages.policy`` and saved with ``save_pretrained``, loads exactly like
a hub model); :func:`resolve_device` and :func:`resolve_dtype` pick the device and dtype.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

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
    """Load ``(model, tokenizer)`` from a hub name or a local ``save_pretrained`` folder (Auto classes).

    ``device``/``dtype`` as in :func:`resolve_device`/:func:`resolve_dtype`; extra ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``); a ``revision`` among them is also
    the tokenizer's, so a pinned hub revision loads a matching pair. Honours ``HF_HUB_OFFLINE``.
    The tokenizer gets a pad token (the EOS token) if it has none and ``padding_side`` (left: for
    generation). A local path that does not exist raises FileNotFoundError naming it. The model is
    returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
