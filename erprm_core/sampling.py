"""Solution sampling and per-step Monte Carlo completions (the 01_rollouts stage), HF and vLLM backends.

Two jobs, one decoding engine:

* :func:`sample_solutions` draws ``n`` solutions per problem from a policy, splits them into steps
  (:func:`erprm_core.steps.split_steps`) and grades them (:mod:`erprm_core.grading`).
* :func:`rollout_completions` draws ``k`` completions of every step prefix of every solution except the
  last step and grades each one: ``completion_rewards[i][j]`` is 1 when prefix ``i`` followed by completion
  ``j`` reaches the reference answer. These are the Monte Carlo samples behind every step label (02_labels).
* :func:`run_rollouts` is the stage function of notebook 01: both of the above over shards of problems
  (written atomically, resumable), merged into ``rollouts.jsonl``, plus an audit.

The Hugging Face backend (``backend="hf"``) is a hand-written decoding loop, fast on CPU and GPU: prompts of
different lengths are batched together with left padding (attention mask AND position ids), the KV cache
(a ``DynamicCache`` whose layers write into buffers allocated once, instead of concatenating the whole cache at
every token) is reused across steps, a row stops at EOS or once it has written a complete final-answer line
("The answer is: ..." or "#### ..." followed by a newline), finished rows are dropped from the batch (once they
are a fifth of it: each drop copies the cache), and every prompt is run ONCE and shared by its ``n`` samples
instead of paying for the prompt ``n`` times. For the standard decoder architectures (Llama, Mistral without
sliding window, Qwen2/3) the sharing goes down to the attention: the prompt's keys/values are stored once and
each decoding step reads them once for all its samples (a registered transformers attention function,
"erprm_shared_prefix"); other models get the prompt's cache rows copied to their samples. The vLLM
backend (``backend="vllm"``, optional extra ``pip install -e .[vllm]``) offers the same interface with prefix
caching on; it is what paper-scale runs use.

Reproducibility (HF backend). Every sequence (row) draws its randomness from its own seed,
``row_seed(seed, kind, problem_id, sample_index[, step, j])``: one uniform number per decoding step from a
``torch.Generator`` seeded with it, used for inverse-CDF sampling over the (temperature-scaled, top-p
filtered) next-token distribution. The random numbers therefore do not depend on batch size, batch
composition, shard layout, device or process history. Guaranteed: the same inputs, seed, batch size and
shard size on the same CPU give identical records (the resume tests rely on this). Across batch sizes (or CPU
vs GPU) the random numbers are still identical but the logits may differ in the last float bits (different
padding and matmul shapes), so a token may change only when its uniform falls within ~1e-6 of a CDF boundary;
the tests check that batch size 1 and a large batch give identical records on the tiny model, and that
shared-prefix attention gives the same records as the plain expanded cache.
vLLM: one seed per request (prompt), ``row_seed(seed, kind, key...)``, reproducible as far as vLLM is.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erprm_core import artifacts
from erprm_core.steps import policy_prompt, split_steps

if TYPE_CHECKING:  # torch is imported where it is used: 02_labels needs none of it
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_LINE",
    "Generation",
    "HFSampler",
    "VLLMSampler",
    "RolloutResult",
    "ROLLOUT_COLUMNS",
    "make_sampler",
    "load_sampler",
    "row_seed",
    "sample_solutions",
    "rollout_completions",
    "completion_prefix",
    "run_rollouts",
    "rollout_audit",
    "rollout_stats",
    "rollout_summary_table",
    "prefix_table",
    "model_fingerprint",
    "read_rollouts",
    "LABEL_COLUMNS",
    "LabelResult",
    "label_records",
    "run_labels",
    "label_statistics",
    "label_distribution",
    "pick_worked_example",
    "worked_example_table",
]

# A complete final-answer line stops a row: "The answer is: 72" (MetaMath, the tiny task) or "#### 72" (GSM8K).
ANSWER_LINE = re.compile(r"^\s*(?:The answer is\b|####)")

# Columns every rollout record has (schema "rollout" of the kit); extra columns are kept for audits.
ROLLOUT_COLUMNS = (
    "problem_id",
    "question",
    "answer",
    "task",
    "sample_index",
    "steps",
    "pred",
    "outcome",
    "truncated",
    "completion_rewards",
    "n_tokens",
)


def row_seed(seed: int, *key: Any) -> int:
    """A stable 63-bit seed for one sequence, from the base ``seed`` and a key (ids, indices).

    Uses SHA-256 of the key's text, so it is the same in every process and Python version (no ``hash()``).
    """
    text = "|".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


@dataclass
class Generation:
    """One sampled continuation: its text, how many tokens it took and why it stopped.

    ``finish`` is ``"answer"`` (a complete final-answer line was written; the text ends with that line),
    ``"eos"`` (end-of-sequence token) or ``"length"`` (hit ``max_new_tokens``: truncated).
    """

    text: str
    n_tokens: int
    finish: str

    @property
    def truncated(self) -> bool:
        """True when the continuation was cut at the token limit."""
        return self.finish == "length"


def _cut_at_answer_line(text: str, start: int = 0) -> int | None:
    """Index just past the first complete answer line at or after char ``start`` (the newline excluded)."""
    pos = start
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            return None
        line_start = text.rfind("\n", 0, nl) + 1
        if ANSWER_LINE.match(text[line_start:nl]):
            return nl
        pos = nl + 1


def _sample_next(
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


def _check_params(n: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ----------------------------------------------------------------------------------------------------
# Hugging Face backend
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _preallocated_layer_class() -> type:
    """The KV-cache layer class used by :class:`HFSampler` (built on first use: transformers loads lazily)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A KV-cache layer writing into buffers sized once for prompt + new tokens (DynamicLayer API).

        transformers' DynamicLayer concatenates the whole cache at every step (a copy per token); this layer
        writes the new keys/values in place and returns views, so a decoding step costs no cache copy.
        """

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = int(capacity)
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Allocate the buffers on the first update (shape, dtype and device from the first keys)."""
            b, h, _, d = key_states.shape
            self.device, self.dtype = key_states.device, key_states.dtype
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[3]))
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            """Write the new states after the cached ones; return views of everything cached so far."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            return self.keys, self.values

        @property
        def keys(self) -> torch.Tensor:
            """The cached keys, ``[batch, heads, length, head_dim]`` (a view); None before the first update."""
            return self._k[:, :, : self.length] if self.is_initialized else None

        @keys.setter
        def keys(self, value: Any) -> None:  # DynamicLayer.__init__/reset assign None
            if value is not None:
                raise AttributeError("assign through update()")

        @property
        def values(self) -> torch.Tensor:
            """The cached values (a view); None before the first update."""
            return self._v[:, :, : self.length] if self.is_initialized else None

        @values.setter
        def values(self, value: Any) -> None:
            if value is not None:
                raise AttributeError("assign through update()")

        def get_seq_length(self) -> int:
            """Tokens cached so far."""
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep (or repeat) the rows ``indices`` of the batch (copies the filled part only)."""
            if not self.is_initialized:
                return
            k = self._k.new_empty((len(indices), *self._k.shape[1:]))
            v = self._v.new_empty((len(indices), *self._v.shape[1:]))
            k[:, :, : self.length] = self._k[indices, :, : self.length]
            v[:, :, : self.length] = self._v[indices, :, : self.length]
            self._k, self._v = k, v

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Repeat every row ``repeats`` times."""
            if self.is_initialized:
                self.batch_select_indices(
                    torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
                )

    return PreallocatedLayer


# ----------------------------------------------------------------------------------------------------
# Shared-prefix attention: the k samples of a prompt read ONE copy of the prompt's keys/values
# ----------------------------------------------------------------------------------------------------

SHARED_PREFIX_ATTENTION = "erprm_shared_prefix"
_SHARED_PREFIX_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_ACTIVE_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("erprm_active_cache", default=None)


@functools.cache
def _shared_prefix_layer_class() -> type:
    """The cache layer of shared-prefix decoding (built on first use: transformers loads lazily)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """KV cache of one layer: the prompts' keys ONCE (``[P, kv_heads, T_prompt, d]``) + per-row new keys.

        ``group[b]`` is the prompt of batch row ``b``. Selecting rows (copying a prompt to its samples,
        dropping finished rows) only re-indexes ``group`` and the small per-row part: the prompt part is
        never copied k times. :func:`_shared_prefix_attention` reads this layout.
        """

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, capacity: int, prompt_mask: torch.Tensor):
            super().__init__()
            self.capacity = int(capacity)  # new tokens per row
            self.prompt_mask = prompt_mask.bool()  # [P, T_prompt]: False on left padding
            self.prefix_k = self.prefix_v = None
            self.length = 0  # new tokens cached per row
            self.group = torch.arange(prompt_mask.shape[0], device=prompt_mask.device)
            self._index()

        def _index(self) -> None:
            # Rows of one prompt are contiguous; slot j of prompt p is row index p * m + j in a padded layout.
            counts = torch.bincount(self.group, minlength=self.prompt_mask.shape[0])
            self.m = max(int(counts.max()), 1) if len(self.group) else 1
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(self.group), device=self.group.device) - starts[self.group]
            self.pad_index = self.group * self.m + slot

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Keep the prompts' keys/values (the prefill) as the shared prefix."""
            self.device, self.dtype = key_states.device, key_states.dtype
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            """Prefill: store the prompts' states; decoding: append one token per row."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.prefix_k is None:
                self.prefix_k, self.prefix_v = key_states, value_states
                return key_states, value_states
            if self.length == 0:
                b, h, _, d = key_states.shape
                self._k = key_states.new_empty((b, h, self.capacity, d))
                self._v = value_states.new_empty(
                    (b, value_states.shape[1], self.capacity, value_states.shape[3])
                )
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} new tokens)")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            return self._k[:, :, :end], self._v[:, :, :end]

        def get_seq_length(self) -> int:
            """Prompt width + new tokens."""
            return (0 if self.prefix_k is None else self.prefix_k.shape[-2]) + self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep (or repeat) rows ``indices``; prompts left without rows are dropped from the prefix."""
            group = self.group[indices]
            used = torch.unique(group)
            if len(used) < self.prompt_mask.shape[0] and self.prefix_k is not None:
                remap = torch.zeros(self.prompt_mask.shape[0], dtype=torch.long, device=group.device)
                remap[used] = torch.arange(len(used), device=group.device)
                self.prefix_k, self.prefix_v = self.prefix_k[used], self.prefix_v[used]
                self.prompt_mask = self.prompt_mask[used]
                group = remap[group]
            self.group = group
            if self.length:
                k = self._k.new_empty((len(indices), *self._k.shape[1:]))
                v = self._v.new_empty((len(indices), *self._v.shape[1:]))
                k[:, :, : self.length] = self._k[indices, :, : self.length]
                v[:, :, : self.length] = self._v[indices, :, : self.length]
                self._k, self._v = k, v
            self._index()

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Repeat every row ``repeats`` times."""
            self.batch_select_indices(
                torch.arange(len(self.group), device=self.group.device).repeat_interleave(repeats)
            )

    return SharedPrefixLayer


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for shared-prefix decoding (registered with transformers' AttentionInterface).

    Prefill goes to the standard SDPA path. A decoding step splits the keys into the prompt part, read once
    per prompt for all its rows (``[P, kv_heads, m * groups, T]`` matmuls), and each row's own new tokens;
    one softmax over both parts; grouped-query heads as in ``repeat_kv``.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = _ACTIVE_CACHE.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if layer is None or getattr(layer, "prefix_k", None) is None or layer.length == 0 or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    b, h, _, d = query.shape
    kp, vp = layer.prefix_k, layer.prefix_v  # [P, hk, T, d]
    p, hk, t, _ = kp.shape
    g, m = h // hk, layer.m
    scale = scaling if scaling is not None else d**-0.5
    q = query.view(b, hk, g, d)
    # prompt part: scatter rows into a padded [P, m] layout, one matmul per (prompt, kv head)
    qp = q.new_zeros((p * m, hk, g, d))
    qp[layer.pad_index] = q
    qp = qp.view(p, m, hk, g, d).permute(0, 2, 1, 3, 4).reshape(p, hk, m * g, d)
    sp = torch.matmul(qp, kp.transpose(-1, -2)).float() * scale  # [P, hk, m*g, T]
    sp = sp.masked_fill(~layer.prompt_mask[:, None, None, :], float("-inf"))
    sp = sp.view(p, hk, m, g, t).permute(0, 2, 1, 3, 4).reshape(p * m, hk, g, t)[layer.pad_index]
    # new tokens of each row
    ss = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, hk, g, L]
    w = torch.softmax(torch.cat([sp, ss], dim=-1), dim=-1).to(query.dtype)
    wp, ws = w[..., :t], w[..., t:]
    wpp = wp.new_zeros((p * m, hk, g, t))
    wpp[layer.pad_index] = wp
    wpp = wpp.view(p, m, hk, g, t).permute(0, 2, 1, 3, 4).reshape(p, hk, m * g, t)
    op = torch.matmul(wpp, vp).view(p, hk, m, g, d).permute(0, 2, 1, 3, 4).reshape(p * m, hk, g, d)
    out = op[layer.pad_index] + torch.matmul(ws, value)  # [B, hk, g, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


@functools.cache
def _register_shared_prefix_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
    return SHARED_PREFIX_ATTENTION


def _supports_shared_prefix(model: Any) -> bool:
    """Shared-prefix attention is used for the standard decoder architectures it was checked on."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    config = getattr(model, "config", None)
    return (
        isinstance(model, PreTrainedModel)
        and getattr(config, "model_type", None) in _SHARED_PREFIX_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", SHARED_PREFIX_ATTENTION)
        and not getattr(config, "sliding_window", None)
    )


