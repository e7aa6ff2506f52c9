"""Sampler backends behind one interface (:class:`erprm_core.sampler.Sampler`): batched HF and vLLM.

:func:`make_sampler` wraps a loaded model (``backend="hf"``: :class:`HFSampler`, the hand-written decoding
loop with a shared-prefix KV cache; ``"vllm"``: :class:`VLLMSampler`); :func:`load_sampler` loads a model
folder or hub name first. Core code (rollouts, raft) takes the sampler these return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erprm_core import models
from erprm_core.generation.hf import HFSampler
from erprm_core.generation.vllm import VLLMSampler

__all__ = ["HFSampler", "VLLMSampler", "load_sampler", "make_sampler"]


def load_sampler(
    source: str | Path,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    gpu_memory_utilization: float = 0.0,
) -> HFSampler | VLLMSampler:
    """A sampler for a model folder or hub name: HF via :func:`erprm_core.models.load_causal_lm`, or vLLM.

    ``gpu_memory_utilization`` (vLLM only; 0 = vLLM's default 0.9) must be lowered, e.g. to 0.45, when two
    engines (policy and a separate completer) share one GPU. The sampler's ``name_or_path`` records
    ``source`` (used in shard fingerprints for vLLM models).
    """
    if backend == "hf":
        model, tokenizer = models.load_causal_lm(source, device=device, dtype=dtype)
        sampler: HFSampler | VLLMSampler = HFSampler(model, tokenizer, batch_size=batch_size)
    elif backend == "vllm":
        llm_kwargs: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
        if gpu_memory_utilization:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        sampler = VLLMSampler(str(source), **llm_kwargs)
    else:
        raise ValueError(f"backend {backend!r} unknown; choose 'hf' (transformers) or 'vllm'")
    sampler.name_or_path = str(source)
    return sampler


def make_sampler(
    model: Any, tokenizer: Any, backend: str = "hf", batch_size: int = 64
) -> HFSampler | VLLMSampler:
    """The sampler of ``backend`` ("hf" or "vllm"); vLLM is imported only when chosen."""
    if isinstance(model, HFSampler | VLLMSampler):
        return model
    if backend == "hf":
        return HFSampler(model, tokenizer, batch_size=batch_size)
    if backend == "vllm":
        return VLLMSampler(model, tokenizer)
    raise ValueError(f"backend {backend!r} unknown; choose 'hf' (transformers) or 'vllm'")
