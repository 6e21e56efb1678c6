"""`pg-edge convert SRC -o DIR`: official checkpoints -> a pg_edge converted folder."""
from __future__ import annotations

import argparse
import time


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official checkpoint (HF folder or hub id) to a pg_edge folder",
        description="Convert a PaliGemma checkpoint to MLX safetensors. SRC is a local Hugging "
        "Face folder or a hub id (downloaded with huggingface_hub; HF_TOKEN and HF_HUB_OFFLINE "
        "are honoured).",
    )
    p.add_argument("src", help="HF folder or hub id, e.g. google/paligemma2-3b-pt-224")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .hf import convert_hf

    t0 = time.perf_counter()
    out = convert_hf(args.src, args.output, dtype=args.dtype, force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
