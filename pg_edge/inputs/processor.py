"""Images + prompts -> the model's inputs: `Processor.__call__` is the one function from image
paths and prompt strings to token ids (with `<image>` x N placeholders) and pixel arrays.

Images: pg_edge/inputs/images.py (`preprocess_image`). Token rows: pg_edge/inputs/tokenizer.py
(`Tokenizer.prompt_ids`: `<image>` x N, `<bos>`, prefix, "\\n"). Rows are left-padded here.

This module imports no MLX: the NumPy reference path and the tools share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PgEdgeError
from .images import ImageInput, preprocess_image
from .tokenizer import Tokenizer


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (ids int32[B, T], valid bool[B, T]), left-padded with `pad_id` to the
    longest row, so every row's next generated token lands at index T."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int32)
    valid = np.zeros((len(rows), T), dtype=bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        valid[b, T - len(r):] = True
    return ids, valid


@dataclass
class Inputs:
    """A batch ready for the model; rows are left-padded to a common length.

    input_ids: int32[B, T]; valid: bool[B, T]; pixel_values: float32[B, S, S, 3]. Every token
    is prefix (pg_edge.model.masks: inference has no suffix in the prompt).
    """

    input_ids: np.ndarray
    valid: np.ndarray
    pixel_values: np.ndarray


class Processor:
    """Images + prefixes -> model inputs (`Inputs`, left-padded); decoding output ids is the
    tokenizer's (`Tokenizer.decode`)."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    def __call__(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> Inputs:
        if len(images) != len(prompts) or not prompts:
            raise PgEdgeError(f"need one image per prompt (at least one), got {len(images)} images "
                             f"and {len(prompts)} prompts")
        rows = [self.tokenizer.prompt_ids(p, self.num_image_tokens) for p in prompts]
        ids, valid = left_pad(rows, self.tokenizer.pad_id)
        pixels = np.stack([preprocess_image(im, self.image_size) for im in images])
        return Inputs(ids, valid, pixels)
