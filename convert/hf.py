"""Hugging Face PaliGemma checkpoints (folder or hub id, any of the three key layouts)
-> a pg_edge converted folder.

`open_hf` checks everything it can before a tensor is read: model type, tokenizer, weights
format (pickled `.bin` files are refused, never unpickled), every safetensors header (the
format's rules, no tensor in two shards), and, from the headers alone, that every parameter the
model needs is present with the right shape and nothing else is. `convert_hf` then streams the
tensors one at a time (pg_edge.checkpoint.stream_convert): read with plain positioned reads, renamed to
the classic keys, transposed where MLX's layout differs, cast, and written at their offset in
the output shard, so memory stays near a few 32 MB blocks whatever the checkpoint's size. The
same opened source feeds `pg-edge convert -q`, which quantizes in the same pass.
"""
from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from pg_edge.model.config import PaliGemmaConfig
from pg_edge.demo import float_source_note
from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.folder import (HUB_PATTERNS, FolderWriter, Progress, is_quantized, read_config,
                                        resolve)
from pg_edge.model.paligemma import PaliGemmaModel
from pg_edge.checkpoint.output_check import check_output, local_input
from pg_edge.inputs.processor import Tokenizer
from pg_edge.checkpoint.stream_convert import Source, open_source, plan, write

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


def open_hf(src: str | Path, dtype: str = "bfloat16") -> Source:
    """The checked source of a conversion: a pg_edge.checkpoint.stream_convert.Source with `raw` (the
    config.json to write) and `dtype` (the MLX dtype floating tensors are cast to) set.
    Raises CheckpointError / PgEdgeError on bad input; the caller closes it."""
    target = parse_dtype(dtype)
    folder = resolve(src, allow_patterns=HUB_FILES)
    config = read_config(folder)
    if is_quantized(config.raw):
        raise CheckpointError(f"{src} is already quantized; convert from the float checkpoint"
                              + float_source_note(folder))
    Tokenizer(folder)  # fail now, not after writing gigabytes, if the tokenizer is missing/bad
    tie = config.tie_word_embeddings
    source = open_source(folder, tie=tie, dtype=target)  # every header checked
    try:
        shapes = {k: s.shape for k, s in source.float_specs().items()}
        config.adopt_vision_mlp_width(shapes)
        config.check_shapes(shapes)
        check_complete(config, shapes, tie)
    except BaseException:
        source.close()
        raise
    source.name, source.raw = str(src), dict(config.raw)
    source.raw["torch_dtype"] = dtype  # informational, as HF and mlx-vlm write it
    source.dtype = target
    return source


def convert_hf(src: str | Path, out: str | Path, *, dtype: str = "bfloat16", force: bool = False,
               quiet: bool = False) -> Path:
    """Convert; returns the output folder. Raises CheckpointError / PgEdgeError on bad input."""
    check_output(out, force, kind="model", inputs=[local_input(src)])  # before the download / reads
    with open_hf(src, dtype) as source:
        planned = plan(source)
        with FolderWriter(out, force=force, source=str(src), converter="hf", inputs=[source.folder]) as writer:
            write(planned, writer, Progress(len(planned), "convert", quiet))
            return writer.finish(source.raw, source_folder=source.folder)
