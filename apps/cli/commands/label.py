"""`pg-edge label MODEL FOLDER --detect "cat ; dog" -o labels.json [--segment]`:
auto-label a folder of images into COCO JSON (pg_edge/tasks/label.py), resumable."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pg_edge.cli.commands.run import add_adapters_arg, add_sampling_args, check_adapters, sampling_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="auto-label a folder of images into COCO JSON",
                       description="Detect (or segment) the named objects in every image of a "
                       "folder and write COCO JSON; a rerun with the same -o resumes.")
    p.add_argument("model", help="converted folder, mlx-community folder, or hub id (demo: the built-in model)")
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--detect", required=True, metavar="OBJECTS",
                   help='object names separated by ";", e.g. "cat ; dog" (the COCO categories)')
    p.add_argument("-o", "--output", required=True, help="COCO JSON file to write (or resume)")
    p.add_argument("--segment", action="store_true", help="masks too (COCO RLE in 'segmentation')")
    p.add_argument("--vae", default=None, help="mask decoder for --segment (default: "
                   "vae.safetensors in the model folder)")
    p.add_argument("--force", action="store_true", help="start over instead of resuming the output "
                   "(replaces only a labels file pg-edge label wrote)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_adapters_arg(p)
    add_sampling_args(p, max_tokens=128)
    p.set_defaults(func=run)


def model_name(args: argparse.Namespace) -> str:
    """The model as the labels file records it (a resume must use the same): the model's name,
    and the resolved adapters folder when --adapters is given."""
    name = Path(args.model).name
    return f"{name} + adapters {Path(args.adapters).expanduser().resolve()}" if args.adapters else name


def run(args: argparse.Namespace) -> int:
    from pg_edge.tasks.label import check_label_output, label_folder
    from pg_edge.tasks import parse, prompts
    from pg_edge.errors import PgEdgeError
    from pg_edge.pipeline import load

    if not Path(args.folder).is_dir():  # inputs checked before the model loads
        raise PgEdgeError(f"not a folder: {args.folder}")
    prompts.detect(args.detect)
    check_adapters(args.adapters)
    if args.vae is not None and not Path(args.vae).is_file():
        raise PgEdgeError(f"mask decoder not found: {args.vae}")
    from pg_edge.checkpoint.output_check import local_input

    check_label_output(args.output, [args.folder, local_input(args.model), args.vae, args.adapters], args.force)
    pg = load(args.model, adapters=args.adapters)
    counts = label_folder(pg, args.folder, args.detect, args.output, segment=args.segment,
                          vae=args.vae, gen=sampling_kwargs(args), force=args.force,
                          quiet=args.quiet, model_name=model_name(args))
    resumed = f", {counts['resumed']} done before" if counts["resumed"] else ""
    print(f"wrote {args.output}: {counts['images']} images, {counts['annotations']} annotations, "
          f"{counts['skipped']} skipped{resumed}", file=sys.stderr)
    return 0
