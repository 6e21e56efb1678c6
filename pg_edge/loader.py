"""One load pipeline: folder or hub id -> config -> model -> sanitize -> quantize skeleton ->
load_weights(strict=True).

Loads pg_edge's converted folders, mlx-vlm / mlx-community folders (same layout) and, for
convenience, original Hugging Face checkpoints (converted in memory: keys renamed, conv
transposed) — which layout a file has is read from its safetensors metadata, never guessed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from .config import PaliGemmaConfig
from .errors import CheckpointError
from .paligemma import PaliGemmaModel
from .weights import sanitize

# What a converted or HF folder needs; everything else on the hub is skipped when downloading.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
# Files of a model folder beside config.json and the weights (tokenizer, processor, generation
# settings): copied along by every tool that writes a folder (converters, fine-tune export).
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
)
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve(path_or_id: str | os.PathLike, allow_patterns=HUB_PATTERNS) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (HF_TOKEN, HF_HUB_OFFLINE
    and the local cache are honoured). Only the files listed in `allow_patterns` are fetched."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; expected a model folder")
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder not found: {s}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(s, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"{s} is not in the local Hugging Face cache and cannot be downloaded ({err})") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot download {s}: {str(err).splitlines()[0]}") from None


def read_config(folder: Path) -> PaliGemmaConfig:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"missing {f}")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{f} is not valid JSON: {err}") from None
    return PaliGemmaConfig.from_dict(raw)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in index order; pickled weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [f.name for f in folder.iterdir() if f.name.endswith(REFUSED_SUFFIXES)]
        if pickled:
            raise CheckpointError(
                f"{folder} has only pickled weights ({pickled[0]}); pg_edge never unpickles "
                "(it can run code). Use a safetensors checkpoint."
            )
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def read_shard(f: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of one safetensors file, with a one-line error when corrupt."""
    try:
        tensors, meta = mx.load(str(f), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as err:
        msg = str(err).splitlines()[0]
        raise CheckpointError(f"cannot read {f.name} (truncated or corrupt safetensors?): {msg}") from None
    return tensors, meta or {}


def iter_shards(folder: Path) -> Iterator[tuple[Path, dict, dict]]:
    for f in weight_files(folder):
        tensors, meta = read_shard(f)
        yield f, tensors, meta


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
    config.check_shapes({k: tuple(v.shape) for k, v in weights.items()})
    tie = "language_model.lm_head.weight" not in weights
    model = PaliGemmaModel(config, tie_word_embeddings=tie)
    qconf = config.raw.get("quantization") or config.raw.get("quantization_config")
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
    return model


def load_weights(folder: Path, config: PaliGemmaConfig) -> dict:
    tie = config.tie_word_embeddings
    weights = {}
    for _, tensors, meta in iter_shards(folder):
        weights.update(sanitize(tensors, mlx_layout=meta.get("format") == "mlx", tie_word_embeddings=tie))
    return weights


def load_model(path_or_id: str | os.PathLike, dtype: mx.Dtype | None = None) -> tuple[PaliGemmaModel, PaliGemmaConfig, Path]:
    """(model, config, folder). `dtype` casts float weights (e.g. mx.float32 for parity)."""
    folder = resolve(path_or_id)
    config = read_config(folder)
    weights = load_weights(folder, config)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    return build_model(config, weights), config, folder
