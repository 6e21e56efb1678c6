"""Next-token cross-entropy on the suffix only (the PaliGemma paper's objective).

The logits at position t predict token t + 1, so the target suffix + eos tokens at positions
P .. P+n-1 are predicted by positions P-1 .. P+n-2: the "\\n" that ends the prefix predicts the
first suffix token. Image, prefix and padding tokens are never targets: under the
bidirectional prefix, position i already sees token i + 1, so a loss there would be a copy task
(docs/finetuning.md, "Loss on the suffix only").

Only the hidden states of those predicting positions go through the LM head: with a
257216-row vocabulary the head is most of the work for short suffixes, and a full
float[B, T, V] would be mostly thrown away. The softmax runs over every row of the head (as
transformers does; big_vision's head has the 257152 real rows only, the extra rows are the
mean embedding and add ~nothing).

Normalisation:
    "example"  each example's mean over its suffix tokens, then the mean over examples
               (big_vision: short and long answers weigh the same)
    "token"    the mean over all suffix tokens of the batch (transformers' loss)
`denominator` lets a shard of a batch (a micro-batch, or one rank's part) be normalised by the
whole batch's count, so that summing the shards' losses and gradients gives exactly the
whole batch's: no rescaling by the number of shards, and exact even when shards hold
different numbers of tokens.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.paligemma import PaliGemmaModel
from .data import Batch

NORMALIZATIONS = ("example", "token")


def suffix_targets(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos int32[B, L], target int32[B, L], live bool[B, L]), L = most suffix tokens in a row.

    pos[b, j] is the position whose logits predict target[b, j]; live is False on fillers."""
    counts = batch.loss_mask.sum(axis=1)
    L = max(int(counts.max()), 1)
    B = batch.loss_mask.shape[0]
    pos = np.zeros((B, L), dtype=np.int32)
    tgt = np.zeros((B, L), dtype=np.int32)
    live = np.zeros((B, L), dtype=bool)
    for b in range(B):
        t = np.flatnonzero(batch.loss_mask[b])
        if len(t) and t[0] == 0:
            raise ValueError("a target at position 0 has no position to predict it from")
        pos[b, :len(t)] = t - 1
        tgt[b, :len(t)] = batch.input_ids[b, t]
        live[b, :len(t)] = True
    return pos, tgt, live


def loss_weights(live: np.ndarray, normalize: str = "example", denominator: float | None = None) -> np.ndarray:
    """float32[B, L] so that loss = sum(weights * nll).

    denominator: the batch's example count ("example") or suffix-token count ("token");
    default: this batch's own."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    live = live.astype(np.float32)
    if normalize == "token":
        return live / np.float32(denominator or max(live.sum(), 1.0))
    per_example = np.maximum(live.sum(axis=1, keepdims=True), 1.0)
    return live / per_example / np.float32(denominator or live.shape[0])


def hidden_states(model: PaliGemmaModel, input_ids: mx.array, pixel_values: mx.array,
                  mask_ar: mx.array, valid: mx.array) -> mx.array:
    """The decoder's final hidden states float[B, T, D] of a right-padded batch.

    The model's own stages: vision -> embed -> the one prefix-LM mask builder -> decoder.
    Right padding puts every row's position 0 at index 0, hence offset 0."""
    feats = model.encode_image(pixel_values)
    h = model.embed(input_ids, feats)
    masks = model.masks(mask_ar, valid, *input_ids.shape)
    return model.language_model.model(h, masks, 0)


def token_nll(model: PaliGemmaModel, input_ids: mx.array, pixel_values: mx.array, mask_ar: mx.array,
              valid: mx.array, pos: mx.array, target: mx.array) -> mx.array:
    """float32[B, L]: -log p(target[b, j] | tokens before it) for the predicting positions."""
    h = hidden_states(model, input_ids, pixel_values, mask_ar, valid)
    h = mx.take_along_axis(h, pos[..., None], axis=1)  # [B, L, D]
    logits = model.language_model.logits(h).astype(mx.float32)  # [B, L, V]
    picked = mx.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def loss_inputs(batch: Batch, normalize: str = "example", denominator: float | None = None) -> dict:
    """The arrays `weighted_loss` takes, from a host batch."""
    pos, tgt, live = suffix_targets(batch)
    return {
        "input_ids": mx.array(batch.input_ids),
        "pixel_values": mx.array(batch.pixel_values),
        "mask_ar": mx.array(batch.mask_ar),
        "valid": mx.array(batch.valid),
        "pos": mx.array(pos),
        "target": mx.array(tgt),
        "weights": mx.array(loss_weights(live, normalize, denominator)),
    }


def weighted_loss(model: PaliGemmaModel, input_ids, pixel_values, mask_ar, valid, pos, target,
                  weights) -> mx.array:
    """Scalar sum(weights * nll): the function `nn.value_and_grad` differentiates."""
    nll = token_nll(model, input_ids, pixel_values, mask_ar, valid, pos, target)
    return (nll * weights).sum()


def suffix_loss(model: PaliGemmaModel, batch: Batch, normalize: str = "example",
                denominator: float | None = None) -> mx.array:
    """The suffix-only loss of one batch (scalar float32)."""
    return weighted_loss(model, **loss_inputs(batch, normalize, denominator))
