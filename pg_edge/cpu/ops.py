"""Leaner graphs for the decoder's small ops on MLX's CPU backend, and the RMSNorm that uses one.

MLX's CPU backend has no kernel for `mx.fast.rms_norm` or `mx.fast.rope`: each call expands
into a generic fallback graph whose ops are each a scheduled task, and at narrow widths a
decode step is mostly that scheduling (counts: docs/performance.md, "Fewer ops per decode
token"). Here the same arithmetic, bit-identical, in fewer ops:

- `rms_norm`: the fallback's exact steps (float32 mean of squares, rsqrt, cast back, times
  1 + w) in one `mx.compile`d function, whose elementwise steps MLX fuses: 3 kernels;
- `rope`: cos/sin tables computed once per (offset, length) and shared by every layer's q and
  k in that step (the fallback recomputes them per call), then x * cos + rotate(x) * sin,
  compiled for decode-sized inputs. The same formulas as the fallback: inverse frequencies
  exp(-i * ln(base) / (dims / 2)) in float32, cos/sin cast to the activations' dtype, products
  in that dtype, and a - b == a + (-b) exactly;
- `softcap`: tanh(x / cap) * cap as one fused kernel.

Tensor shapes: x float[B, H, T, E] for rope; [..., D] for rms_norm; any for softcap.
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache, partial

import mlx.core as mx

from ..model.gemma import RMSNorm
from .streams import lean

_local = threading.local()  # per thread: each worker thread builds and evaluates its own graphs


@lru_cache(maxsize=None)
def _compiled_rms_norm(eps: float, dims: int):
    # Shapeless (one graph for every batch and length), so one per width: the trace bakes
    # in 1 / dims.
    @partial(mx.compile, shapeless=True)
    def f(x, offset_weight):
        x32 = x.astype(mx.float32)
        ms = mx.sum(mx.square(x32), axis=-1, keepdims=True) * (1.0 / dims)
        return (x32 * mx.rsqrt(ms + eps)).astype(x.dtype) * (1.0 + offset_weight)

    return f


def rms_norm(x: mx.array, offset_weight: mx.array, eps: float) -> mx.array:
    """x float[..., D], offset_weight float[D] (Gemma's stored w) -> float[..., D]: what
    `mx.fast.rms_norm(x, 1.0 + offset_weight, eps)` computes on the CPU, in fewer ops (the
    1 + w folded into the fused kernel)."""
    return _compiled_rms_norm(float(eps), x.shape[-1])(x, offset_weight)


def rope_tables(offset: int, T: int, dims: int, base: float, dtype=mx.float32) -> tuple[mx.array, mx.array]:
    """(cos, sin_signed) [T, dims] in `dtype` for positions offset..offset+T-1, half-split
    layout: cos repeated over both halves, sin negated on the first half. Computed in float32
    and cast to the activations' dtype, as the fallback does. Cached per thread for the last
    (offset, T, dims, base, dtype): every layer of one decode step reuses them."""
    key = (offset, T, dims, base, dtype)
    hit = getattr(_local, "rope", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    half = dims // 2
    inv_freq = mx.exp(-mx.arange(0, half, dtype=mx.float32) * (math.log(base) / half))
    theta = (offset + mx.arange(T, dtype=mx.float32))[:, None] * inv_freq[None, :]
    c, s = mx.cos(theta), mx.sin(theta)
    c, s = c.astype(dtype), s.astype(dtype)
    tables = (mx.concatenate([c, c], axis=-1), mx.concatenate([-s, s], axis=-1))
    # Left lazy: evaluated with the first layer that uses them (an eval here would wait for
    # the previous token's queued step), then shared by the rest.
    _local.rope = (key, tables)
    return tables


def _rotate_apply(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


_rotate_apply_compiled = mx.compile(_rotate_apply)


def rope(x: mx.array, offset: int, base: float) -> mx.array:
    """Non-traditional RoPE of x float[B, H, T, dims] at integer position `offset`: what
    `mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=offset)` computes."""
    cos, sin = rope_tables(int(offset), x.shape[2], x.shape[-1], float(base), x.dtype)
    # Compiled for one-token decode only: its shapes never change, while each prompt length
    # of a prefill would compile (and cache) a graph of its own.
    f = _rotate_apply_compiled if x.shape[2] == 1 else _rotate_apply
    return f(x, cos, sin)


@lru_cache(maxsize=None)
def _compiled_softcap(cap: float):
    return mx.compile(lambda x: mx.tanh(x / cap) * cap, shapeless=True)


def softcap(x: mx.array, cap: float) -> mx.array:
    """tanh(x / cap) * cap in one fused kernel (Gemma2's attention and final-logit caps)."""
    return _compiled_softcap(float(cap))(x)


class CpuRMSNorm(RMSNorm):
    """`RMSNorm` as `rms_norm` (same parameters) outside training and tracing."""

    def __call__(self, x: mx.array) -> mx.array:
        if lean(self):
            return rms_norm(x, self.weight, self.eps)
        return super().__call__(x)
