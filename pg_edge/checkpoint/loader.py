"""One load pipeline: folder or hub id -> config -> model -> sanitize -> quantize skeleton ->
load_weights(strict=True).

Reading the folder (files, config, shards) is pg_edge.checkpoint.folder's; this module builds the model.
Loads pg_edge's converted folders, mlx-vlm / mlx-community folders (same layout) and, for
convenience, original Hugging Face checkpoints (converted in memory: keys renamed, conv
transposed) — which layout a file has is read from its safetensors metadata, never guessed.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import cpu
from ..errors import CheckpointError
from ..model.config import PaliGemmaConfig
from ..model.paligemma import PaliGemmaModel
from .folder import iter_shards, quantization_section, read_config, resolve
from .weights import sanitize


def quantization_predicate(qconf: dict, weights: dict):
    """mlx-lm's convention: per-module overrides keyed by module path (a dict, or False for
    "left in float"), otherwise a module is quantized where its `.scales` are present."""

    def predicate(path: str, module: nn.Module):
        if path in qconf:
            return qconf[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in weights

    return predicate


def build_model(config: PaliGemmaConfig, weights: dict) -> PaliGemmaModel:
    """Model skeleton for these (sanitized) weights, quantized where the config says so,
    with the weights loaded strictly (every parameter present, no stray tensor)."""
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    config.adopt_vision_mlp_width(shapes)
    config.check_shapes(shapes)
    tie = "language_model.lm_head.weight" not in weights
    model = PaliGemmaModel(config, tie_word_embeddings=tie)
    qconf = quantization_section(config.raw)
    if qconf:
        nn.quantize(
            model,
            group_size=qconf.get("group_size", 64),
            bits=qconf.get("bits", 4),
            mode=qconf.get("mode", "affine"),
            class_predicate=quantization_predicate(qconf, weights),
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise CheckpointError(f"weights do not fit the model: {str(err).splitlines()[0][:400]}") from None
    model.eval()
    cpu.apply(model)  # on the CPU backend: its variants of the model classes (pg_edge/cpu)
    return model


def load_weights(folder: Path, config: PaliGemmaConfig) -> dict:
    tie = config.tie_word_embeddings
    weights = {}
    for _, tensors, meta in iter_shards(folder):
        weights.update(sanitize(tensors, mlx_layout=meta.get("format") == "mlx", tie_word_embeddings=tie))
    return weights


def load_model(path_or_id: str | os.PathLike, dtype: mx.Dtype | None = None) -> tuple[PaliGemmaModel, PaliGemmaConfig, Path]:
    """(model, config, folder) for a folder or hub id. `dtype` casts float weights (e.g.
    mx.float32 for parity)."""
    folder = resolve(path_or_id)
    return *load_folder(folder, dtype), folder


def load_folder(folder: Path, dtype: mx.Dtype | None = None) -> tuple[PaliGemmaModel, PaliGemmaConfig]:
    """(model, config) for a folder `resolve` has already found (pg_edge.load resolves once)."""
    config = read_config(folder)
    weights = load_weights(folder, config)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    return build_model(config, weights), config
