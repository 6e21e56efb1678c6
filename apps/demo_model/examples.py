"""Training examples of the shapes task: (image, prefix, suffix) for each task.

Shared by the torch pretraining (apps/demo_model/pretrain.py) and the JSONL files that
`pg-edge finetune` reads (apps/demo_model/finetune_data.py). Dev tool: never imported by pg_edge.
"""
from __future__ import annotations

import numpy as np

from pg_edge.demo import shapes as S


PROMPT_FORMS = ("single", "pair", "all", "absent")


def parse_shares(text: str) -> dict[str, float]:
    """"a=0.3,b=0.7" -> {"a": 0.3, "b": 0.7}, normalised to sum 1."""
    shares = {k: float(v) for k, v in (kv.split("=") for kv in text.split(","))}
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def kinds_for(rng: np.random.Generator, sample: S.Sample | None = None,
              forms: dict[str, float] | None = None) -> list[str]:
    """Object names for a detect/segment prompt, in random order.

    forms None (how pretraining drew them): half the time all three kinds, otherwise one or two
    at random (often absent from the image: the answer is then empty). forms {form: share} over
    PROMPT_FORMS draws the form first, then names for `sample`: "single" one kind in the image,
    "pair" two kinds with one at least in the image, "all" the three, "absent" one or two kinds
    none of which is in the image (the answer is empty; "all" when every kind is there)."""
    if forms is None:
        k = 3 if rng.random() < 0.5 else int(rng.integers(1, 3))
        return [S.KINDS[i] for i in rng.permutation(3)[:k]]
    names = list(forms)
    form = names[rng.choice(len(names), p=[forms[n] for n in names])]
    present = sorted({s.kind for s in sample.shapes})
    absent = [k for k in S.KINDS if k not in present]
    if form == "absent" and absent:
        k = 1 if len(absent) == 1 or rng.random() < 0.6 else 2
        return [absent[i] for i in rng.permutation(len(absent))[:k]]
    if form == "single":
        return [present[int(rng.integers(len(present)))]]
    if form == "pair":
        one = present[int(rng.integers(len(present)))]
        other = [k for k in S.KINDS if k != one][int(rng.integers(2))]
        return [one, other] if rng.random() < 0.5 else [other, one]
    return [S.KINDS[i] for i in rng.permutation(3)]


def example(sample: S.Sample, task: str, rng: np.random.Generator, seg_codes=None,
            allow_empty: bool = True, forms: dict[str, float] | None = None) -> tuple[str, str]:
    """(prefix, suffix) of `task` in caption / count / detect / segment for `sample`; `forms`:
    how detect/segment prompts name kinds (kinds_for); `allow_empty=False` redraws the object
    names until one is in the image."""
    if task == "caption":
        return S.CAPTION_PROMPT, S.caption(sample.shapes)
    if task == "count":
        return S.COUNT_PROMPT, S.count(sample.shapes)
    kinds = kinds_for(rng, sample, forms)
    while not allow_empty and not any(sh.kind in kinds for sh in sample.shapes):
        kinds = kinds_for(rng, sample, forms)
    if task == "detect":
        return S.detect_prompt(kinds), S.detect_target(sample.shapes, kinds)
    if task == "segment":
        return S.segment_prompt(kinds), S.segment_target(sample.shapes, kinds, seg_codes)
    raise ValueError(task)
