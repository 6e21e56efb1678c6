"""The VQ-VAE mask decoder of PaliGemma segmentation, in MLX, and the box-mask step.

A segment output carries 16 `<segNNN>` codes per object. big_vision turns them into a mask
(big_vision/evaluators/proj/paligemma/transfers/segmentation.py, weights vae-oid.npz):

    codes int[B, 16] -> codebook (128, E) rows -> float[B, 4, 4, E] (row-major 4x4 grid)
    -> Conv1x1 E->128, ReLU -> 2 x ResBlock(3x3, ReLU, 3x3, ReLU, 1x1, + skip)
    -> 4 x (ConvTranspose 4x4 stride 2, torch padding 1, ReLU) 128->128->64->32->16
       (4 -> 8 -> 16 -> 32 -> 64 pixels)
    -> Conv1x1 16->1 -> float[B, 64, 64], roughly in [-1, 1] (no squashing: > 0 is "inside")

Then the 64x64 logits are resized bilinearly (Pillow, as big_vision's evaluator) into the
object's box and thresholded at 0, giving a full-image bool[H, W] mask.

Attribute names follow the PyTorch module the weights came from, so a converted file loads with
no rename table: `decoder` is a list laid out like the torch nn.Sequential, ReLUs included, so
`decoder.0`, `decoder.2.net.0`, `decoder.4` ... `decoder.12` keep their indices. The only rename
is the codebook: MLX leaves attributes starting with "_" out of `parameters()`, so
`_vq_vae._embedding` is stored as `vq_vae.embedding`. convert/vae.py does the rename and the
layout change (conv OIHW -> OHWI; conv-transpose (in, out, kH, kW) -> (out, kH, kW, in)).

Padding: MLX's conv_transpose2d `padding=p` has torch's meaning (output = (in - 1) * stride -
2p + k, here 2 * in) and takes the torch kernel without a spatial flip once transposed to
(out, kH, kW, in); tests/model/test_vae.py checks it against torch.nn.ConvTranspose2d.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.checkpoint.safetensors_check import load_safetensors
from pg_edge.tasks.parse import SEG_CODES, SEG_PER_OBJECT, DetectedObject

FORMAT = "pg_edge.mask_decoder"  # safetensors metadata "format" of a converted file
FORMAT_VERSION = "1"
HIDDEN = 128  # channels after the first conv and in the residual blocks
UPSAMPLE = (128, 64, 32, 16)  # output channels of the four transposed convs
GRID = 4  # 16 codes = a 4x4 grid; 4 upsamplings by 2 give 64x64
MASK_SIZE = GRID * 2 ** len(UPSAMPLE)


class Codebook(nn.Module):
    """`embedding`: float[num_codes, E], one row per `<segNNN>` code."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = mx.zeros((num_codes, dim))


class ResBlock(nn.Module):
    """x + net(x); `net` mirrors the torch Sequential (indices 0, 2, 4 hold weights)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = [
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.net:
            h = layer(h)
        return x + h


class MaskDecoder(nn.Module):
    """codes int[B, 16] in 0..127 -> mask logits float[B, 64, 64] (> 0 means inside)."""

    def __init__(self, embed_dim: int, num_codes: int = SEG_CODES):
        super().__init__()
        self.embed_dim = embed_dim
        self.vq_vae = Codebook(num_codes, embed_dim)
        layers = [nn.Conv2d(embed_dim, HIDDEN, 1), nn.ReLU(), ResBlock(HIDDEN), ResBlock(HIDDEN)]
        c_in = HIDDEN
        for c_out in UPSAMPLE:  # decoder.4, .6, .8, .10 (ReLUs at the odd indices)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 1))  # decoder.12
        self.decoder = layers

    def __call__(self, codes) -> mx.array:
        codes = mx.array(codes) if not isinstance(codes, mx.array) else codes
        if codes.ndim != 2 or codes.shape[1] != SEG_PER_OBJECT:
            raise PgEdgeError(f"mask codes must be int[B, {SEG_PER_OBJECT}], got {codes.shape}")
        if codes.size == 0:
            return mx.zeros((0, MASK_SIZE, MASK_SIZE))
        num_codes = self.vq_vae.embedding.shape[0]
        if mx.min(codes).item() < 0 or mx.max(codes).item() >= num_codes:
            raise PgEdgeError(f"mask codes must be in 0..{num_codes - 1}")
        batch = codes.shape[0]
        # Row-major: code k sits at grid cell (k // 4, k % 4), as big_vision's reshape.
        x = self.vq_vae.embedding[codes.reshape(-1).astype(mx.int32)]
        x = x.reshape(batch, GRID, GRID, self.embed_dim)
        for layer in self.decoder:
            x = layer(x)
        return x[..., 0]


def load_mask_decoder(path: str | Path) -> MaskDecoder:
    """A MaskDecoder from a file written by `convert.vae.convert_vae`."""
    try:
        weights, meta = load_safetensors(path)  # header checked in Python first
    except CheckpointError:
        raise
    except Exception as e:  # mlx raises RuntimeError/ValueError/OSError depending on the damage
        raise CheckpointError(f"cannot read mask decoder {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a pg_edge mask decoder (metadata format={meta.get('format')!r}); "
            "convert big_vision's vae-oid.npz with convert.vae.convert_vae")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported mask decoder format_version "
                              f"{meta.get('format_version')!r} (want {FORMAT_VERSION})")
    try:
        model = MaskDecoder(int(meta["embed_dim"]))
        model.load_weights(list(weights.items()), strict=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the mask decoder: {e}") from None
    mx.eval(model.parameters())
    return model


def box_mask(logits, box_px: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """64x64 logits + a box in original-image pixels -> bool[H, W] full-image mask.

    logits: float[64, 64] decoder output for one object.
    box_px: (x1, y1, x2, y2) floats; truncated with int() as big_vision's evaluator does.
    image_size: (width, height) of the original image.
    """
    width, height = (int(v) for v in image_size)
    x1, y1, x2, y2 = (int(v) for v in box_px)
    mask = np.zeros((height, width), dtype=bool)
    if x2 <= x1 or y2 <= y1:  # a one-bin box can vanish after int(), as in big_vision
        return mask
    # Pillow's float ("F") image resize: bilinear on the logits, then the sign decides, so the
    # boundary falls where the interpolated logit crosses 0.
    logit_img = Image.fromarray(np.ascontiguousarray(logits, dtype=np.float32))
    inside = np.asarray(logit_img.resize((x2 - x1, y2 - y1), Image.BILINEAR)) > 0
    # Paste the part of the box that lies inside the image (parser boxes always do).
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if cx2 > cx1 and cy2 > cy1:
        mask[cy1:cy2, cx1:cx2] = inside[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
    return mask


def add_masks(objects: Sequence[DetectedObject], decoder: MaskDecoder,
              image_size: tuple[int, int]) -> list[DetectedObject]:
    """Copies of `objects` with `mask` bool[H, W] set where they carry seg codes.

    All masks are decoded in one batch; objects without codes (detections) come back as is.
    """
    with_seg = [i for i, obj in enumerate(objects) if obj.seg is not None]
    out = list(objects)
    if not with_seg:
        return out
    logits = np.array(decoder(mx.array([objects[i].seg for i in with_seg], dtype=mx.int32)))
    for row, i in enumerate(with_seg):
        mask = box_mask(logits[row], objects[i].box, image_size)
        out[i] = dataclasses.replace(objects[i], mask=mask)
    return out
