r"""The prefix-LM mask, the per-window choice and the KV caches: every rule about which key a
query may see, in one place (big_vision's `make_attn_mask` form).

Each token carries `mask_ar`: 0 in the bidirectional prefix (image tokens, `<bos>`, the prefix
text and its "\n"), 1 in the causal suffix (the answer). With cum = cumsum(mask_ar):

    attend[i, j] = cum[j] <= cum[i]  and  valid[j]

Worked example: 2 image tokens, `<bos>`, a 1-token prefix, "\n", a 2-token suffix, one pad:

    token    img img bos  p  \n  s1  s2 pad        attend (row i = query, column j = key)
    mask_ar   0   0   0   0   0   1   1   0           img img bos  p  \n  s1  s2 pad
    cum       0   0   0   0   0   1   2   2    img     1   1   1   1   1   0   0   0
    valid     1   1   1   1   1   1   1   0    img     1   1   1   1   1   0   0   0
                                                bos     1   1   1   1   1   0   0   0
                                                p       1   1   1   1   1   0   0   0
                                                \n      1   1   1   1   1   0   0   0
                                                s1      1   1   1   1   1   1   0   0
                                                s2      1   1   1   1   1   1   1   0
                                                pad     1   1   1   1   1   1   1   0

The prefix sees itself both ways and never the suffix; each suffix token sees the whole prefix
and the suffix up to itself; nobody sees padding. Gemma2's sliding-window layers add
`i - j < window`, except that prefix tokens always see the whole prefix (as transformers runs
them). Inference has no suffix in the prompt (mask_ar all 0); generated tokens are the suffix,
appended after the KV cache (`decode_mask`).

Masks are boolean, True = may attend, shaped [B, 1, T, S] so they broadcast over heads; None
where attention is full anyway (the fused kernel's fast path). A model holds one mask per
distinct window (`prefill_masks`, `decode_masks`). Axis letters as in pg_edge.model.gemma.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .._mlx_lm import KVCache, QuantizedKVCache, RotatingKVCache
from ..errors import PgEdgeError
from .config import TextConfig

# How Gemma2's sliding-window layers attend (`pg_edge.load(..., attention=...)`):
#   "window"  the 4096-token window, as transformers runs these checkpoints (the default: it
#             is what the HF models are evaluated with, and pg_edge's parity tests check it);
#   "global"  every layer attends globally, as big_vision (which trained PaliGemma 2) does: its
#             gemma.py does not implement the local sliding attention of Gemma2.
# The two differ only once a sequence exceeds 4096 tokens (896 px: docs/performance.md).
ATTENTION_MODES = ("window", "global")


def layer_windows(cfg: TextConfig, mode: str = "window") -> list[int | None]:
    """Each decoder layer's sliding window (None: global) under an attention mode."""
    if mode not in ATTENTION_MODES:
        raise PgEdgeError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    return [cfg.window_for_layer(i) if mode == "window" else None for i in range(cfg.num_hidden_layers)]


def suffix_mask_ar(prefix: int, suffix: int, length: int | None = None) -> np.ndarray:
    """int32[length]: 0 for `prefix` tokens, 1 for the `suffix` tokens after them, 0 for the
    padding up to `length` (default: no padding)."""
    out = np.zeros(length if length is not None else prefix + suffix, dtype=np.int32)
    out[prefix:prefix + suffix] = 1
    return out


def prefix_lm_mask(mask_ar: mx.array, valid: mx.array, window: int | None = None) -> mx.array:
    """mask_ar int[B, T] (0 prefix, 1 suffix); valid bool[B, T] (False: padding); window: a
    query sees keys less than `window` positions back, prefix tokens the whole prefix anyway.
    -> bool[B, 1, T, T]."""
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


