"""Scores of a model on the shapes task, per prompt form: what the demo model is held to.

Forms (FORMS; prompts drawn per image from the image's index, so every run asks the same):

    caption         exact match of the whole caption               "caption en"
    count           exact match of the answer                      "answer en how many shapes?"
    detect_single   mean box IoU, one kind that is in the image    "detect circle"
    detect_pair     mean box IoU, two kinds (one at least present) "detect triangle ; circle"
    detect_all      mean box IoU, all three kinds, shuffled        "detect square ; circle ; triangle"
    segment_single  mean mask IoU, one kind that is in the image   "segment square"
    segment_all     mean mask IoU, all three kinds, shuffled       "segment triangle ; square ; circle"
    absent          share of empty answers, one kind NOT in the    "detect square" / "segment square"
                    image (detect on even images, segment on odd; images showing all three kinds
                    have no absent kind and are left out)

Box and mask IoUs average over the ground-truth objects OF THE KINDS ASKED; masks are compared
at the original image size (pg_edge.model.vae.box_mask pastes them). Matching: per image and per
kind, greedily pair predicted and ground-truth objects by decreasing IoU, each used at most
once; a ground truth left unpaired scores 0. Predictions matched to nothing, including objects
of a kind that was not asked for, are counted in `extra` (they do not lower the mean IoU).
Generations are batched: rows of every form with the same token budget go together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pg_edge.tasks import parse
from pg_edge.demo import shapes as S

ALL = S.KINDS
FORMS = ("caption", "count", "detect_single", "detect_pair", "detect_all", "segment_single", "segment_all",
         "absent")
# Token budget per form. A segment object is 4 + 16 codes + a label and " ;" (~22 tokens); three
# fit in 72. An empty answer is `<eos>` at once: 8 tokens are plenty to see one that is not.
MAX_TOKENS = {"caption": 16, "count": 4, "absent": 8, "detect_single": 24, "detect_pair": 24,
              "detect_all": 24, "segment_single": 72, "segment_all": 72}
SEED = 20  # the prompts' draws: numpy Generator((SEED, image index))


@dataclass
class Scores:
    """Per form: the score (rate or mean IoU) and how many items it averages over."""

    scores: dict[str, float]
    counts: dict[str, int]  # images (caption, count, absent) or ground-truth objects (IoUs)
    extra: int  # predicted objects matched to no asked-for ground truth (detect + segment forms)
    n_images: int
    texts: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __getitem__(self, form: str) -> float:
        return self.scores[form]

    def as_dict(self) -> dict:
        return {**{k: round(v, 4) for k, v in self.scores.items()}, "extra": self.extra, "n_images": self.n_images,
                "counts": dict(self.counts)}

    def merge(self, other: "Scores") -> "Scores":
        """The scores of both sample sets together (each form weighted by its counts)."""
        scores, counts = {}, {}
        for k in self.scores:
            n = self.counts[k] + other.counts[k]
            counts[k] = n
            scores[k] = (self.scores[k] * self.counts[k] + other.scores[k] * other.counts[k]) / n if n else 0.0
        return Scores(scores, counts, self.extra + other.extra, self.n_images + other.n_images)


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


def object_scores(sample: S.Sample, objects, use_masks: bool, kinds: Sequence[str] = ALL) -> tuple[list[float], int]:
    """IoU per ground-truth object of `sample` whose kind is in `kinds` (boxes, or masks when
    use_masks), and the predictions matched to none (any label outside `kinds` included)."""
    out = []
    extra = sum(1 for o in objects if o.label not in kinds)
    for kind in kinds:
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


def prompt_kinds(sample: S.Sample, index: int) -> dict[str, list[str] | None]:
    """The object names each detect/segment form asks of image `index` (None: the form skips
    it, an image with every kind has no absent one)."""
    rng = np.random.default_rng((SEED, index))
    present = sorted({s.kind for s in sample.shapes})
    absent = [k for k in ALL if k not in present]
    one = [present[int(rng.integers(len(present)))]]
    other = [k for k in ALL if k != one[0]][int(rng.integers(2))]
    pair = [one[0], other] if rng.random() < 0.5 else [other, one[0]]
    return {
        "detect_single": one, "segment_single": [present[int(rng.integers(len(present)))]],
        "detect_pair": pair,
        "detect_all": [ALL[i] for i in rng.permutation(3)], "segment_all": [ALL[i] for i in rng.permutation(3)],
        "absent": [absent[int(rng.integers(len(absent)))]] if absent else None,
    }


def prompts_for(samples: Sequence[S.Sample], start: int = 0, forms: Sequence[str] = FORMS):
    """[(form, row index into samples, prompt, kinds or None)] for every form and image;
    `start`: the first sample's index in its split (the prompts' seed)."""
    rows = []
    for i, s in enumerate(samples):
        kinds = prompt_kinds(s, start + i)
        for form in forms:
            if form == "caption":
                rows.append((form, i, S.CAPTION_PROMPT, None))
            elif form == "count":
                rows.append((form, i, S.COUNT_PROMPT, None))
            elif kinds[form] is not None:
                task = "segment" if form.startswith("segment") or (form == "absent" and (start + i) % 2) else "detect"
                rows.append((form, i, f"{task} " + " ; ".join(kinds[form]), kinds[form]))
    return rows


def evaluate(pg, samples: Sequence[S.Sample], batch: int = 256, vae=None, start: int = 0,
             forms: Sequence[str] = FORMS) -> Scores:
    """Run every form in `forms` on `samples` with `pg` (a pg_edge.PaliGemma) and score them;
    `start`: the index of samples[0] in its split (the prompts drawn depend on it)."""
    from pg_edge.tasks.calls import find_vae
    from pg_edge.model.vae import add_masks

    decoder = find_vae(pg, vae) if any(f.startswith("segment") or f == "absent" for f in forms) else None
    rows = prompts_for(samples, start, forms)
    texts: list[str] = [""] * len(rows)
    by_budget: dict[int, list[int]] = {}
    for r, (form, *_rest) in enumerate(rows):
        by_budget.setdefault(MAX_TOKENS[form], []).append(r)
    for budget, idx in sorted(by_budget.items()):
        for at in range(0, len(idx), batch):
            chunk = idx[at:at + batch]
            results = pg.generate_batch([samples[rows[r][1]].image for r in chunk], [rows[r][2] for r in chunk],
                                        max_tokens=budget)
            for r, res in zip(chunk, results):
                texts[r] = res.text
    values: dict[str, list[float]] = {f: [] for f in forms}
    extra = 0
    for (form, i, prompt, kinds), text in zip(rows, texts):
        s = samples[i]
        if form == "caption":
            values[form].append(float(text.strip() == S.caption(s.shapes)))
        elif form == "count":
            values[form].append(float(text.strip() == S.count(s.shapes)))
        elif form == "absent":
            values[form].append(float(text.strip() == ""))
        else:
            objects = parse.parse_objects(text, s.image.size).objects
            masks = form.startswith("segment")
            if masks:
                objects = add_masks(objects, decoder, s.image.size)
            ious, e = object_scores(s, objects, masks, kinds)
            values[form] += ious
            extra += e
    by_form = {f: [] for f in forms}
    for (form, *_rest), text in zip(rows, texts):
        by_form[form].append(text)
    return Scores({f: float(np.mean(v)) if v else 0.0 for f, v in values.items()},
                  {f: len(v) for f, v in values.items()}, extra, len(samples), by_form)