class HFSampler:
    """Batched sampling from a Hugging Face causal LM with a shared-prompt KV cache.

    ``generate(prompts, n, keys, ...)`` returns ``n`` :class:`Generation` per prompt. Prompts are sorted by
    length and packed into batches of at most ``batch_size`` sequences (a prompt with ``n > batch_size``
    samples is split into several groups); each batch runs its distinct prompts once (left padded), shares
    them with their samples, then decodes token by token, dropping finished rows. ``shared_prefix``:
    ``"auto"`` (shared-prefix attention where supported, see the module docstring), True or False (copy the
    prompt's cache rows to each sample). ``stats`` counts prompt and generated tokens, forward passes and
    sequences.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, shared_prefix: bool | str = "auto"):
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
            shared_prefix = _supports_shared_prefix(model) and self._plain_cache()
        self.shared_prefix = bool(shared_prefix)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "forward_passes": 0, "sequences": 0}

    # -- one forward pass -------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_kw:
            kwargs["logits_to_keep"] = 1
        token = _ACTIVE_CACHE.set(cache)
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        finally:
            _ACTIVE_CACHE.reset(token)
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
        _check_params(n, temperature, top_p, max_new_tokens, self.batch_size)
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
        config._attn_implementation = _register_shared_prefix_attention()
        try:
            yield
        finally:
            config._attn_implementation = before

    def _run_batches(self, batches, ids, keys, seed, temperature, top_p, max_new_tokens, desc, out) -> None:
        import torch
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
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
            layer_class = _shared_prefix_layer_class()
            cache.layers = [layer_class(max_new_tokens, prompt_mask) for _ in cache.layers]
        elif cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            layer_class = _preallocated_layer_class()
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
            nxt = _sample_next(logits, uniforms[[max(r, 0) for r in rows], step], temperature, top_p)
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
                    cut = _cut_at_answer_line(text, checked[row])
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
            step_mask = None if self.shared_prefix else mask[:, : width + step + 1]  # shared: masks itself
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


# ----------------------------------------------------------------------------------------------------
# vLLM backend
# ----------------------------------------------------------------------------------------------------

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
        """``n`` continuations of each prompt (see :meth:`HFSampler.generate`)."""
        _check_params(n, temperature, top_p, max_new_tokens, 1)
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
                cut = _cut_at_answer_line(text)
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
        from erprm_core import models

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


# ----------------------------------------------------------------------------------------------------
# Solutions and completions
# ----------------------------------------------------------------------------------------------------


def _task_of(problem: dict[str, Any], task: str | None) -> str:
    found = task or problem.get("task")
    if not found:
        raise ValueError(f"problem {problem.get('id')!r} has no 'task' and no task= was given")
    return found


def sample_solutions(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
    task: str | None = None,
) -> list[dict[str, Any]]:
    """Sample ``n`` solutions per problem and grade them; one record per (problem, sample_index).

    A record holds ``problem_id, sample_index, text, steps, pred, outcome (0/1), truncated, n_tokens,
    finish``. ``temperature=0`` is greedy. The prompt is ``policy_prompt(question, prompt_template)``. Sample
    ``j`` of problem ``p`` is seeded by ``row_seed(seed, "solution", p["id"], j)`` (see the module docstring
    for what is reproducible). ``task`` overrides each problem's ``task`` for grading. ``model`` may also
    be a ready sampler (:func:`make_sampler`). Records come in problem order, then sample order.
    """
    from erprm_core import grading

    sampler = make_sampler(model, tokenizer, backend, batch_size)
    prompts = [policy_prompt(p["question"], prompt_template) for p in problems]
    keys = [("solution", p["id"]) for p in problems]
    gens = sampler.generate(prompts, n, keys, seed, temperature, top_p, max_new_tokens, desc="solutions")
    records = []
    for problem, per_problem in zip(problems, gens, strict=True):
        task_name = _task_of(problem, task)
        for j, gen in enumerate(per_problem):
            records.append(
                {
                    "problem_id": problem["id"],
                    "sample_index": j,
                    "text": gen.text,
                    "steps": split_steps(gen.text),
                    "pred": grading.extract_answer(gen.text, task_name),
                    "outcome": int(grading.is_correct(gen.text, problem["answer"], task_name)),
                    "truncated": gen.truncated,
                    "n_tokens": gen.n_tokens,
                    "finish": gen.finish,
                }
            )
    return records


def completion_prefix(question: str, steps: Sequence[str], i: int, prompt_template: str = "plain") -> str:
    """The text the completer continues for the prefix ending at step ``i`` (0-based).

    ``policy_prompt(question) + "\\n".join(steps[: i + 1]) + "\\n"``: the solution's first ``i + 1`` steps,
    one per line, then a newline so the completer starts the next step.
    """
    return policy_prompt(question, prompt_template) + "\n".join(steps[: i + 1]) + "\n"


def rollout_completions(
    model: Any,
    tokenizer: Any,
    solutions: Sequence[dict[str, Any]],
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
) -> list[dict[str, Any]]:
    """For each solution, ``k`` graded completions of every step prefix except the last.

    ``solutions`` are dicts with ``problem_id, sample_index, question, answer, task, steps``. Returns, per
    solution and in the same order, ``{"completion_rewards": [[0/1] * k per prefix], "completion_tokens":
    int, "completions_truncated": int}``. Completion ``j`` of prefix ``i`` is seeded by
    ``row_seed(seed, "completion", problem_id, sample_index, i, j)`` and graded on
    ``"\\n".join(steps[: i + 1]) + "\\n" + completion`` against the reference answer. All prefixes of all
    solutions are batched together; each prefix is run once and shared by its k completions.
    """
    from erprm_core import grading

    sampler = make_sampler(model, tokenizer, backend, batch_size)
    prompts, keys, owners = [], [], []
    for s_index, sol in enumerate(solutions):
        for i in range(len(sol["steps"]) - 1):
            prompts.append(completion_prefix(sol["question"], sol["steps"], i, prompt_template))
            keys.append(("completion", sol["problem_id"], sol["sample_index"], i))
            owners.append((s_index, i))
    out = [{"completion_rewards": [], "completion_tokens": 0, "completions_truncated": 0} for _ in solutions]
    if not prompts:
        return out
    gens = sampler.generate(prompts, k, keys, seed, temperature, top_p, max_new_tokens, desc="completions")
    for (s_index, i), per_prefix in zip(owners, gens, strict=True):
        sol = solutions[s_index]
        head = "\n".join(sol["steps"][: i + 1]) + "\n"
        rewards = [int(grading.is_correct(head + g.text, sol["answer"], sol["task"])) for g in per_prefix]
        rec = out[s_index]
        rec["completion_rewards"].append(rewards)
        rec["completion_tokens"] += sum(g.n_tokens for g in per_prefix)
        rec["completions_truncated"] += sum(g.truncated for g in per_prefix)
    return out


# ----------------------------------------------------------------------------------------------------
# The 01_rollouts stage
# ----------------------------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    """What :func:`run_rollouts` returns: the merged records, the audit and the compute accounting."""

    records: list[dict[str, Any]]
    audit: artifacts.Audit
    stats: dict[str, Any] = field(default_factory=dict)


def model_fingerprint(model: Any) -> str:
    """A short digest of a model's config and weights (detects a retrained policy between runs)."""
    if not hasattr(model, "parameters"):
        return str(getattr(model, "name_or_path", type(model).__name__))
    import torch

    with torch.no_grad():
        sums = [float(p.detach().float().sum()) for p in model.parameters()]
    config = model.config.to_json_string() if hasattr(model, "config") else ""
    return hashlib.sha256((config + json.dumps(sums)).encode()).hexdigest()[:16]


