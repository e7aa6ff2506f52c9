"""KV-cache layers and the shared-prefix attention of the HF sampler (``erprm_core.generation.hf``).

* :func:`preallocated_layer_class`: a cache layer that writes into buffers allocated once for prompt + new
  tokens, instead of concatenating the whole cache at every token.
* Shared-prefix decoding: the ``n`` samples of a prompt read ONE copy of the prompt's keys/values
  (:func:`shared_prefix_layer_class` stores it, a registered transformers attention function
  ``"erprm_shared_prefix"`` reads it), for the standard decoder architectures (Llama, Mistral without sliding
  window, Qwen2/3: :func:`supports_shared_prefix`).

transformers and torch are imported inside the class builders (transformers loads lazily).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any


@functools.cache
def preallocated_layer_class() -> type:
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


# Shared-prefix attention: the k samples of a prompt read ONE copy of the prompt's keys/values
SHARED_PREFIX_ATTENTION = "erprm_shared_prefix"
_SHARED_PREFIX_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
# The cache of the running forward pass, read by the attention function.
ACTIVE_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("erprm_active_cache", default=None)


@functools.cache
def shared_prefix_layer_class() -> type:
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
                # contiguous once here: the projections' views would be copied by every decoding step's matmul
                self.prefix_k, self.prefix_v = key_states.contiguous(), value_states.contiguous()
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


def attend_shared_prefix(layer: Any, query: Any, key: Any, value: Any, scale: float) -> Any:
    """One decoding step's attention on a :func:`shared_prefix_layer_class` layer: ``[B, heads, 1, d]``.

    The keys split into the prompt part, read once per prompt for all its rows (``[P, kv_heads, m * groups,
    T]`` matmuls), and each row's own new tokens (``key``/``value``: ``[B, kv_heads, L, d]``); one softmax
    over both parts; grouped-query heads as in ``repeat_kv``. While every prompt has ``m`` rows, the padded
    layout is the batch itself and no row is scattered or gathered (the same values either way).
    """
    import torch

    b, h, _, d = query.shape
    kp, vp = layer.prefix_k, layer.prefix_v  # [P, hk, T, d]
    p, hk, t, _ = kp.shape
    g, m = h // hk, layer.m
    q = query.view(b, hk, g, d)
    full = b == p * m
    qp = q if full else q.new_zeros((p * m, hk, g, d)).index_put_((layer.pad_index,), q)
    qp = qp.view(p, m, hk, g, d).permute(0, 2, 1, 3, 4).reshape(p, hk, m * g, d)
    sp = torch.matmul(qp, kp.transpose(-1, -2)).float() * scale  # [P, hk, m*g, T]
    sp = sp.masked_fill(~layer.prompt_mask[:, None, None, :], float("-inf"))
    sp = sp.view(p, hk, m, g, t).permute(0, 2, 1, 3, 4).reshape(p * m, hk, g, t)
    ss = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, hk, g, L]
    w = torch.softmax(torch.cat([sp if full else sp[layer.pad_index], ss], dim=-1), dim=-1).to(query.dtype)
    wp, ws = w[..., :t], w[..., t:]
    wpp = wp if full else wp.new_zeros((p * m, hk, g, t)).index_put_((layer.pad_index,), wp)
    wpp = wpp.reshape(p, m, hk, g, t).permute(0, 2, 1, 3, 4).reshape(p, hk, m * g, t)
    op = torch.matmul(wpp, vp).view(p, hk, m, g, d).permute(0, 2, 1, 3, 4).reshape(p * m, hk, g, d)
    out = (op if full else op[layer.pad_index]) + torch.matmul(ws, value)  # [B, hk, g, d]
    return out.reshape(b, h, 1, d)


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for shared-prefix decoding (registered with transformers' AttentionInterface).

    Prefill goes to the standard SDPA path; a decoding step to :func:`attend_shared_prefix`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = ACTIVE_CACHE.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if layer is None or getattr(layer, "prefix_k", None) is None or layer.length == 0 or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend_shared_prefix(layer, query, key, value, scale).transpose(1, 2).contiguous(), None


@functools.cache
def register_shared_prefix_attention() -> str:
    """Register the shared-prefix attention (and its mask) with transformers once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
    return SHARED_PREFIX_ATTENTION


def supports_shared_prefix(model: Any) -> bool:
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
