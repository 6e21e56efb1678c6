"""Validation during fine-tuning: the suffix loss on held-out data, and the task metric on the
model's greedy outputs.

Task metric:
    exact_match  greedy output == suffix (whitespace at the ends ignored), fraction of examples
    box_iou      when the references hold boxes (`<locY1><locX1><locY2><locX2> label`): mean IoU
                 of each reference box with the predicted box in the same place of the output
                 (0 where the output has fewer boxes), over all reference boxes
Generation is the runtime's own greedy batch call (pg_edge.generate.generate_batch) on
left-padded prompts, so the numbers are what `pg-edge run` will produce with the trained model.
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..generate import generate_batch
from ..model.paligemma import PaliGemmaModel
from ..inputs.processor import left_pad
from ..tasks.parse import parse_objects
from .data import Dataset
from .loss import loss_inputs, weighted_loss

_IOU_FRAME = (1024, 1024)  # IoU does not depend on the image size: any frame will do


def validation_loss(model: PaliGemmaModel, data: Dataset, normalize: str = "example",
                    batch_size: int = 8) -> float:
    """The suffix loss over the whole dataset, normalised as in training."""
    index = np.arange(len(data))
    denom = len(data) if normalize == "example" else float(data.loss_tokens(index).sum())
    total = 0.0
    for start in range(0, len(data), batch_size):
        batch = data.batch(index[start:start + batch_size])
        loss = weighted_loss(model, **loss_inputs(batch, normalize, denom))
        total += float(loss)
    return total


def greedy_predictions(model: PaliGemmaModel, data: Dataset, batch_size: int = 8,
                       max_new_tokens: int | None = None) -> list[str]:
    """Greedy output text (eos excluded) of every example's image + prefix."""
    tok = data.tokenizer
    limit = max_new_tokens or max(len(s) for s in data.suffixes) + 2
    out: list[str] = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        ids, valid = left_pad([data.prompts[i] for i in idx], tok.pad_id)
        feats = model.encode_image(mx.array(np.stack([data.pixels(i) for i in idx])))
        results = generate_batch(model, tok, mx.array(ids), feats, valid=None if valid.all() else mx.array(valid),
                                 max_tokens=limit)
        out += [r.text for r in results]
    return out


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Boxes (x1, y1, x2, y2)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_iou(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean IoU over the reference boxes; None when no reference has a box."""
    scores = []
    for pred, ref in zip(predictions, references):
        want = parse_objects(ref, _IOU_FRAME).objects
        got = parse_objects(pred, _IOU_FRAME).objects
        scores += [_iou(w.box, got[i].box) if i < len(got) else 0.0 for i, w in enumerate(want)]
    return float(np.mean(scores)) if scores else None


def task_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    exact = [p.strip() == r.strip() for p, r in zip(predictions, references)]
    out = {"exact_match": float(np.mean(exact)) if exact else 0.0}
    iou = box_iou(predictions, references)
    if iou is not None:
        out["box_iou"] = iou
    return out


def evaluate(model: PaliGemmaModel, data: Dataset, normalize: str = "example", batch_size: int = 8,
             max_new_tokens: int | None = None) -> dict:
    """{"val_loss", "exact_match"[, "box_iou"]} with the model in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        loss = validation_loss(model, data, normalize, batch_size)
        preds = greedy_predictions(model, data, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    refs = [ex.suffix for ex in data.examples]
    return {"val_loss": loss, **task_metrics(preds, refs), "samples": preds[:3]}
