"""A lean decoding step for Llama-architecture models: the HF sampler's fast path (fewer Python steps per token).

A decoding step through transformers' modules costs about 2 ms of fixed Python work on a CPU (mask building,
module hooks, cache bookkeeping), which is most of a step for the kit's tiny models. :class:`LeanDecoder`
runs the same arithmetic directly on the model's weights: per layer one RMSNorm, the q/k/v projections,
rotary embedding, attention over the shared prompt and each row's own new tokens (the layout of
:mod:`erprm_core.generation.prefix_cache`), the output projection, RMSNorm and the SwiGLU MLP; then the final
norm and the LM head. The prompt itself (prefill) still runs through the HF model.

Every operation is the one transformers' Llama code and the shared-prefix attention run, in the same order
and on the same shapes, so the logits are bit-identical to the HF path on the same machine (the tests check
it); only the Python around them is gone. Supported: ``llama`` and ``mistral`` (no sliding window) configs
without projection biases, SiLU MLP and default RoPE (:func:`supports_lean_decode`); anything else decodes
through the HF modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from erprm_core.generation.prefix_cache import attend_shared_prefix

_MODEL_TYPES = {"llama", "mistral"}


def supports_lean_decode(model: Any) -> bool:
    """True for the Llama-family configs whose decoding step :class:`LeanDecoder` reproduces exactly."""
    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    return (
        getattr(config, "model_type", None) in _MODEL_TYPES
        and not getattr(config, "sliding_window", None)
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", None) == "silu"
        and rope.get("rope_type", "default") == "default"
        and getattr(config, "pretraining_tp", 1) == 1
        and hasattr(getattr(model, "model", None), "layers")
    )


class LeanDecoder:
    """One decoding step of a Llama-family causal LM on a shared-prefix KV cache, without the HF modules.

    ``step(tokens, positions, cache)`` takes the new token and position of each batch row and a
    ``DynamicCache`` whose layers are :func:`~erprm_core.generation.prefix_cache.shared_prefix_layer_class`
    layers already holding the prompts (the HF prefill), appends each row's keys/values and returns the
    next-token logits ``[rows, vocab]``.
    """

    def __init__(self, model: Any):
        config = model.config
        base = model.model
        self.eps = [(layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
                    for layer in base.layers]  # fmt: skip
        self.layers = [
            (layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
             layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
             layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
            for layer in base.layers
        ]  # fmt: skip
        self.embed = base.embed_tokens.weight
        self.norm_weight, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head = model.lm_head.weight
        self.inv_freq = base.rotary_emb.inv_freq.float()
        self.rope_scaling = float(base.rotary_emb.attention_scaling)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of the next token after ``tokens`` (``[rows]``) at ``positions``."""
        b = tokens.shape[0]
        h = F.embedding(tokens.unsqueeze(1), self.embed)  # [B, 1, hidden]
        freqs = positions.view(b, 1, 1).float() * self.inv_freq.to(h.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(h.dtype).unsqueeze(1)  # [B, 1, 1, d]
        sin = (emb.sin() * self.rope_scaling).to(h.dtype).unsqueeze(1)
        for layer, (ln1, wq, wk, wv, wo, ln2, wg, wu, wd), (eps1, eps2) in zip(
            cache.layers, self.layers, self.eps, strict=True
        ):
            x = self._rms_norm(h, ln1, eps1)
            q = F.linear(x, wq).view(b, 1, -1, self.head_dim).transpose(1, 2)
            k = F.linear(x, wk).view(b, 1, -1, self.head_dim).transpose(1, 2)
            v = F.linear(x, wv).view(b, 1, -1, self.head_dim).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            keys, values = layer.update(k, v)
            attn = attend_shared_prefix(layer, q, keys, values, self.scale)  # [B, heads, 1, d]
            h = h + F.linear(attn.transpose(1, 2).reshape(b, 1, -1).contiguous(), wo)
            x = self._rms_norm(h, ln2, eps2)
            h = h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        h = self._rms_norm(h, self.norm_weight, self.norm_eps)
        return F.linear(h[:, -1, :], self.lm_head)
