"""The vLLM sampling backend (optional extra ``pip install -e .[vllm]``; prefix caching on).

It offers the interface of :class:`erprm_core.sampler.Sampler`; paper-scale runs use it. vLLM is imported
when a :class:`VLLMSampler` is made, so this module imports without it. One seed per request (prompt),
``row_seed(seed, kind, key...)``, reproducible as far as vLLM is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erprm_core.sampler import Generation, check_sampling_params, cut_at_answer_line, row_seed

_VLLM_HINT = (
    "backend='vllm' needs the optional vLLM extra: install it with `pip install -e .[vllm]` (GPU machine)"
)


class VLLMSampler:
    """The same ``generate`` interface on vLLM (prefix caching on; ``SamplingParams(n=..., seed=...)``).

    ``model`` is a ``vllm.LLM`` or a model name/path (an LLM is then built with ``enable_prefix_caching``).
    One seed per prompt: ``row_seed(seed, *key)``. vLLM cannot stop on a regular expression, so a
    continuation is cut after its first complete answer line afterwards (the tokens after it are wasted).
    """

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 0, **llm_kwargs: Any):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(_VLLM_HINT) from exc
        self._vllm = vllm
        if isinstance(model, str | Path):
            llm_kwargs.setdefault("enable_prefix_caching", True)
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
        outputs = self.llm.generate(list(prompts), params, use_tqdm=True)
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
