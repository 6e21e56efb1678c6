"""Scores of a model on the shapes task: the four numbers the demo model is held to.

    caption   exact match of the whole caption              ("caption en")
    count     exact match of the answer                     ("answer en how many shapes?")
    detect    mean box IoU over ground-truth objects        ("detect circle ; square ; triangle")
    segment   mean mask IoU over ground-truth objects       ("segment circle ; square ; triangle"),
              masks at the original image size (pg_edge.model.vae.box_mask pastes them)

Matching (detect and segment): per image and per kind, greedily pair the predicted and
ground-truth objects of that kind by decreasing IoU, each ground truth and each prediction used
at most once; a ground truth left unpaired scores 0. Extra predictions are counted in
`extra` but do not lower the mean. Generations are batched (`batch` rows at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pg_edge.tasks import parse
from pg_edge.demo import shapes as S

ALL = S.KINDS


@dataclass
class Scores:
    caption: float
    count: float
    detect: float
    segment: float
    extra: int  # predicted objects matched to no ground truth (detect + segment)
    n_images: int
    n_objects: int  # ground-truth objects: what detect and segment average over

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def merge(self, other: "Scores") -> "Scores":
        """The scores of both sample sets together (weighted by images or by objects)."""
        n, m = self.n_images + other.n_images, self.n_objects + other.n_objects
        by_image = lambda k: (getattr(self, k) * self.n_images + getattr(other, k) * other.n_images) / n
        by_object = lambda k: (getattr(self, k) * self.n_objects + getattr(other, k) * other.n_objects) / m
        return Scores(by_image("caption"), by_image("count"), by_object("detect"), by_object("segment"),
                      self.extra + other.extra, n, m)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) edge-coordinate boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def match(gt: Sequence, pred: Sequence, iou) -> tuple[list[float], int]:
    """Greedy matching of one kind: (IoU per ground truth, 0 when unmatched; unmatched preds)."""
    pairs = sorted(((iou(g, p), i, j) for i, g in enumerate(gt) for j, p in enumerate(pred)), reverse=True)
    scores, used_g, used_p = [0.0] * len(gt), set(), set()
    for value, i, j in pairs:
        if value > 0 and i not in used_g and j not in used_p:
            scores[i] = value
            used_g.add(i)
            used_p.add(j)
    return scores, len(pred) - len(used_p)


def object_scores(sample: S.Sample, objects, use_masks: bool) -> tuple[list[float], int]:
    """IoU per ground-truth object of `sample` (boxes, or masks when use_masks), extras."""
    out, extra = [], 0
    labels = {o.label for o in objects} - set(ALL)
    extra += sum(1 for o in objects if o.label in labels)  # a label that is no kind never matches
    for kind in ALL:
        gt = [s for s in sample.shapes if s.kind == kind]
        pred = [o for o in objects if o.label == kind]
        if use_masks:
            gt_m = [S.shape_mask(s, sample.image.size) for s in gt]
            pred_m = [o.mask for o in pred if o.mask is not None]
            extra += len(pred) - len(pred_m)
            scores, e = match(gt_m, pred_m, mask_iou)
        else:
            scores, e = match([s.box for s in gt], [o.box for o in pred], box_iou)
        out += scores
        extra += e
    return out, extra


def evaluate(pg, samples: Sequence[S.Sample], batch: int = 128, vae=None) -> Scores:
    """Run the four tasks on `samples` with `pg` (a pg_edge.PaliGemma) and score them."""
    from pg_edge.model.vae import add_masks
    from pg_edge.tasks.calls import find_vae

    decoder = find_vae(pg, vae)
    images = [s.image for s in samples]
    prompts = {"caption": S.CAPTION_PROMPT, "count": S.COUNT_PROMPT,
               "detect": S.detect_prompt(ALL), "segment": S.segment_prompt(ALL)}
    max_tokens = {"caption": 16, "count": 4, "detect": 24, "segment": 72}
    texts = {t: [] for t in prompts}
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        for task, prompt in prompts.items():
            results = pg.generate_batch(chunk, [prompt] * len(chunk), max_tokens=max_tokens[task])
            texts[task] += [r.text for r in results]
    cap = np.mean([t.strip() == S.caption(s.shapes) for t, s in zip(texts["caption"], samples)])
    cnt = np.mean([t.strip() == S.count(s.shapes) for t, s in zip(texts["count"], samples)])
    det, seg, extra = [], [], 0
    for s, dt, st in zip(samples, texts["detect"], texts["segment"]):
        d, e1 = object_scores(s, parse.parse_objects(dt, s.image.size).objects, use_masks=False)
        objs = add_masks(parse.parse_objects(st, s.image.size).objects, decoder, s.image.size)
        m, e2 = object_scores(s, objs, use_masks=True)
        det += d
        seg += m
        extra += e1 + e2
    return Scores(float(cap), float(cnt), float(np.mean(det)), float(np.mean(seg)), extra, len(samples), len(det))