def rollout_audit(records: Sequence[dict[str, Any]]) -> artifacts.Audit:
    """Counts of rollout records by what went wrong (nothing is dropped; every record is kept).

    Reasons: ``solutions`` (all), ``solution_no_answer`` (no parseable final answer), ``solution_truncated``
    (cut at the token limit), ``solution_one_step`` (no prefix to complete), ``prefixes`` and
    ``completions`` (all), ``completion_truncated`` (completions cut at the token limit).
    """
    audit = artifacts.Audit("01_rollouts")
    for rec in records:
        where = f"{rec['problem_id']}#{rec['sample_index']}"
        audit.count("solutions")
        if rec.get("pred") is None:
            audit.count("solution_no_answer", example=f"{where}: {' | '.join(rec['steps'])[-150:]}")
        if rec.get("truncated"):
            audit.count("solution_truncated", example=where)
        if not rec["steps"]:
            audit.count("solution_empty", example=where)
        elif len(rec["steps"]) == 1:
            audit.count("solution_one_step", example=f"{where}: {' | '.join(rec['steps'])}")
        n_prefix = len(rec["completion_rewards"])
        audit.count("prefixes", n_prefix)
        audit.count("completions", sum(len(r) for r in rec["completion_rewards"]))
        if rec.get("completions_truncated"):
            audit.count("completion_truncated", rec["completions_truncated"], example=where)
    return audit


