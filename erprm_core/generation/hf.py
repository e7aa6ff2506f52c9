"""The Hugging Face sampling backend: a hand-written batched decoding loop, fast on CPU and GPU.

Prompts of different lengths are batched together with left padding (attention mask AND position ids), the
KV cache (a ``DynamicCache`` whose layers write into buffers allocated once, instead of concatenating the whole
cache at every token) is reused across steps, a row stops at EOS or once it has written a complete
final-answer line ("The answer is: ..." or "#### ..." followed by a newline), finished rows are dropped from
the batch (once they are a fifth of it: each drop copies the cache), and every prompt is run ONCE and shared by
its ``n`` samples instead of paying for the prompt ``n`` times. For the standard decoder architectures (Llama, Mistral
without sliding window, Qwen2/3) the sharing goes down to the attention: the prompt's keys/values are stored
once and each decoding step reads them once for all its samples (:mod:`erprm_core.generation.prefix_cache`);
other models get the prompt's cache rows copied to their samples.

Reproducibility. Every sequence (row) draws its randomness from its own seed,
``row_seed(seed, kind, problem_id, sample_index[, step, j])``: one uniform number per decoding step from a
``torch.Generator`` seeded with it, used for inverse-CDF sampling over the (temperature-scaled, top-p
filtered) next-token distribution. The random numbers therefore do not depend on batch size, batch
composition, shard layout, device or process history. Guaranteed: the same inputs, seed, batch size and
shard size on the same CPU give identical records (the resume tests rely on this). Across batch sizes (or CPU
vs GPU) the random numbers are still identical but the logits may differ in the last float bits (different
padding and matmul shapes), so a token may change only when its uniform falls within ~1e-6 of a CDF boundary;
the tests check that batch size 1 and a large batch give identical records on the tiny model, and that
shared-prefix attention gives the same records as the plain expanded cache.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from erprm_core import io
from erprm_core.generation.lean_decode import LeanDecoder, supports_lean_decode
from erprm_core.generation.prefix_cache import (
    ACTIVE_CACHE,
    preallocated_layer_class,
    register_shared_prefix_attention,
    shared_prefix_layer_class,
    supports_shared_prefix,
)
from erprm_core.sampler import Generation, check_sampling_params, cut_at_answer_line, row_seed

if TYPE_CHECKING:  # torch is imported where it is used
    import torch


def sample_next(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Next token per row by inverse-CDF sampling with one uniform per row (greedy when temperature is 0)."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p  # the most likely token is always kept
        cdf = (sorted_p * keep).cumsum(dim=-1)
    else:
        order, cdf = None, probs.cumsum(dim=-1)
    total = cdf[:, -1]
    # u in [0, 1) times the total mass, kept strictly below it so a zero-probability tail is never picked.
    target = torch.minimum(
        uniforms.to(cdf.device, cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    target = target.unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        index = order.gather(1, index)
    return index.squeeze(1)


class HFSampler:
    """Batched sampling from a Hugging Face causal LM with a shared-prompt KV cache.

    ``generate(prompts, n, keys, ...)`` returns ``n`` :class:`Generation` per prompt. Prompts are sorted by
    length and packed into batches of at most ``batch_size`` sequences (a prompt with ``n > batch_size``
    samples is split into several groups); each batch runs its distinct prompts once (left padded), shares
    them with their samples, then decodes token by token, dropping finished rows. ``shared_prefix``:
    ``"auto"`` (shared-prefix attention where supported, see the module docstring), True or False (copy the
    prompt's cache rows to each sample). ``lean``: ``"auto"`` (with shared-prefix attention on a Llama-family
    model, decoding steps run through :class:`~erprm_core.generation.lean_decode.LeanDecoder`: the same
    operations on the model's weights without the HF modules' Python, bit-identical and ~1.4x faster on
    the tiny policy), True or False. ``stats`` counts prompt and generated tokens, forward passes and
    sequences.
    """

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 64, shared_prefix: bool | str = "auto",
        lean: bool | str = "auto",
    ):  # fmt: skip
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.device = next(model.parameters()).device
        eos: set[int] = set()
        for source in (getattr(tokenizer, "eos_token_id", None), _generation_eos(model)):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(i) for i in source)
        self.eos_ids = torch.tensor(sorted(eos) or [-1], device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(eos) if eos else 0))
        # Which vocabulary entries contain a newline: only those can complete an answer line.
        vocab_size = max(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or 0))
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        has_nl = torch.zeros(vocab_size, dtype=torch.bool)
        has_nl[: len(texts)] = torch.tensor(["\n" in t for t in texts])
        self.newline_ids = has_nl.to(self.device)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = "logits_to_keep" in params
        if shared_prefix == "auto":
            shared_prefix = supports_shared_prefix(model) and self._plain_cache()
        self.shared_prefix = bool(shared_prefix)
        lean_ok = self.shared_prefix and supports_lean_decode(model)
        if lean == "auto":
            lean = lean_ok
        elif lean and not lean_ok:
            raise ValueError(
                "lean=True needs shared-prefix attention and a Llama-family model (supports_lean_decode)"
            )
        self.lean = LeanDecoder(model) if lean else None
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "forward_passes": 0, "sequences": 0}

    # -- one forward pass -------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_kw:
            kwargs["logits_to_keep"] = 1
        token = ACTIVE_CACHE.set(cache)
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        finally:
            ACTIVE_CACHE.reset(token)
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :]

    def _plain_cache(self) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

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
        """``n`` continuations of each prompt; sample ``j`` of prompt ``i`` uses ``row_seed(seed, *keys[i], j)``."""
        check_sampling_params(n, temperature, top_p, max_new_tokens, self.batch_size)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(keys)} seed keys")
        ids = [self.tokenizer(p).input_ids for p in prompts]
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"prompt {i} tokenises to nothing: {prompts[i]!r}")
        # Units of work: (prompt, first sample, number of samples), each at most batch_size samples.
        group = min(n, self.batch_size)
        units = [(i, s, min(group, n - s)) for i in range(len(prompts)) for s in range(0, n, group)]
        units.sort(key=lambda u: (len(ids[u[0]]), u[0], u[1]))  # similar lengths together: less padding
        batches: list[list[tuple[int, int, int]]] = []
        for unit in units:
            if batches and sum(u[2] for u in batches[-1]) + unit[2] <= self.batch_size:
                batches[-1].append(unit)
            else:
                batches.append([unit])
        out: list[list[Generation | None]] = [[None] * n for _ in prompts]
        with self._attention():
            self._run_batches(batches, ids, keys, seed, temperature, top_p, max_new_tokens, desc, out)
        return out  # type: ignore[return-value]

    @contextlib.contextmanager
    def _attention(self) -> Any:
        """Switch the model to shared-prefix attention for the duration of a ``generate`` call."""
        if not self.shared_prefix:
            yield
            return
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = register_shared_prefix_attention()
        try:
            yield
        finally:
            config._attn_implementation = before

    def _run_batches(self, batches, ids, keys, seed, temperature, top_p, max_new_tokens, desc, out) -> None:
        import torch

        for batch in io.progress(batches, desc=desc, unit="batch", leave=False):
            rows = [(i, s + j) for i, s, m in batch for j in range(m)]
            seeds = [row_seed(seed, *keys[i], j) for i, j in rows]
            with torch.inference_mode():
                gens = self._decode_batch([ids[i] for i, _, _ in batch], [m for _, _, m in batch], seeds,
                                          temperature, top_p, max_new_tokens)  # fmt: skip
            for (i, j), gen in zip(rows, gens, strict=True):
                out[i][j] = gen

    def _new_cache(self, width: int, max_new_tokens: int, prompt_mask: torch.Tensor) -> Any:
        """A DynamicCache whose layers write into buffers allocated once (no per-step copy of the cache);
        with shared-prefix attention, the prompts are stored once and shared by their samples."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if self.shared_prefix:
            layer_class = shared_prefix_layer_class()
            cache.layers = [layer_class(max_new_tokens, prompt_mask) for _ in cache.layers]
        elif cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            layer_class = preallocated_layer_class()
            cache.layers = [layer_class(width + max_new_tokens) for _ in cache.layers]
        return cache

    def _decode_batch(
        self,
        prompt_ids: list[list[int]],
        repeats: list[int],
        seeds: list[int],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[Generation]:
        import torch

        dev = self.device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width + max_new_tokens), dtype=torch.long)
        for r, p in enumerate(prompt_ids):  # left padding
            input_ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) : width] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask[:, :width].cumsum(dim=1) - 1).clamp_(min=0)
        cache = self._new_cache(width, max_new_tokens, mask[:, :width])
        logits = self._forward(input_ids, mask[:, :width], positions, cache)
        self.stats["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        # Share each prompt's cache among its samples (one prompt forward, not one per sample).
        expand = torch.repeat_interleave(torch.arange(len(prompt_ids)), torch.tensor(repeats)).to(dev)
        if len(expand) != len(prompt_ids):
            cache.batch_select_indices(expand)
            logits, mask, positions = logits[expand], mask[expand], positions[expand]
        n_rows = len(seeds)
        self.stats["sequences"] += n_rows
        uniforms = torch.stack(
            [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )  # fmt: skip
        next_pos = positions[:, -1]
        rows = list(range(n_rows))  # original row of each batch row; -1 once it finished (a dead row)
        n_dead = 0
        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        checked = [0] * n_rows  # chars of each row's text already searched for an answer line
        results: list[Generation | None] = [None] * n_rows
        for step in range(max_new_tokens):
            nxt = sample_next(logits, uniforms[[max(r, 0) for r in rows], step], temperature, top_p)
            nxt_l = nxt.tolist()
            eos_l = torch.isin(nxt, self.eos_ids).tolist()
            nl_l = self.newline_ids[nxt].tolist()
            for b, row in enumerate(rows):
                if row < 0:
                    continue
                self.stats["generated_tokens"] += 1
                if eos_l[b]:
                    results[row] = self._finish(tokens[row], len(tokens[row]) + 1, "eos")
                    rows[b], n_dead = -1, n_dead + 1
                    continue
                tokens[row].append(nxt_l[b])
                if nl_l[b]:
                    text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                    cut = cut_at_answer_line(text, checked[row])
                    if cut is not None:
                        results[row] = Generation(text[:cut], len(tokens[row]), "answer")
                        rows[b], n_dead = -1, n_dead + 1
                        continue
                    checked[row] = text.rfind("\n") + 1
            if n_dead == len(rows) or step == max_new_tokens - 1:
                break
            # Drop finished rows from the batch once they are a fifth of it (each drop copies the cache once;
            # until then they ride along and their tokens are ignored).
            if n_dead and n_dead * 5 >= len(rows):
                keep = [b for b, row in enumerate(rows) if row >= 0]
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                rows, n_dead = [rows[b] for b in keep], 0
            next_pos = next_pos + 1
            mask[:, width + step] = 1
            if self.lean is not None:
                logits = self.lean.step(nxt, next_pos, cache)
                self.stats["forward_passes"] += 1
            else:
                # shared-prefix attention masks itself; the expanded cache needs the padding mask
                step_mask = None if self.shared_prefix else mask[:, : width + step + 1]
                logits = self._forward(nxt.unsqueeze(1), step_mask, next_pos.unsqueeze(1), cache)
        for row in rows:
            if row >= 0:
                results[row] = self._finish(tokens[row], len(tokens[row]), "length")
        return results  # type: ignore[return-value]

    def _finish(self, token_ids: list[int], n_tokens: int, finish: str) -> Generation:
        return Generation(self.tokenizer.decode(token_ids, skip_special_tokens=True), n_tokens, finish)


def _generation_eos(model: Any) -> Any:
    config = getattr(model, "generation_config", None)
    return getattr(config, "eos_token_id", None) if config is not None else None
