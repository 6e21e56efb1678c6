"""big_vision's vae-oid.npz -> the MLX mask decoder file read by pg_edge.model.vae.load_mask_decoder.

vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz) is a PyTorch state dict saved with NumPy:

    _vq_vae._embedding        float[128, E]         codebook, E read from the file
    encoder.*                 the mask encoder (makes training targets; not needed to decode)
    decoder.0                 Conv2d E->128 1x1       weight OIHW (128, E, 1, 1)
    decoder.{2,3}.net.{0,2,4} ResBlock convs          OIHW (128, 128, 3|3|1, ...)
    decoder.{4,6,8,10}        ConvTranspose2d 4x4 s2  weight (in, out, 4, 4), torch's layout
    decoder.12                Conv2d 16->1 1x1        OIHW (1, 16, 1, 1)
    every conv also has a `.bias` (out,)

Written keys are the MLX model's own parameter names (see pg_edge/model/vae.py): the same `decoder.*`
names with weights in MLX layout (conv OIHW -> OHWI, conv-transpose (in, out, kH, kW) ->
(out, kH, kW, in), no spatial flip), and `_vq_vae._embedding` -> `vq_vae.embedding`. The
expected shapes come from a MaskDecoder built with the file's E, so this file and the model
cannot disagree. The metadata records the format, its version and E.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.checkpoint.atomic import save_safetensors
from pg_edge.checkpoint.folder import atomic_file
from pg_edge.model.vae import FORMAT, FORMAT_VERSION, MaskDecoder
from pg_edge.checkpoint.output_check import check_output

CODEBOOK_KEY = "_vq_vae._embedding"


def _source_key(mlx_key: str) -> str:
    return CODEBOOK_KEY if mlx_key == "vq_vae.embedding" else mlx_key


def _layouts(model: MaskDecoder) -> dict[str, tuple[int, ...]]:
    """MLX weight key -> axes that turn the torch array into the MLX one."""
    layouts = {}
    for name, module in model.named_modules():
        # ConvTranspose2d first: it is not a Conv2d subclass today, but be explicit anyway.
        if isinstance(module, nn.ConvTranspose2d):
            layouts[f"{name}.weight"] = (1, 2, 3, 0)  # (in, out, kH, kW) -> (out, kH, kW, in)
        elif isinstance(module, nn.Conv2d):
            layouts[f"{name}.weight"] = (0, 2, 3, 1)  # (out, in, kH, kW) -> (out, kH, kW, in)
    return layouts


def _read_npz(npz_path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CheckpointError(f"no such file: {npz_path}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read {npz_path} as a .npz file: {e}") from None


def vae_weights(source: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Checked MLX-layout float32 arrays keyed by MaskDecoder parameter names, and E.

    Raises CheckpointError naming the first missing key or the first key of the wrong shape.
    Keys the decoder does not use (the encoder, any EMA state) are ignored.
    """
    if CODEBOOK_KEY not in source:
        raise CheckpointError(f"missing key {CODEBOOK_KEY} (the VQ-VAE codebook)")
    codebook = source[CODEBOOK_KEY]
    if codebook.ndim != 2 or codebook.shape[0] != 128 or codebook.shape[1] < 1:
        raise CheckpointError(f"{CODEBOOK_KEY} has shape {codebook.shape}, expected (128, E)")
    embed_dim = int(codebook.shape[1])

    model = MaskDecoder(embed_dim)
    layouts = _layouts(model)
    out = {}
    for key, param in tree_flatten(model.parameters()):
        src_key = _source_key(key)
        axes = layouts.get(key)
        # The shape the torch file must hold: the MLX shape with the layout change undone.
        want = tuple(param.shape) if axes is None else tuple(
            param.shape[axes.index(i)] for i in range(len(axes)))
        if src_key not in source:
            raise CheckpointError(f"missing key {src_key} (expected shape {want})")
        array = source[src_key]
        if tuple(array.shape) != want:
            raise CheckpointError(f"{src_key} has shape {tuple(array.shape)}, expected {want}")
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{src_key} has dtype {array.dtype}, expected floating point")
        if not np.isfinite(array).all():
            raise CheckpointError(f"{src_key} holds NaN or infinite values")
        array = array.astype(np.float32)
        out[key] = np.ascontiguousarray(array.transpose(axes) if axes else array)
    return out, embed_dim


def convert_vae(npz_path: str | Path, out_path: str | Path, *, force: bool = False) -> Path:
    """Convert vae-oid.npz to an MLX safetensors file at `out_path` (written atomically).

    An existing `out_path` is replaced only with `force`, as the model converters do.
    """
    npz_path, out_path = Path(npz_path), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise PgEdgeError(f"output must end in .safetensors, got {out_path}")
    check_output(out_path, force, kind="vae", inputs=[npz_path])
    weights, embed_dim = vae_weights(_read_npz(npz_path))
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "embed_dim": str(embed_dim),
                "source": npz_path.name}
    with atomic_file(out_path) as tmp:  # a crash never leaves a half-written file under the real name
        save_safetensors(tmp, {k: mx.array(v) for k, v in weights.items()}, metadata=metadata)
    return out_path