def rollout_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token counts and accuracy figures of a rollout set (for the manifest and the notebook table)."""
    n = len(records)
    prefixes = [r for rec in records for r in rec["completion_rewards"]]
    return {
        "problems": len({rec["problem_id"] for rec in records}),
        "solutions": n,
        "solution_accuracy": sum(rec["outcome"] for rec in records) / n if n else float("nan"),
        "mean_steps": sum(len(rec["steps"]) for rec in records) / n if n else float("nan"),
        "prefixes": len(prefixes),
        "completions": sum(len(r) for r in prefixes),
        "completion_accuracy": (sum(map(sum, prefixes)) / sum(map(len, prefixes)))
        if prefixes
        else float("nan"),
        "solution_tokens": sum(rec["n_tokens"] for rec in records),
        "completion_tokens": sum(rec.get("completion_tokens", 0) for rec in records),
    }


def rollout_summary_table(stats: dict[str, Any]) -> Any:
    """Tidy ``metric, value`` table of :func:`rollout_stats` (wall time and this-run-only counts left out, so a
    resumed run and an uninterrupted one give the same table)."""
    import pandas as pd

    rows = [
        {"metric": key, "value": float(val)}
        for key, val in stats.items()
        if key != "wall_s" and not key.startswith("computed_")
    ]
    return pd.DataFrame(rows, columns=["metric", "value"])


def prefix_table(records: Sequence[dict[str, Any]]) -> Any:
    """One row per completed prefix: ``problem_id, sample_index, step`` (1-based prefix length), ``n_steps``,
    ``outcome`` (of the whole solution), ``k``, ``n_correct`` and ``p`` (fraction of completions correct)."""
    import pandas as pd

    rows = [
        {
            "problem_id": rec["problem_id"],
            "sample_index": rec["sample_index"],
            "step": i + 1,
            "n_steps": len(rec["steps"]),
            "outcome": rec["outcome"],
            "k": len(rewards),
            "n_correct": sum(rewards),
            "p": sum(rewards) / len(rewards),
        }
        for rec in records
        for i, rewards in enumerate(rec["completion_rewards"])
    ]
    cols = ["problem_id", "sample_index", "step", "n_steps", "outcome", "k", "n_correct", "p"]
    return pd.DataFrame(rows, columns=cols)


def run_rollouts(
    out: artifacts.ProfilePaths | str,
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    n_solutions: int = 4,
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    shard_size: int = 16,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
    completer: Any = None,
    completer_tokenizer: Any = None,
    on_shard: Callable[[int], None] | None = None,
) -> RolloutResult:
    """The 01_rollouts stage: solutions, step-prefix completions, grading, shards, merge, audit.

    ``out`` is a profile name or its :class:`~erprm_core.artifacts.ProfilePaths`. Problems are processed
    in shards of ``shard_size`` under ``out.rollouts`` (atomic files; a rerun reuses finished shards and
    recomputes corrupt ones; a change of any parameter, problem set or model discards old shards). For each
    problem: ``n_solutions`` solutions from ``model`` and, for each step prefix but the last, ``k``
    completions from ``completer`` (default: the policy itself, pi_0). Every random draw is seeded per
    problem/sample/step, so an interrupted-and-resumed run writes the same ``rollouts.jsonl`` as an
    uninterrupted one. ``on_shard(index)`` is called after each computed shard (tests use it).
    """
    paths = artifacts.paths(out) if isinstance(out, str) else out
    if not problems:
        raise ValueError("no problems to roll out")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"problem ids must be unique (seeds are per id); duplicated: {dup}")
    if shard_size < 1 or k < 1 or n_solutions < 1:
        raise ValueError(f"shard_size, k and n_solutions must be >= 1 (got {shard_size}, {k}, {n_solutions})")
    policy = make_sampler(model, tokenizer, backend, batch_size)
    if completer is None:
        comp = policy
    else:
        comp = make_sampler(completer, completer_tokenizer or tokenizer, backend, batch_size)
    settings = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    batch_size=batch_size, prompt_template=prompt_template)  # fmt: skip
    fingerprint = {
        **settings,
        "n_solutions": n_solutions,
        "k": k,
        "shard_size": shard_size,
        "backend": backend,
        "problems": hashlib.sha256(json.dumps(list(problems), sort_keys=True).encode()).hexdigest()[:16],
        "policy": model_fingerprint(getattr(policy, "model", policy)),
        "completer": "policy" if completer is None else model_fingerprint(getattr(comp, "model", comp)),
    }
    artifacts.prepare_shard_folder(paths.rollouts, fingerprint)

    def compute(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        sols = sample_solutions(policy, None, chunk, n_solutions, temperature, top_p, max_new_tokens, seed,
                                batch_size, prompt_template, backend)  # fmt: skip
        by_id = {p["id"]: p for p in chunk}
        records = []
        for sol in sols:
            p = by_id[sol["problem_id"]]
            records.append({"problem_id": p["id"], "question": p["question"], "answer": p["answer"],
                            "task": p["task"], "sample_index": sol["sample_index"], "steps": sol["steps"],
                            "pred": sol["pred"], "outcome": sol["outcome"], "truncated": sol["truncated"],
                            "n_tokens": sol["n_tokens"]})  # fmt: skip
        comps = rollout_completions(comp, None, records, k, temperature, top_p, max_new_tokens, seed,
                                    batch_size, prompt_template, backend)  # fmt: skip
        for rec, extra in zip(records, comps, strict=True):
            rec.update(extra)
        if on_shard is not None:
            on_shard(index)
        return records

    t0 = time.perf_counter()
    records = artifacts.run_sharded(
        list(problems), shard_size, paths.rollouts, compute, ROLLOUT_COLUMNS, "rollouts"
    )
    wall = time.perf_counter() - t0
    artifacts.atomic_write_jsonl(paths.rollouts_file, records)
    stats = rollout_stats(records)
    computed = {
        key: policy.stats[key] + (comp.stats[key] if comp is not policy else 0)
        for key in ("generated_tokens", "prompt_tokens", "forward_passes")
    }
    stats.update({f"computed_{key}": val for key, val in computed.items()}, wall_s=round(wall, 3))
    return RolloutResult(records, rollout_audit(records), stats)


def read_rollouts(path: Path | str) -> list[dict[str, Any]]:
    """Read a rollouts file, checking every record's columns and shapes (errors name file and line)."""
    path = Path(path)
    records = artifacts.read_jsonl(path, ROLLOUT_COLUMNS)
    with path.open(encoding="utf-8") as fh:
        line_numbers = [n for n, line in enumerate(fh, start=1) if line.strip()]
    for lineno, rec in zip(line_numbers, records, strict=True):
        steps, rewards = rec["steps"], rec["completion_rewards"]
        if not isinstance(steps, list) or not isinstance(rewards, list):
            raise artifacts.ArtifactError(f"{path}:{lineno}: 'steps' and 'completion_rewards' must be lists")
        if steps and len(rewards) != len(steps) - 1:
            raise artifacts.ArtifactError(
                f"{path}:{lineno}: {len(steps)} steps need {len(steps) - 1} completion lists, got {len(rewards)}"
            )
        if rec["outcome"] not in (0, 1):
            raise artifacts.ArtifactError(f"{path}:{lineno}: outcome must be 0 or 1, got {rec['outcome']!r}")
    return records


