"""The numeric pieces both towers are built from, as plain NumPy functions.

Shapes: B batch, T query tokens, S key tokens, D width, H query heads, K key/value heads,
hd head width. Every function works in the dtype of its input (float32 or float64); norms and
softmax work in at least float32, as the reference implementations do.
"""

from __future__ import annotations

import numpy as np

# Activation names (HF configs) that all mean GELU with the tanh approximation.
GELU_TANH_NAMES = {"gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu_tanh", "gelu_approximate"}


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """float[..., I] @ weight float[O, I] (PyTorch/MLX layout) + bias float[O] -> float[..., O]."""
    y = x @ weight.T
    return y if bias is None else y + bias


def at_least_f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """SigLIP's LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias."""
    h = at_least_f32(x)
    mean = h.mean(axis=-1, keepdims=True)
    var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((h - mean) / np.sqrt(var + eps) * weight + bias).astype(x.dtype, copy=False)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm: x / rms(x) * (1 + weight). The stored weight is an offset from 1."""
    h = at_least_f32(x)
    h = h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + eps)
    return (h * (1.0 + at_least_f32(weight))).astype(x.dtype, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = np.asarray(np.sqrt(2.0 / np.pi), x.dtype)
    return 0.5 * x * (1.0 + np.tanh(c * (x + np.asarray(0.044715, x.dtype) * x ** 3)))


def check_gelu_tanh(name: str, where: str) -> None:
    """PaliGemma uses tanh-GELU everywhere; refuse a config that asks for anything else."""
    if name not in GELU_TANH_NAMES:
        raise ValueError(f"{where}: activation {name!r} is not tanh-GELU, which this reference implements")


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """Gemma2's soft-capping tanh(x / cap) * cap (identity when cap is None or 0)."""
    return np.tanh(x / cap) * cap if cap else x


def masked_softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis among `allowed` entries; a row with none allowed gives zeros."""
    h = at_least_f32(scores)
    h = np.where(allowed, h, -np.inf)
    top = h.max(axis=-1, keepdims=True)
    e = np.exp(h - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return (e / np.where(total > 0, total, 1.0)).astype(scores.dtype, copy=False)


def split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """float[B, T, heads * hd] -> float[B, heads, T, hd]."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """float[B, heads, T, hd] -> float[B, T, heads * hd]."""
    b, h, t, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * hd)


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotary position embedding, "half split" (non-traditional): dimension i pairs with i + hd/2.

    x float[B, H, T, hd], positions int[B, T] -> float[B, H, T, hd]. Pair i turns by the angle
    position * base ** (-2i / hd).
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)       # [hd/2]
    angles = positions[:, None, :, None].astype(np.float64) * inv_freq          # [B, 1, T, hd/2]
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None,
              scale: float, softcap: float | None = None) -> np.ndarray:
    """Multi-head attention with grouped key/value heads.

    q float[B, H, T, hd], k and v float[B, K, S, hd], allowed bool[B, T, S] (None = all)
    -> float[B, H, T, hd]. Query head n reads key/value head n // (H / K).
    """
    b, h, t, hd = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, h // kv_heads, t, hd)                            # [B, K, H/K, T, hd]
    scores = q @ k[:, :, None].swapaxes(-1, -2) * np.asarray(scale, q.dtype)   # [B, K, H/K, T, S]
    scores = soft_cap(scores, softcap)
    if allowed is None:
        allowed = np.ones(scores.shape[-2:], dtype=bool)
    else:
        allowed = allowed[:, None, None]
    weights = masked_softmax(scores, allowed)
    return (weights @ v[:, :, None]).reshape(b, h, t, hd)
