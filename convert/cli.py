"""`pg-edge convert SRC -o DIR`: official checkpoints -> a pg_edge converted folder.

SRC is a Hugging Face folder or hub id, or a big_vision checkpoint: `model.npz`, or the pieces
of a split one (`model.npz.part0`, any part, or `model.npz` when only the parts exist).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .npz import PART_RE


def is_big_vision(src: str) -> bool:
    """SRC names a .npz (or its .npz.part* pieces): the big_vision converter's input."""
    name = Path(src).name
    return name.endswith(".npz") or PART_RE.match(name) is not None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official checkpoint (HF folder, hub id, or big_vision .npz) to a pg_edge folder",
        description="Convert a PaliGemma 1/2 checkpoint to MLX safetensors. SRC is a local Hugging "
        "Face folder, a hub id (downloaded with huggingface_hub; HF_TOKEN and HF_HUB_OFFLINE are "
        "honoured), or a big_vision .npz from Kaggle / the -jax hub repos (bf16, f16 or f32; the "
        "28B model's .npz.part* pieces are read in place, no joined copy is made).",
    )
    p.add_argument("src", help="HF folder, hub id (google/paligemma2-3b-pt-224), or FILE.npz / FILE.npz.part0")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokenizer", default=None,
                   help="big_vision only: tokenizer.model / paligemma_tokenizer.model (or a folder "
                   "with one); default: one of those names beside the .npz")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pg_edge.errors import PgEdgeError

    t0 = time.perf_counter()
    if is_big_vision(args.src):
        from .big_vision import convert_big_vision

        out = convert_big_vision(args.src, args.output, dtype=args.dtype, force=args.force,
                                 tokenizer=args.tokenizer, quiet=args.quiet)
    else:
        if args.tokenizer is not None:
            raise PgEdgeError("--tokenizer is for big_vision .npz checkpoints; an HF checkpoint "
                              "brings its own tokenizer")
        from .hf import convert_hf

        out = convert_hf(args.src, args.output, dtype=args.dtype, force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