# ----------------------------------------------------------------------------------------------------
# The 02_labels stage (from ONE rollouts file)
# ----------------------------------------------------------------------------------------------------

LABEL_COLUMNS = ("problem_id", "question", "steps", "outcome", "labels")


@dataclass
class LabelResult:
    """What :func:`run_labels` returns: the stepwise label records, their audit and the rule names."""

    records: list[dict[str, Any]]
    audit: artifacts.Audit
    rules: list[str]
    rollouts: list[dict[str, Any]] = field(default_factory=list)


def label_records(
    rollouts: Sequence[dict[str, Any]], etas: Sequence[float], audit: artifacts.Audit | None = None
) -> list[dict[str, Any]]:
    """Stepwise labels of every rollout for every eta (plus ``orm``), with :func:`labels.stepwise_labels`.

    One output record per rollout with at least one step: ``problem_id, sample_index, question, answer,
    task, steps, outcome, labels: {rule: [label per step]}`` (one label per step, the last = the outcome;
    the ORM rule labels only the last step, others are None). Rollouts without any step cannot be labelled:
    they are counted in ``audit`` as ``skipped_no_steps``; a rollout whose completion lists do not match its
    steps raises ValueError naming it.
    """
    from erprm_core import labels

    audit = audit if audit is not None else artifacts.Audit("02_labels")
    out = []
    for rec in rollouts:
        where = f"{rec['problem_id']}#{rec.get('sample_index')}"
        if not rec["steps"]:
            audit.count("skipped_no_steps", example=where)
            continue
        if len(rec["completion_rewards"]) != len(rec["steps"]) - 1:
            raise ValueError(
                f"rollout {where}: {len(rec['steps'])} steps but {len(rec['completion_rewards'])} completion lists"
            )
        audit.count("labelled_solutions")
        audit.count("labelled_steps", len(rec["steps"]))
        out.append(
            {
                "problem_id": rec["problem_id"],
                "sample_index": rec.get("sample_index"),
                "question": rec["question"],
                "answer": rec.get("answer"),
                "task": rec.get("task"),
                "steps": rec["steps"],
                "outcome": int(rec["outcome"]),
                "labels": labels.stepwise_labels(rec["completion_rewards"], rec["outcome"], list(etas)),
            }
        )
    return out


