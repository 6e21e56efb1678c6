"""`pg-edge convert SRC -o DIR [-q BITS]`: official checkpoints -> a pg_edge converted folder.

The command composes the two packages, which do not import each other. Without -q (--bits), convert/
writes the float folder. With -q, an HF checkpoint is opened and checked by convert/
(`open_hf`) and quantize/ streams it straight into the quantized folder, tensor by tensor (no
float copy on disk; the quality report's float model is the checkpoint loaded with the same
cast); a big_vision checkpoint is converted to a temporary float folder first, then quantized.

SRC is a Hugging Face folder or hub id, or a big_vision checkpoint: `model.npz`, or the pieces
of a split one (`model.npz.part0`, any part, or `model.npz` when only the parts exist).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pg_edge.convert.npz import PART_RE


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
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights")
    p.add_argument("--tokenizer", default=None,
                   help="big_vision only: tokenizer.model / paligemma_tokenizer.model (or a folder "
                   "with one); default: one of those names beside the .npz")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    q = p.add_argument_group("quantize in the same step (as `pg-edge quantize`)")
    q.add_argument("-q", "--bits", "--quantize", dest="bits", type=int, metavar="BITS", default=None,
                   help="decoder bits, 4 or 8: write a quantized folder (the float one is not kept); "
                   "as `pg-edge quantize -q`")
    from pg_edge.cli.commands.quantize import add_mix_args

    add_mix_args(q)
    q.add_argument("--json", action="store_true", help="with -q: print the quantization report as JSON")
    p.set_defaults(func=run)


def convert_any(src: str, out, *, dtype: str, force: bool, tokenizer, quiet: bool) -> Path:
    """HF folder / hub id or big_vision .npz -> converted folder."""
    from pg_edge.errors import PgEdgeError

    if is_big_vision(src):
        from pg_edge.convert.big_vision import convert_big_vision

        return convert_big_vision(src, out, dtype=dtype, force=force, tokenizer=tokenizer, quiet=quiet)
    if tokenizer is not None:
        raise PgEdgeError("--tokenizer is for big_vision .npz checkpoints; an HF checkpoint brings its own tokenizer")
    from pg_edge.convert.hf import convert_hf

    return convert_hf(src, out, dtype=dtype, force=force, quiet=quiet)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.bits is None:
        out = convert_any(args.src, args.output, dtype=args.dtype, force=args.force,
                          tokenizer=args.tokenizer, quiet=args.quiet)
        if not args.quiet:
            print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        return 0
    report = convert_and_quantize(args)
    print(report.to_json() if args.json else report.to_text())
    return 0


def convert_and_quantize(args: argparse.Namespace):
    """HF: one streamed pass, source -> quantized output. big_vision: convert to a float folder
    beside the output, quantize it into the output, delete it. Settings are checked before
    anything is converted; the output appears only when complete."""
    import shutil

    from pg_edge.checkpoint.atomic import clean_stale, temp_path
    from pg_edge.checkpoint.output_check import check_output, local_input
    from pg_edge.quantize import quantize
    from pg_edge.quantize.recipes import resolve_settings

    settings = resolve_settings(bits=args.bits, group_size=args.group_size, vision_bits=args.vision_bits,
                                connector_bits=args.connector_bits, embed_bits=args.embed_bits,
                                recipe=args.recipe)
    out = check_output(args.output, args.force, kind="model",
                       inputs=[local_input(args.src), local_input(args.tokenizer)])
    quiet = args.quiet or args.json
    if not is_big_vision(args.src):
        from pg_edge.errors import PgEdgeError

        if args.tokenizer is not None:
            raise PgEdgeError("--tokenizer is for big_vision .npz checkpoints; an HF checkpoint brings its own tokenizer")
        from pg_edge.convert.hf import open_hf

        with open_hf(args.src, args.dtype) as source:
            return quantize(source, out, settings=settings, force=args.force, probes=args.probes, quiet=quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)  # e.g. the float copy of a killed run
    work = temp_path(out, "float")  # removed on any failure or signal (pg_edge.checkpoint.atomic)
    work.mkdir()
    try:
        float_dir = convert_any(args.src, work / "float", dtype=args.dtype, force=False,
                                tokenizer=args.tokenizer, quiet=args.quiet)
        return quantize(float_dir, out, settings=settings, force=args.force, probes=args.probes, quiet=quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)
