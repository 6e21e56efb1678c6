"""Long attentions split by heads over the CPU streams, and the CPU variants of the decoder's
and SigLIP's attention that use it (with the decoder's leaner RoPE and softcap).

MLX runs one attention on one core; heads are independent, so groups of heads on one stream per
core are the same numbers (the same per-head products) side by side. Every prefill's attention
is long enough to gain, from SigLIP's at 224 px (docs/performance.md, "Long attentions split by
heads over the CPU cores").
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import mlx.core as mx

from ..model.gemma import Attention
from ..model.siglip import SiglipAttention
from . import ops, qmv
from .products import cpu_quantized_products
from .streams import lean, on_streams, stream_count

# Attentions with this many scores (B x H x T x S) or more are split: every prefill from 224 px
# (SigLIP's 16 x 256 x 256 = 1M), as OpenBLAS runs one thread per call (pg_edge/blas.py); a
# decode step's (heads x 1 x the cache) stays whole.
ATTENTION_SPLIT_SCORES = 2**18
# ... in groups of at most this many float32 scores (256 MB) alive per stream.
ATTENTION_PIECE_SCORES = 64 * 2**20


def attention_on_streams(attend, q: mx.array, k: mx.array, v: mx.array, mask):
    """attend(q, k, v, mask) computed over groups of heads, the groups spread over the CPU
    streams: q float[B, H, T, E]; k, v float[B, K, S, E] (query head n uses kv head
    n // (H / K)); mask None or [B, 1, T, S], shared by every head. -> float[B, H, T, E].

    Bit-identical to one call. A group holds at most ATTENTION_PIECE_SCORES scores; with more
    groups than streams, one per stream is evaluated at a time, so the [H, T, S] float32
    scores never exist at once. Small attentions stay whole. Inference only (the callers
    check): the eager evaluation has no place in training or while tracing."""
    B, H, T, _ = q.shape
    K, S = k.shape[1], k.shape[2]
    scores = B * H * T * S
    if scores < ATTENTION_SPLIT_SCORES:
        return attend(q, k, v, mask)
    # Units that keep the kv mapping: kv heads with their query heads, or the query heads alone
    # when one kv head serves them all (PaliGemma 1's multi-query Gemma).
    units, per = (K, H // K) if K > 1 else (H, 1)
    s = stream_count()
    n = max(1, min(units, s * math.ceil(math.ceil(scores / ATTENTION_PIECE_SCORES) / s)))
    bounds = [units * i // n for i in range(n + 1)]

    def group(i, stream):
        lo, hi = bounds[i], bounds[i + 1]
        qs, ks, vs = (q[:, lo * per:hi * per], k[:, lo:hi], v[:, lo:hi]) if K > 1 else (q[:, lo:hi], k, v)
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            return attend(qs, ks, vs, mask)

    return mx.concatenate(on_streams(group, n, eager=True), axis=1)  # a round's scores freed before the next's


class CpuAttention(Attention):
    """The decoder's `Attention` (same parameters) outside training and tracing: a quantized
    decode step's q, k and v from one compiled call, RoPE from per-step shared tables, the fused
    softcap, and a prefill's attention split by heads.
    Decode (one query) is never long enough for the split, so it skips the call."""

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        # decode of a quantized model: q, k and v from one call of the compiled matvec
        fused = cpu_quantized_products((self.q_proj, self.k_proj, self.v_proj), x) if lean(self) else None
        return tuple(fused) if fused is not None else super().project(x)

    def rope(self, x: mx.array, offset: Any) -> mx.array:
        if isinstance(offset, int) and lean(self):
            return ops.rope(x, offset, self.rope_base)
        return super().rope(x, offset)

    def attend(self, q, k, v, mask):
        if q.shape[2] > 1 and lean(self):
            return attention_on_streams(super().attend, q, k, v, mask)
        return super().attend(q, k, v, mask)

    def cap(self, scores: mx.array) -> mx.array:
        return ops.softcap(scores.astype(mx.float32), self.softcap) if lean(self) else super().cap(scores)


class CpuDecodeAttention(CpuAttention):
    """`CpuAttention` of a 16-bit or quantized model (pg_edge.cpu.apply swaps it in with the
    compiled GELU): a decode step's attention (one query token, float32 cache) as one compiled
    kernel, qmv.decode_attention, when the module is built (AVX-512 or AVX2). Its softcap and softmax
    use a vectorised exp, so its last bits differ from MLX's ops; a float32 model keeps them."""

    def attend(self, q, k, v, mask):
        if q.shape[2] == 1 and lean(self) and qmv.supports_attention(q, k, v, mask):
            return qmv.decode_attention(q, k, v, mask, self.scale, self.softcap or 0.0)
        return super().attend(q, k, v, mask)


class CpuSiglipAttention(SiglipAttention):
    """SigLIP's attention (same parameters), split by heads outside training and tracing."""

    def attend(self, q, k, v, mask):
        if lean(self):
            return attention_on_streams(super().attend, q, k, v, mask)
        return super().attend(q, k, v, mask)