def run_labels(
    out: artifacts.ProfilePaths | str, etas: Sequence[float], rollouts_file: Path | str | None = None
) -> LabelResult:
    """The 02_labels stage: read ONE rollouts file, label every step for every rule, write the labels file.

    ``rollouts_file`` defaults to the profile's ``rollouts.jsonl`` (an error names 01_rollouts when missing);
    the output goes atomically to the profile's ``labels.jsonl``. Every rule comes from the same rollouts:
    only the label rule changes.
    """
    paths = artifacts.paths(out) if isinstance(out, str) else out
    source = Path(rollouts_file) if rollouts_file else paths.rollouts_file
    artifacts.require(source, "01_rollouts", paths.profile, "rollouts")
    audit = artifacts.Audit("02_labels")
    rollouts = read_rollouts(source)
    records = label_records(rollouts, etas, audit)
    artifacts.atomic_write_jsonl(paths.labels_file, records)
    rules = list(records[0]["labels"]) if records else []
    return LabelResult(records, audit, rules, rollouts)


def _rule_eta_or_nan(rule: str) -> float:
    from erprm_core import labels

    try:
        return labels.rule_eta(rule)
    except ValueError:
        return float("nan")


def label_statistics(records: Sequence[dict[str, Any]]) -> Any:
    """Tidy table of label statistics per rule: ``rule, eta, metric, value``.

    Metrics over the labelled steps of each rule (the ORM: last steps only): ``n_labels``, ``mean``, ``std``,
    ``share_zero`` (label 0), ``share_one`` (label 1), ``share_between`` (strictly inside (0, 1)),
    ``mean_first_step`` (label of the first step), and ``mean_gap_to_soft`` (mean label minus the soft label
    on the same steps: how far a rule moves labels up from the Monte Carlo mean).
    """
    import numpy as np
    import pandas as pd

    rules = list(records[0]["labels"]) if records else []
    soft = np.array([v for r in records for v in r["labels"].get("soft", [])], dtype=float)
    rows = []
    for rule in rules:
        vals = [v for r in records for v in r["labels"][rule] if v is not None]
        arr = np.array(vals, dtype=float)
        first = np.array(
            [r["labels"][rule][0] for r in records if r["labels"][rule][0] is not None], dtype=float
        )
        metrics = {
            "n_labels": float(arr.size),
            "mean": arr.mean() if arr.size else np.nan,
            "std": arr.std() if arr.size else np.nan,
            "share_zero": (arr == 0).mean() if arr.size else np.nan,
            "share_one": (arr == 1).mean() if arr.size else np.nan,
            "share_between": ((arr > 0) & (arr < 1)).mean() if arr.size else np.nan,
            "mean_first_step": first.mean() if first.size else np.nan,
        }
        if rule != "orm" and soft.size == arr.size and soft.size:
            metrics["mean_gap_to_soft"] = float((arr - soft).mean())
        eta = _rule_eta_or_nan(rule)
        rows += [{"rule": rule, "eta": eta, "metric": m, "value": float(v)} for m, v in metrics.items()]
    return pd.DataFrame(rows, columns=["rule", "eta", "metric", "value"])


