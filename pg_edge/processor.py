"""Image preprocessing and the PaliGemma prompt layout (the tokenizer is pg_edge/tokenizer.py).

Preprocessing is the one Hugging Face's SiglipImageProcessor (PIL backend) does, step for step,
so pixels agree within float rounding: transparency composited onto white, RGB, square resize
with PIL bicubic (no aspect ratio kept; files and bytes are first turned upright by their EXIF
orientation, see image_limits), x/255 in float64 then float32, (x - 0.5) / 0.5 -> [-1, 1].
Output is NHWC (MLX convolution layout), not HF's NCHW.

Prompt: `<image>` x N, `<bos>`, prefix, "\\n" (tokenized separately, as big_vision does), then
for training the suffix and `<eos>`. Special ids come from the tokenizer files, never constants.

This module imports no MLX: the NumPy reference path and the tools share it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from PIL import Image

from . import image_limits
from .errors import ImageError, PgEdgeError
from .tokenizer import Tokenizer

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def load_image(image: ImageInput) -> Image.Image:
    """A path, raw bytes, a PIL image or an HWC uint8 array -> PIL image (not yet RGB).

    Files and bytes go through pg_edge.image_limits: pixel limit checked before decoding, known
    formats only, first frame, EXIF orientation applied, 16-bit grey scaled to 8 bits."""
    if isinstance(image, Image.Image):
        image_limits.check_size(image, "<PIL image>")
        return image_limits.normalise_mode(image, "<PIL image>")
    if isinstance(image, np.ndarray):
        return image_limits.from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_limits.open_image(image, "<bytes>")
    if not isinstance(image, (str, os.PathLike)):
        raise ImageError(f"an image must be a path, bytes, a PIL image or a uint8 array, got {type(image).__name__}")
    return image_limits.open_image(image, str(image))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (what transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(image: ImageInput, size: int) -> np.ndarray:
    """Any image -> float32[size, size, 3] in [-1, 1]."""
    img = to_rgb(load_image(image))
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


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
