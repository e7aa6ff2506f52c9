"""Sampler backends behind one interface (:class:`erprm_core.sampler.Sampler`): batched HF and vLLM.

:func:`make_sampler` wraps a loaded model (``backend="hf"``: :class:`HFSampler`, the hand-written decoding
loop with a shared-prefix KV cache; ``"vllm"``: :class:`VLLMSampler`); :func:`load_sampler` loads a model
folder or hub name first (vLLM always starts from a name or path: it loads its own copy, so no Hugging Face
copy may hold the GPU then); :func:`release_sampler` shuts a sampler's engine down and frees the GPU memory.
Core code (rollouts, raft) takes the sampler these return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erprm_core import models
from erprm_core.generation.hf import HFSampler
from erprm_core.generation.vllm import VLLMSampler, free_accelerator_memory

__all__ = [
    "HFSampler",
    "VLLMSampler",
    "free_accelerator_memory",
    "load_sampler",
    "make_sampler",
    "release_sampler",
]


def load_sampler(
    source: str | Path,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    gpu_memory_utilization: float = 0.0,
) -> HFSampler | VLLMSampler:
    """A sampler for a model folder, hub name or packaged model (:func:`erprm_core.models.resolve_model`): HF
    via :func:`erprm_core.models.load_causal_lm`, or vLLM.

    ``gpu_memory_utilization`` (vLLM only; 0 = vLLM's default 0.9) must be lowered, e.g. to 0.45, when two
    engines (policy and a separate completer) share one GPU; vLLM refuses to start when less than that share
    of the GPU is free. vLLM gets the dtype the HF backend would use (``dtype="auto"``: bfloat16 on a GPU that
    has it, see :func:`erprm_core.models.resolve_dtype`), never vLLM's own "auto", which runs a float32
    checkpoint (e.g. a RAFT policy) in float16. The sampler's ``name_or_path`` records ``source`` (used in
    shard fingerprints for vLLM models).
    """
    if backend == "hf":
        model, tokenizer = models.load_causal_lm(source, device=device, dtype=dtype)
        sampler: HFSampler | VLLMSampler = HFSampler(model, tokenizer, batch_size=batch_size)
    elif backend == "vllm":
        torch_dtype = models.resolve_dtype(dtype, device)
        llm_kwargs: dict[str, Any] = {"dtype": str(torch_dtype).removeprefix("torch.")}
        if gpu_memory_utilization:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        sampler = VLLMSampler(str(models.resolve_model(source)), **llm_kwargs)
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


def release_sampler(sampler: Any) -> None:
    """Free what ``sampler`` holds on the accelerator: a vLLM engine is shut down (:meth:`VLLMSampler.close`);
    then garbage is collected and the CUDA cache emptied (GPU only). Drop your own references to it too."""
    close = getattr(sampler, "close", None)
    if callable(close):
        close()
    free_accelerator_memory()
