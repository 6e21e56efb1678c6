"""Training examples of the shapes task: (image, prefix, suffix) for each task.

Shared by the torch pretraining (apps/demo_model/pretrain.py) and the JSONL files that
`pg-edge finetune` reads (apps/demo_model/finetune_data.py). Dev tool: never imported by pg_edge.
"""
from __future__ import annotations

import numpy as np

from pg_edge.demo import shapes as S


def kinds_for(rng: np.random.Generator) -> list[str]:
    """Object names for a detect/segment prompt: half the time all three kinds, otherwise one
    or two (often absent from the image: the answer is then empty); random order."""
    k = 3 if rng.random() < 0.5 else int(rng.integers(1, 3))
    return [S.KINDS[i] for i in rng.permutation(3)[:k]]


def example(sample: S.Sample, task: str, rng: np.random.Generator, seg_codes=None,
            allow_empty: bool = True) -> tuple[str, str]:
    """(prefix, suffix) of `task` in caption / count / detect / segment for `sample`;
    `allow_empty=False` redraws the object names until one is in the image (pg-edge finetune
    refuses empty suffixes)."""
    if task == "caption":
        return S.CAPTION_PROMPT, S.caption(sample.shapes)
    if task == "count":
        return S.COUNT_PROMPT, S.count(sample.shapes)
    kinds = kinds_for(rng)
    while not allow_empty and not any(sh.kind in kinds for sh in sample.shapes):
        kinds = kinds_for(rng)
    if task == "detect":
        return S.detect_prompt(kinds), S.detect_target(sample.shapes, kinds)
    if task == "segment":
        return S.segment_prompt(kinds), S.segment_target(sample.shapes, kinds, seg_codes)
    raise ValueError(task)