def label_distribution(records: Sequence[dict[str, Any]], bins: int = 10) -> Any:
    """Tidy histogram of step labels per rule: ``rule, bin, lo, hi, count, share`` (bins of [0, 1]).

    0 and 1 get bins of their own (``bin`` "0" and "1"), the open interval (0, 1) is split in ``bins``
    equal bins, so the soft rule's spread and the hard rule's all-or-nothing labels are both visible.
    """
    import numpy as np
    import pandas as pd

    edges = np.linspace(0.0, 1.0, bins + 1)
    rules = list(records[0]["labels"]) if records else []
    rows = []
    for rule in rules:
        arr = np.array([v for r in records for v in r["labels"][rule] if v is not None], dtype=float)
        total = max(arr.size, 1)
        rows.append({"rule": rule, "bin": "0", "lo": 0.0, "hi": 0.0, "count": int((arr == 0).sum())})
        inner = arr[(arr > 0) & (arr < 1)]
        counts, _ = np.histogram(inner, bins=edges)
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
            rows.append({"rule": rule, "bin": f"({lo:.1f},{hi:.1f})", "lo": lo, "hi": hi, "count": int(c)})
        rows.append({"rule": rule, "bin": "1", "lo": 1.0, "hi": 1.0, "count": int((arr == 1).sum())})
        for row in rows[-(bins + 2) :]:
            row["share"] = row["count"] / total
    return pd.DataFrame(rows, columns=["rule", "bin", "lo", "hi", "count", "share"])


