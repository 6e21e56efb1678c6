"""The three functions a bundle exports, written so that `mx.export_function` can trace them.

Every weight is an INPUT (keyword arguments named after the checkpoint keys), never a constant
captured by the trace: the graphs hold only the computation, and the weights are stored once,
in the bundle's weights.safetensors, however many graphs use them.

Shapes are fixed (MLX's shapeless export cannot replay `reshape`): batch 1, a prompt of at
most P tokens (image tokens included) right-padded to P, and a KV cache of L positions per
layer. prefill.mlxfn holds one trace per prompt bucket P (MLX picks the trace whose input
shapes match the call), so a short prompt is not padded to the longest. With N image tokens, D the decoder width, V the real vocabulary (257152 for the
official checkpoints), K kv heads of hd dims:

    encode(pixels float32[1, S, S, 3], **vision weights)      -> [features float[1, N, D]]
    prefill(ids int32[1, P], length int32[1], features float[1, N, D], **decoder weights)
        -> [logprobs float32[1, V], keys_0, values_0, ..., keys_{n-1}, values_{n-1}]
    decode(token int32[1, 1], position int32[1], keys_0, values_0, ..., **decoder weights)
        -> [logprobs float32[1, V], keys_0, values_0, ...]

Cache entries are float[1, K, L, hd]. Prefill writes positions 0..P-1 (entries past `length`
hold the padding's keys, entries from P on are zeros); decode writes its token's keys at `position` and attends to
positions <= `position`, so padding left in the cache is never seen: a position is either
masked or overwritten before it becomes visible.

The prefix-LM mask: the whole prompt (image + `<bos>` + prefix + "\\n") is the bidirectional
prefix, so in prefill every query attends to every real key (`j < length`) in every layer --
Gemma2's sliding window never narrows the prefix block (pg_edge.model.gemma.prefix_lm_mask). A decoded
token is causal: it sees keys `j <= position`, and on sliding layers only `position - j <
window` (pg_edge.model.gemma.decode_mask). logprobs are computed as pg_edge.generate samples from
them: float32 logits minus their logsumexp, over the real vocabulary only, so no id past it
can ever be chosen.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..model.paligemma import PaliGemmaModel

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
DECODER_PREFIXES = ("language_model.",)


class _CaptureCache:
    """Prefill: keeps the keys/values a layer computes (attention runs on them unchanged)."""

    def __init__(self):
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values


class _SlotCache:
    """Decode: writes one position of a fixed float[1, K, L, hd] buffer, attends to all of it."""

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array):
        self.keys, self.values = keys, values
        self.start = mx.concatenate([mx.zeros((2,), mx.int32), position.astype(mx.int32),
                                     mx.zeros((1,), mx.int32)])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        axes = (0, 1, 2, 3)
        self.keys = mx.slice_update(self.keys, keys, self.start, axes)
        self.values = mx.slice_update(self.values, values, self.start, axes)
        return self.keys, self.values


def weight_subset(weights: dict, prefixes: tuple) -> dict:
    return {k: v for k, v in weights.items() if k.startswith(prefixes)}


@contextmanager
def _weights_from_inputs(model: PaliGemmaModel, weights: dict):
    """Point the model's parameters at the traced inputs (so none is captured as a constant),
    and back at its own arrays afterwards (the trace's placeholders cannot be evaluated)."""
    own = [(k, v) for k, v in tree_flatten(model.parameters()) if k in weights]
    model.update(tree_unflatten(list(weights.items())))
    try:
        yield
    finally:
        model.update(tree_unflatten(own))


def _logprobs(model: PaliGemmaModel, h_last: mx.array, vocab: int) -> mx.array:
    """float[1, 1, D] final hidden state -> float32[1, vocab] log-probabilities (see module doc)."""
    logits = model.language_model.logits(h_last)[:, -1].astype(mx.float32)
    V = logits.shape[-1]
    # = logits + pg_edge.generate.vocab_mask(V, vocab), bit for bit, without a V-sized mask.
    lg = mx.concatenate([logits[:, :vocab], mx.full((1, V - vocab), -mx.inf)], axis=-1) if V > vocab else logits
    return (lg - mx.logsumexp(lg, axis=-1, keepdims=True))[:, :vocab]


def make_encode(model: PaliGemmaModel) -> Callable:
    def encode(pixels, **weights):
        with _weights_from_inputs(model, weights):
            return [model.encode_image(pixels)]

    return encode


def make_prefill(model: PaliGemmaModel, max_context: int, vocab: int) -> Callable:
    """Prefill for prompts padded to P = ids.shape[1] (one trace per P; see bundle.py)."""
    lm = model.language_model
    n_layers = len(lm.model.layers)

    def prefill(ids, length, features, **weights):
        with _weights_from_inputs(model, weights):
            return run(ids, length, features)

    def run(ids, length, features):
        P = ids.shape[1]
        caches = [_CaptureCache() for _ in range(n_layers)]
        h = model.embed(ids, features)
        real = mx.arange(P)[None, :] < length[:, None]  # bool[1, P]: real keys
        mask = mx.broadcast_to(real[:, None, None, :], (1, 1, P, P))
        h = lm.model(h, {w: mask for w in set(model.layer_windows())}, 0, caches)
        last = mx.take(h, (length - 1).astype(mx.int32), axis=1)  # float[1, 1, D]
        pad = [(0, 0), (0, 0), (0, max_context - P), (0, 0)]
        out = [_logprobs(model, last, vocab)]
        for c in caches:
            out += [mx.pad(c.keys, pad), mx.pad(c.values, pad)]
        return out

    return prefill


def make_decode(model: PaliGemmaModel, max_context: int, vocab: int) -> Callable:
    lm = model.language_model

    def decode(token, position, *cache, **weights):
        with _weights_from_inputs(model, weights):
            return run(token, position, cache)

    def run(token, position, cache):
        caches = [_SlotCache(cache[2 * i], cache[2 * i + 1], position) for i in range(len(cache) // 2)]
        h = model.embed(token, None)
        k_idx = mx.arange(max_context)[None, :]
        q_idx = position.astype(mx.int32)[:, None]
        masks = {}
        for w in set(model.layer_windows()):
            ok = k_idx <= q_idx
            if w is not None:
                ok = ok & ((q_idx - k_idx) < w)
            masks[w] = ok[:, None, None, :]  # bool[1, 1, 1, L]
        h = lm.model(h, masks, position.astype(mx.int32), caches)
        out = [_logprobs(model, h, vocab)]
        for c in caches:
            out += [c.keys, c.values]
        return out

    return decode


def model_weights(model: PaliGemmaModel) -> dict:
    """{checkpoint key: array} of every parameter the model holds (what the graphs take)."""
    return dict(tree_flatten(model.parameters()))
