"""Hugging Face PaliGemma checkpoints (folder or hub id, any of the three key layouts)
-> a pg_edge converted folder.

Streams shard by shard: each source shard is read, renamed to the classic keys, transposed where
MLX's layout differs, cast, and written before the next is read, so peak memory stays near one
shard. Checks before writing anything: model type, tokenizer, weights format (pickled `.bin`
files are refused, never unpickled); after the last shard: every parameter the model needs is
present with the right shape and nothing else is.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from pg_edge.config import PaliGemmaConfig
from pg_edge.errors import CheckpointError
from pg_edge.folder import (HUB_PATTERNS, FolderWriter, Progress, is_quantized, iter_shards, read_config,
                            resolve, weight_files)
from pg_edge.paligemma import PaliGemmaModel
from pg_edge.processor import Tokenizer
from pg_edge.weights import sanitize

from . import parse_dtype

HUB_FILES = HUB_PATTERNS + ["tokenizer*", "special_tokens_map.json", "added_tokens.json"]


def expected_shapes(config: PaliGemmaConfig, tie: bool) -> dict[str, tuple]:
    """Parameter shapes of the float model for this config (nothing is allocated: MLX is lazy)."""
    model = PaliGemmaModel(config, tie_word_embeddings=tie)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_complete(config: PaliGemmaConfig, got: dict[str, tuple], tie: bool) -> None:
    want = expected_shapes(config, tie)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for k, shape in want.items():
        if got[k] != shape:
            raise CheckpointError(f"{k} has shape {got[k]}, expected {shape} from config.json")


def convert_hf(src: str | Path, out: str | Path, *, dtype: str = "bfloat16", force: bool = False,
               quiet: bool = False) -> Path:
    """Convert; returns the output folder. Raises CheckpointError / PgEdgeError on bad input."""
    target = parse_dtype(dtype)
    folder = resolve(src, allow_patterns=HUB_FILES)
    config = read_config(folder)
    if is_quantized(config.raw):
        raise CheckpointError(f"{src} is already quantized; convert from the float checkpoint")
    Tokenizer(folder)  # fail now, not after writing gigabytes, if the tokenizer is missing/bad
    files = weight_files(folder)
    tie = config.tie_word_embeddings
    progress = Progress(len(files), "convert", quiet)
    with FolderWriter(out, force=force, source=str(src), converter="hf") as writer:
        for i, (f, tensors, meta) in enumerate(iter_shards(folder), 1):
            tensors = sanitize(tensors, mlx_layout=meta.get("format") == "mlx", tie_word_embeddings=tie)
            tensors = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                       for k, v in tensors.items()}
            writer.add_shard(tensors)
            progress.update(i, f.name, writer.nbytes)
            del tensors
        shapes = writer.shapes()
        config.adopt_vision_mlp_width(shapes)
        config.check_shapes(shapes)
        check_complete(config, shapes, tie)
        raw = dict(config.raw)
        raw["torch_dtype"] = dtype  # informational, as HF and mlx-vlm write it
        return writer.finish(raw, source_folder=folder)