def pick_worked_example(rollouts: Sequence[dict[str, Any]], min_steps: int = 3) -> dict[str, Any]:
    """A rollout that shows the rules disagreeing: the first (in file order) with >= ``min_steps`` steps and a
    prefix whose completions are mixed (0 < p < 1); failing that, the one with the most steps."""
    if not rollouts:
        raise ValueError("no rollouts to pick a worked example from")
    for rec in rollouts:
        mixed = any(0 < sum(r) < len(r) for r in rec["completion_rewards"])
        if len(rec["steps"]) >= min_steps and mixed:
            return rec
    return max(rollouts, key=lambda r: len(r["steps"]))


def worked_example_table(rollout: dict[str, Any], etas: Sequence[float], digits: int = 3) -> Any:
    """One solution step by step: the step, its completions' outcomes, p and the label each rule gives.

    Columns: ``step`` (1-based), ``text``, ``completions`` (e.g. "1 0 1 1"; the last step shows the
    solution's outcome), ``p`` (fraction correct), then one column per rule (rounded to ``digits``).
    """
    import pandas as pd

    from erprm_core import labels

    table = labels.stepwise_labels(rollout["completion_rewards"], rollout["outcome"], list(etas))
    rows = []
    for i, step in enumerate(rollout["steps"]):
        last = i == len(rollout["steps"]) - 1
        rewards = [rollout["outcome"]] if last else rollout["completion_rewards"][i]
        row = {
            "step": i + 1,
            "text": step,
            "completions": "outcome " + str(rollout["outcome"]) if last else " ".join(map(str, rewards)),
            "p": round(sum(rewards) / len(rewards), digits),
        }
        for rule, vals in table.items():
            row[rule] = None if vals[i] is None else round(vals[i], digits)
        rows.append(row)
    return pd.DataFrame(rows)
