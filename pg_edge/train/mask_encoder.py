"""The mask encoder of PaliGemma's VQ-VAE, in MLX: masks -> 16 `<seg>` codes, for training targets.

big_vision makes segmentation targets with the encoder half of vae-oid.npz (big_vision/pp/proj/
paligemma/segmentation.py); pg_edge/model/vae.py runs the decoder half. The npz is a PyTorch state dict:

    encoder.{0,2,4,6}         Conv2d 4x4 stride 2, "same" padding (1 each side), then ReLU
                              1 -> 16 -> 32 -> 64 -> 128 channels (64 -> 32 -> 16 -> 8 -> 4 px)
    encoder.{8,9}.net.{0,2,4} 2 ResBlocks: 3x3, ReLU, 3x3, ReLU, 1x1, + skip
    encoder.10                Conv2d 1x1 128 -> E
    _vq_vae._embedding        float[128, E]: each of the 4x4 cells takes its nearest row

    mask float[B, 64, 64] in [0, 1] (the object's box crop, resized) -> 2 * mask - 1
    -> ... -> float[B, 4, 4, E] -> codes int[B, 16] (row-major over the 4x4 grid)

Channel counts and E are read from the file. Weights are OIHW (torch); MLX convolutions take
OHWI. A file without `encoder.*` (pg-edge convert-vae's output, the demo's vae-oid.npz, which
kept only the decoder) cannot make targets: `load_mask_encoder` raises NoMaskEncoder, saying so.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import PgEdgeError

MASK_SIZE = 64  # the encoder's input side
DOWNSAMPLE = (0, 2, 4, 6)  # encoder.N of the four stride-2 convs
RES_BLOCKS = (8, 9)
LAST = 10
CODEBOOK_KEY = "_vq_vae._embedding"


class NoMaskEncoder(PgEdgeError):
    """The file holds no VQ-VAE encoder (masks cannot become `<seg>` targets)."""


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise PgEdgeError(f"VQ-VAE file not found: {path}")
    if path.suffix == ".safetensors":
        from ..checkpoint.safetensors_check import load_safetensors

        weights, _ = load_safetensors(path)
        return {k: np.asarray(v.astype(mx.float32)) for k, v in weights.items()}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise PgEdgeError(f"cannot read {path} as a .npz file: {str(err).splitlines()[0]}") from None


class MaskEncoder:
    """`encode(masks)`: float[B, 64, 64] in [0, 1] -> int[B, 16] codes (numpy)."""

    def __init__(self, arrays: dict[str, np.ndarray], where: str = "the VQ-VAE"):
        def conv(name: str, kernel: int) -> tuple[mx.array, mx.array]:
            w, b = arrays.get(f"{name}.weight"), arrays.get(f"{name}.bias")
            if w is None or b is None:
                raise PgEdgeError(f"{where}: missing {name}.weight / .bias of the mask encoder")
            if w.ndim != 4 or w.shape[2:] != (kernel, kernel) or b.shape != (w.shape[0],):
                raise PgEdgeError(f"{where}: {name}.weight has shape {w.shape}, expected "
                                  f"(out, in, {kernel}, {kernel}) with a bias of (out,)")
            return mx.array(np.transpose(w, (0, 2, 3, 1)).astype(np.float32)), mx.array(b.astype(np.float32))

        if not any(k.startswith("encoder.") for k in arrays):
            raise NoMaskEncoder(f"{where} holds no VQ-VAE encoder (only the decoder, which turns <seg> "
                                "codes into masks, not masks into codes)")
        self.down = [conv(f"encoder.{i}", 4) for i in DOWNSAMPLE]
        self.res = [[conv(f"encoder.{i}.net.{j}", k) for j, k in ((0, 3), (2, 3), (4, 1))] for i in RES_BLOCKS]
        self.last = conv(f"encoder.{LAST}", 1)
        book = arrays.get(CODEBOOK_KEY)
        if book is None or book.ndim != 2 or book.shape[1] != self.last[0].shape[0]:
            raise PgEdgeError(f"{where}: {CODEBOOK_KEY} must be (codes, {self.last[0].shape[0]}), "
                              f"got {None if book is None else book.shape}")
        if self.down[0][0].shape[-1] != 1:
            raise PgEdgeError(f"{where}: encoder.0 must take 1 channel, takes {self.down[0][0].shape[-1]}")
        self.codebook = mx.array(book.astype(np.float32))

    def encode(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=np.float32)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise PgEdgeError(f"masks must be [B, {MASK_SIZE}, {MASK_SIZE}], got {masks.shape}")
        x = mx.array(2.0 * masks[..., None] - 1.0)  # [B, 64, 64, 1] in [-1, 1]
        for w, b in self.down:
            x = mx.maximum(mx.conv2d(x, w, stride=2, padding=1) + b, 0)
        for block in self.res:
            h = x
            for n, (w, b) in enumerate(block):
                h = mx.conv2d(h, w, padding=(w.shape[1] - 1) // 2) + b
                h = mx.maximum(h, 0) if n < 2 else h
            x = x + h
        w, b = self.last
        z = (mx.conv2d(x, w) + b).reshape(-1, self.codebook.shape[1])  # [B * 16, E], row-major cells
        dist = (z * z).sum(-1, keepdims=True) + (self.codebook * self.codebook).sum(-1) - 2 * z @ self.codebook.T
        return np.asarray(mx.argmin(dist, axis=-1)).reshape(-1, 16).astype(np.int64)


def load_mask_encoder(path: str | Path) -> MaskEncoder:
    """The encoder of a vae-oid.npz-layout file; NoMaskEncoder when it has none, PgEdgeError when
    it cannot be read or its shapes are not the encoder's."""
    path = Path(path).expanduser()
    return MaskEncoder(_read(path), where=str(path))
