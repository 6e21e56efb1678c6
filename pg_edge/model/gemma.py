"""Gemma (PaliGemma 1) and Gemma2 (PaliGemma 2) decoders.

Attribute names follow the checkpoint keys under `language_model.`. Gemma vs Gemma2 differs only
by config flags: attention / final logit softcaps, the "sandwich" norms (post-attention,
pre- and post-feedforward), the query scale (query_pre_attn_scalar) and the sliding window.
Masks come from pg_edge.model.masks (the prefix-LM rule and the per-window choice).

Axis letters used in this package's shapes:
    B batch          T positions in this call (queries)   S key positions (cached + new)
    D model width    H query heads     K key/value heads   E head width (head_dim)
    V vocabulary     N image tokens    C vision width      P image side in pixels
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .siglip import activation

# Queries per attention chunk in a long prefill: bounds the float32 scores of Gemma2's
# softcapped attention to [H, 1024, S] (docs/performance.md, "Long prefill in query chunks").
PREFILL_CHUNK = 1024


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w). Stored weights are offsets from 1."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        w1 = 1.0 + self.weight if self.training else self.offset_weight()
        return mx.fast.rms_norm(x, w1, self.eps)

    def offset_weight(self) -> mx.array:
        """1 + weight, computed once per weight array (outside the parameters, never saved or
        trained) rather than by one extra kernel per norm per decode step."""
        hit = self.__dict__.get("_offset")
        if hit is None or hit[0] is not self.weight:
            hit = (self.weight, 1.0 + self.weight)
            object.__setattr__(self, "_offset", hit)
        return hit[1]


def softcap(x: mx.array, cap: float | None) -> mx.array:
    """tanh(x / cap) * cap; x itself when cap is None (Gemma 1)."""
    return x if not cap else mx.tanh(x / cap) * cap


_FLOAT32_SOFTCAPS: dict = {}  # cap -> its compiled function


def float32_softcap(x: mx.array, cap: float) -> mx.array:
    """softcap(x in float32, cap) as one compiled function: MLX fuses the cast, the division,
    the tanh and the product into one elementwise kernel (4 kernels unfused)."""
    cap = float(cap)
    f = _FLOAT32_SOFTCAPS.get(cap)
    if f is None:
        f = _FLOAT32_SOFTCAPS[cap] = mx.compile(lambda y: mx.tanh(y.astype(mx.float32) / cap) * cap, shapeless=True)
    return f(x)


class Attention(nn.Module):
    """Grouped-query attention with RoPE: query head n reads key/value head n // (H / K)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        self.scale = cfg.query_scale
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, k * hd, bias=False)
        self.v_proj = nn.Linear(d, k * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.rope_base = cfg.rope_theta

    def __call__(self, x: mx.array, mask: mx.array | None, offset: Any, cache=None) -> mx.array:
        """x: float[B, T, D]; mask: bool[B, 1, T, S] or None (full); offset: position of
        x[:, 0] as int or int[B] (left padding gives each row its own). -> float[B, T, D]."""
        B, T, _ = x.shape
        q, k, v = (self._heads(y, n) for y, n in zip(self.project(x), (self.n_heads, self.n_kv_heads, self.n_kv_heads)))
        q, k = self.rope(q, offset), self.rope(k, offset)
        bits = getattr(cache, "bits", None)  # mlx-lm's QuantizedKVCache (pg_edge.model.masks.make_cache)
        if bits and T > 1 and cache.offset == 0:
            cache.update_and_fetch(k, v)  # a prefill attends with its exact keys; decode reads the quantized ones
        elif cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(k, tuple):
            o = self.quantized_attend(q, k, v, mask, cache.group_size, bits)
        elif T <= PREFILL_CHUNK:
            o = self.attend(q, k, v, mask)
        else:
            # Long prefill (896 px): queries in chunks against all keys, so the [T, S] scores never
            # exist at once. Exact: every chunk sees every key its mask rows allow, the prefix included.
            o = mx.concatenate([
                self.attend(q[:, :, i:i + PREFILL_CHUNK], k, v, None if mask is None else mask[:, :, i:i + PREFILL_CHUNK])
                for i in range(0, T, PREFILL_CHUNK)
            ], axis=2)
        # [B, H, T, E] -> [B, T, H * E]; one token: the same memory, a reshape alone.
        o = o.reshape(B, T, -1) if T == 1 else o.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(o)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x float[B, T, D] -> (q float[B, T, H * E], k and v float[B, T, K * E])."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _heads(self, y: mx.array, n: int) -> mx.array:
        """float[B, T, n * E] -> float[B, n, T, E] (one token: a reshape, no transpose)."""
        B, T, _ = y.shape
        if T == 1:
            return y.reshape(B, n, 1, self.head_dim)
        return y.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)

    def rope(self, x: mx.array, offset: Any) -> mx.array:
        """Non-traditional RoPE of x float[B, n, T, E] from position `offset` (int or int[B])."""
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        """q float[B, H, T, E]; k, v float[B, K, S, E]; mask bool[B, 1, T, S] or None ->
        float[B, H, T, E]. Gemma2 softcaps the scores, which the fused kernel cannot do."""
        if not self.softcap:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        B, H, T, E = q.shape
        K = k.shape[1]
        q = (q * self.scale).reshape(B, K, H // K, T, E)
        scores = self.cap(q @ k[:, :, None].swapaxes(-1, -2))  # float32[B, K, H / K, T, S]
        if mask is not None:
            scores = mx.where(mask[:, :, None], scores, mx.finfo(mx.float32).min)
        probs = mx.softmax(scores, axis=-1).astype(v.dtype)
        return (probs @ v[:, :, None]).reshape(B, H, T, E)

    def quantized_attend(self, q, k, v, mask, group_size: int, bits: int) -> mx.array:
        """Attention over a quantized KV cache, without dequantizing it: the scores and the
        weighted values are quantized products against the stored keys and values.

        q float[B, H, T, E]; k, v (data, scales, biases) as mlx-lm's QuantizedKVCache returns
        them, each [B, K, S, ...]; mask None or bool[B, 1, T, S]. -> float[B, H, T, E]."""
        B, H, T, E = q.shape
        K = k[0].shape[1]
        q = (q * self.scale).reshape(B, K, H // K, T, E)
        k, v = [tuple(t[:, :, None] for t in kv) for kv in (k, v)]  # one kv head serves its H / K queries
        scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
        scores = self.cap(scores) if self.softcap else scores.astype(mx.float32)
        if mask is not None:
            scores = mx.where(mask[:, :, None], scores, mx.finfo(mx.float32).min)
        probs = mx.softmax(scores, axis=-1).astype(q.dtype)
        return mx.quantized_matmul(probs, *v, transpose=False, group_size=group_size, bits=bits).reshape(B, H, T, E)

    def cap(self, scores: mx.array) -> mx.array:
        """Gemma2's attention softcap: scores in the activations' dtype -> capped float32.
        Outside training one fused kernel (`float32_softcap`); no float32 copy of the cache
        exists (the scores are [.., T, S], the keys stay in their dtype)."""
        if self.training:
            return softcap(scores.astype(mx.float32), self.softcap)
        return float32_softcap(scores, self.softcap)


class MLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.act = activation(cfg.hidden_activation)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.window = cfg.window_for_layer(index)
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        # Gemma 1: post_attention_layernorm is the pre-MLP norm. Gemma2: it normalises the
        # attention output, and pre_feedforward_layernorm is the pre-MLP norm.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x, mask, offset, cache=None):
        a = self.self_attn(self.input_layernorm(x), mask, offset, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, h: mx.array, masks: dict, offset: Any, cache=None) -> mx.array:
        """h: float[B, T, D] input embeddings (already scaled); masks: {window: mask} as built
        by pg_edge.model.masks. -> float[B, T, D] after the final norm."""
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, masks[layer.window], offset, c)
        return self.norm(h)


class LanguageModel(nn.Module):
    """`language_model`: Gemma body + LM head (tied to the embeddings unless a separate
    `language_model.lm_head.weight` is present) + Gemma2's final logit softcap."""

    def __init__(self, cfg: TextConfig, tie_word_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = GemmaModel(cfg)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, h: mx.array, capped: bool = True) -> mx.array:
        """float[..., D] final hidden states -> float[..., V] (softcapped for Gemma2 unless
        capped=False: greedy decoding's argmax is the same on the raw logits, as tanh is
        increasing, and skips a tanh over the vocabulary per token)."""
        if "lm_head" in self:
            out = self.lm_head(h)
        else:
            out = self.model.embed_tokens.as_linear(h)
        return self.cap(out) if capped else out

    def cap(self, logits: mx.array) -> mx.array:
        """Gemma2's final logit softcap (identity for Gemma 1)."""
        return softcap(logits, self.cfg.final_logit_softcapping)

    def __call__(self, h, masks, offset, cache=None, logits_from: int = 0, capped: bool = True) -> mx.array:
        """Logits of positions logits_from.. only: prefill needs just the last one."""
        h = self.model(h, masks, offset, cache)
        return self.logits(h[:, logits_from:, :] if logits_from else h, capped)