def decode_mask(valid: mx.array, T: int = 1, window: int | None = None) -> mx.array:
    """T new causal (suffix) tokens appended after the cached keys. valid bool[B, S]: every
    key, the last T being the new tokens themselves. A suffix token sees every earlier valid
    key (the whole prefix included) and itself; the window, where set, limits how far back.
    -> bool[B, 1, T, S]."""
    S = valid.shape[1]
    q_idx = mx.arange(S - T, S)[:, None]
    k_idx = mx.arange(S)[None, :]
    attend = (k_idx <= q_idx)[None] & valid[:, None, :]
    if window is not None:
        attend = attend & ((q_idx - k_idx) < window)[None]
    return attend[:, None]


def prefill_masks(windows: set, mask_ar: mx.array | None, valid: mx.array | None, B: int, T: int) -> dict:
    """{window: mask} for a pass from position 0 (mask_ar None: all prefix; valid None: no
    padding); None where attention is full anyway."""
    out = {}
    for window in windows:
        plain = mask_ar is None and valid is None
        if plain and (window is None or T <= window):
            out[window] = None  # the fused kernel's fast path: everyone sees everyone
            continue
        ar = mask_ar if mask_ar is not None else mx.zeros((B, T), dtype=mx.int32)
        ok = valid if valid is not None else mx.ones((B, T), dtype=mx.bool_)
        out[window] = prefix_lm_mask(ar, ok, window)
    return out


def decode_masks(windows: set, valid: mx.array | None, T: int, S: int, bounded: frozenset = frozenset()) -> dict:
    """{window: mask} for T new tokens after S - T cached keys (valid None: no padding).
    `bounded`: windows whose caches hold only the last `window` keys (RotatingKVCache)."""
    out = {}
    for w in windows:
        if valid is None and T == 1 and (w is None or S <= w or w in bounded):
            out[w] = None  # one query seeing every key it holds: no mask needed
        else:
            ok = valid if valid is not None else mx.ones((1, S), dtype=mx.bool_)
            out[w] = decode_mask(ok, T, w)
    return out


class WindowedQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's QuantizedKVCache for a sliding-window layer: a one-token decode step gets the
    last `max_size` (= window) keys and values, views of the stored ones, which are exactly
    what that token may see, so the step needs no mask (as with RotatingKVCache). Every key
    stays stored (no rotation: past the window that is a few tokens at 896 px)."""

    def __init__(self, max_size: int, **kwargs):
        super().__init__(**kwargs)
        self.max_size = max_size

    def update_and_fetch(self, keys, values):
        k, v = super().update_and_fetch(keys, values)
        if keys.shape[2] == 1 and self.offset > self.max_size:
            k, v = (tuple(t[..., -self.max_size:, :] for t in kv) for kv in (k, v))
        return k, v


def make_cache(windows: list, padded: bool, kv_bits: int | None = None, head_dim: int = 256) -> list:
    """One mlx-lm cache per decoder layer (`windows`: each layer's). A sliding-window layer
    keeps only its last `window` keys (RotatingKVCache): a generated token may not look further
    back, so attention over the rotated keys without a mask is exactly the windowed attention.
    With padded rows the decode mask must line up with every key's validity, so those runs
    keep every key (KVCache).
    With `kv_bits` (8: `pg_edge.load(kv_bits=8)`), every layer keeps its keys in mlx-lm's
    QuantizedKVCache (group size 64, or 32 when `head_dim` is not a multiple of 64); a sliding
    layer's unpadded decode reads its last `window` keys only (WindowedQuantizedKVCache)."""
    if kv_bits:
        q = dict(group_size=64 if head_dim % 64 == 0 else 32, bits=kv_bits)
        return [WindowedQuantizedKVCache(w, **q) if w and not padded else QuantizedKVCache(**q) for w in windows]
    return [RotatingKVCache(max_size=w) if w and not padded else KVCache() for w in windows]


def bounded_windows(windows: list, cache: list) -> frozenset:
    """The windows whose layers' caches keep exactly the keys the window sees (a cache with
    that `max_size`, as `make_cache` gives them); other caches (the export's) keep all."""
    return frozenset(w for w, c in zip(windows, cache) if getattr(c, "max_size", None) == w)
