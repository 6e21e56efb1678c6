"""Gemma (PaliGemma 1) and Gemma2 (PaliGemma 2) decoders, and the prefix-LM mask.

Attribute names follow the checkpoint keys under `language_model.`. Gemma vs Gemma2 differs only
by config flags: attention / final logit softcaps, the "sandwich" norms (post-attention,
pre- and post-feedforward), the query scale (query_pre_attn_scalar) and the sliding window.

Masks are boolean, True = may attend, shaped [B, 1, T_q, T_k] so they broadcast over heads.
One builder serves inference and training (big_vision's `mask_ar` form):
    cum = cumsum(mask_ar); attend[i, j] = cum[j] <= cum[i] and valid[j]
so image + `<bos>` + prefix + "\\n" (mask_ar 0) attend both ways and the suffix (mask_ar 1) is
causal and sees the whole prefix.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..cpu import ops as cpu_ops, products as backend
from .config import TextConfig
from ..errors import PgEdgeError
from .siglip import activation

# Queries per attention chunk in a long prefill: bounds the float32 scores of Gemma2's
# softcapped attention to [heads, 1024, T_k] (~135 MB at 8 heads and 4100 keys, not ~540 MB).
PREFILL_CHUNK = 1024
# How Gemma2's sliding-window layers attend (`pg_edge.load(..., attention=...)`):
#   "window"  the 4096-token window, as transformers runs these checkpoints (the default: it
#             is what the HF models are evaluated with, and pg_edge's parity tests check it);
#   "global"  every layer attends globally, as big_vision (which trained PaliGemma 2) does: its
#             gemma.py does not implement the local sliding attention of Gemma2.
# The two differ only once a sequence exceeds 4096 tokens: at 896 px (4096 image tokens plus
# the prompt); there transformers' logits move by up to ~4% of their scale between them.
ATTENTION_MODES = ("window", "global")


def prefix_lm_mask(mask_ar: mx.array, valid: mx.array, window: int | None = None) -> mx.array:
    """The prefix-LM attention mask.

    mask_ar: int[B, T] 0 for tokens of the bidirectional prefix, 1 for causal (suffix) tokens.
    valid:   bool[B, T] False for padding.
    window:  sliding window (Gemma2 local layers): a query sees keys less than `window`
             positions back, except that prefix tokens always see the whole prefix (what
             transformers does: the window narrows the causal part, the prefix block is OR-ed in).
    Returns bool[B, 1, T, T].
    """
    cum = mx.cumsum(mask_ar.astype(mx.int32), axis=1)
    attend = (cum[:, None, :] <= cum[:, :, None]) & valid[:, None, :]
    if window is not None:
        T = mask_ar.shape[1]
        idx = mx.arange(T)
        near = (idx[:, None] - idx[None, :]) < window
        in_prefix = cum == 0
        block = in_prefix[:, :, None] & in_prefix[:, None, :]
        attend = attend & (near[None] | block)
    return attend[:, None]


def decode_mask(valid: mx.array, T_q: int = 1, window: int | None = None) -> mx.array:
    """Mask for T_q new causal (suffix) tokens appended after the cached keys.

    valid: bool[B, T_k] validity of every key, the last T_q being the new tokens themselves.
    A suffix token sees every earlier valid key (the whole prefix included) and itself; the
    window, where set, limits how far back. Returns bool[B, 1, T_q, T_k].
    """
    T_k = valid.shape[1]
    q_idx = mx.arange(T_k - T_q, T_k)[:, None]
    k_idx = mx.arange(T_k)[None, :]
    attend = (k_idx <= q_idx)[None] & valid[:, None, :]
    if window is not None:
        attend = attend & ((q_idx - k_idx) < window)[None]
    return attend[:, None]


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w). Stored weights are offsets from 1.

    `cpu_ops` (set by pg_edge.cpu.products on the CPU backend): outside training, the same
    arithmetic as mx.fast.rms_norm's CPU fallback in fewer ops (pg_edge.cpu.ops)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        self.cpu_ops = False

    def __call__(self, x: mx.array) -> mx.array:
        if self.cpu_ops and not self.training:
            return cpu_ops.rms_norm(x, self.weight, self.eps)
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


def softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if not cap else mx.tanh(x / cap) * cap


class Attention(nn.Module):
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
        # Set by pg_edge.cpu.products on the CPU backend: RoPE from per-step shared tables and a
        # fused softcap (pg_edge.cpu.ops), long prefill attention split by heads over the CPU
        # streams (pg_edge.cpu.products), outside training and tracing.
        self.cpu_ops = False

    def __call__(self, x: mx.array, mask: mx.array | None, offset: Any, cache=None) -> mx.array:
        """x: float[B, T, D]; mask: bool[B, 1, T, T_k] or None (full); offset: position of
        x[:, 0] as int or int[B] (left padding gives each row its own). -> float[B, T, D]."""
        B, T, _ = x.shape
        q, k, v = (self._heads(p(x), n) for p, n in ((self.q_proj, self.n_heads), (self.k_proj, self.n_kv_heads),
                                                      (self.v_proj, self.n_kv_heads)))
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        attend = self._attend
        # Long prefill attention split by heads over the CPU streams; decode (T == 1) is never
        # long enough for it, so the hot path skips the call.
        if self._lean() and T > 1:
            attend = partial(backend.attention_on_streams, self._attend)
        if T <= PREFILL_CHUNK:
            o = attend(q, k, v, mask)
        else:
            # Long prefill (896 px: 4096 image tokens + prompt): queries in chunks against all
            # keys, so the [T, T] scores never exist at once. Exact: every chunk sees every key
            # its mask rows allow, the bidirectional prefix included.
            o = mx.concatenate([
                attend(q[:, :, i:i + PREFILL_CHUNK], k, v, None if mask is None else mask[:, :, i:i + PREFILL_CHUNK])
                for i in range(0, T, PREFILL_CHUNK)
            ], axis=2)
        # [B, H, T, hd] -> [B, T, H * hd]; one token: the same memory, a reshape alone.
        o = o.reshape(B, T, -1) if T == 1 else o.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(o)

    def _heads(self, y: mx.array, n: int) -> mx.array:
        """float[B, T, n * hd] -> float[B, n, T, hd] (one token: a reshape, no transpose)."""
        B, T, _ = y.shape
        if T == 1:
            return y.reshape(B, n, 1, self.head_dim)
        return y.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)

    def _lean(self) -> bool:
        return self.cpu_ops and not self.training

    def _rope(self, x: mx.array, offset: Any) -> mx.array:
        if self._lean() and isinstance(offset, int):
            return cpu_ops.rope(x, offset, self.rope_base)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)

    def _attend(self, q, k, v, mask):
        if self.softcap:
            return self._softcapped_attention(q, k, v, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

    def _softcapped_attention(self, q, k, v, mask):
        """Gemma2: tanh softcap on the logits, which the fused kernel cannot do.

        q: [B, H, T, hd]; k, v: [B, K, S, hd]. Query head n uses kv head n // (H / K)."""
        B, H, T, hd = q.shape
        K, S = k.shape[1], k.shape[2]
        q = (q * self.scale).reshape(B, K, H // K, T, hd)
        scores = (q @ k[:, :, None].swapaxes(-1, -2)).astype(mx.float32)  # [B, K, G, T, S]
        scores = cpu_ops.softcap(scores, self.softcap) if self._lean() else softcap(scores, self.softcap)
        if mask is not None:
            scores = mx.where(mask[:, :, None], scores, mx.finfo(mx.float32).min)
        probs = mx.softmax(scores, axis=-1).astype(v.dtype)
        return (probs @ v[:, :, None]).reshape(B, H, T, hd)


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
        # Evaluate each layer's output during an inference prefill (set by pg_edge.cpu.products on
        # the CPU backend): its dequantized weight pieces are then freed before the next layer
        # builds its own; in one lazy graph MLX keeps many layers' pieces alive at once.
        self.sync_each_layer = False

    def __call__(self, h: mx.array, masks: dict, offset: Any, cache=None) -> mx.array:
        """h: float[B, T, D] input embeddings (already scaled); masks: {window: mask} as built
        by `PaliGemmaModel.masks` / `.decode_masks`. -> float[B, T, D] after the final norm."""
        cache = cache or [None] * len(self.layers)
        sync = self.sync_each_layer and not self.training and h.shape[1] > 1  # never in decode
        for layer, c in zip(self.layers, cache):
            h = layer(h, masks[layer.window], offset, c)
            if sync:
                mx.eval(h)
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

    def windows(self) -> set:
        return {layer.window for layer in self.model.layers}

    def set_attention(self, mode: str) -> None:
        """"window" (Gemma2's sliding layers keep their window) or "global" (none do); see
        ATTENTION_MODES. Gemma 1 has no window: both modes are the same model."""
        if mode not in ATTENTION_MODES:
            raise PgEdgeError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
        for i, layer in enumerate(self.model.layers):
            layer.window = self.cfg.window_for_layer(i) if mode == "window" else None

    def logits(self, h: mx.array, capped: bool = True) -> mx.array:
        """float[..., D] final hidden states -> float[..., V] (softcapped for Gemma2 unless
        capped=False: greedy decoding's argmax is the same on the raw logits, as tanh is
        increasing, and skips a tanh over the vocabulary per token)."""
        if "lm_head" in self:
            out = self.lm_head(h)
        else:
            out = self.model.embed_tokens.as_linear(h)
        return softcap(out, self.cfg.final_logit_softcapping) if capped else out

    def __call__(self, h, masks, offset, cache=None, logits_from: int = 0, capped: bool = True) -> mx.array:
        """Logits of positions logits_from.. only: prefill needs just the last one."""
        h = self.model(h, masks, offset, cache)
        return self.logits(h[:, logits_from:, :] if logits_from else h, capped)
