"""Task subcommands over pg_edge.tasks.calls:

    pg-edge caption MODEL --image I [--lang en] [--adapters DIR]
    pg-edge ocr     MODEL --image I
    pg-edge ask     MODEL --image I "what is on the table?" [--lang en]
    pg-edge detect  MODEL --image I "cat ; dog" [-o boxes.png] [--json]
    pg-edge segment MODEL --image I "cat" [--vae vae.safetensors] [-o masks.png] [--json]

Text goes to stdout (one line per object for detect/segment: label and box in pixels, only
objects labelled with a name asked for; others go to stderr as "unmatched", and so does a notice
when the answer was cut off at --max-tokens);
`--json` prints pg_edge.tasks.calls.to_json instead; `-o` saves the image with boxes, labels and
masks drawn (atomically; never over the input image, model or VAE, and over an existing file only
if pg-edge drew it: pg_edge.checkpoint.output_check). Inputs are checked (image readable, output
format known, VAE present) before the model is loaded. Every task takes `--adapters DIR` (a
`pg-edge finetune` export), so a detection or segmentation fine-tune gives parsed boxes and masks
here as the base model does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pg_edge.cli.commands.run import add_adapters_arg, add_sampling_args, check_adapters, sampling_kwargs

TASKS = {
    "caption": "a short caption of the image",
    "ocr": "the text in the image",
    "ask": "answer a question about the image",
    "detect": "boxes around the named objects",
    "segment": "boxes and masks of the named objects",
}


def add_parser(sub) -> None:
    for task, what in TASKS.items():
        p = sub.add_parser(task, help=what, description=f"PaliGemma task: {what}.")
        p.add_argument("model", help="converted folder, mlx-community folder, or hub id")
        p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
        if task == "ask":
            p.add_argument("question", help='e.g. "what colour is the car?"')
        if task in ("detect", "segment"):
            p.add_argument("objects", help='object names separated by ";", e.g. "cat ; dog"')
            p.add_argument("-o", "--output", default=None,
                           help="save the image with the boxes%s drawn (PNG keeps colours exact); "
                           "never the input image, and an existing file only if pg-edge drew it"
                           % (" and masks" if task == "segment" else ""))
        if task == "segment":
            p.add_argument("--vae", default=None,
                           help="mask decoder made by `pg-edge convert-vae`; default: "
                           "vae.safetensors in the model folder")
        if task in ("caption", "ask"):
            p.add_argument("--lang", default="en", help="language code of the answer (default en)")
        add_adapters_arg(p)
        add_sampling_args(p)
        p.add_argument("--json", action="store_true",
                       help="print one JSON object: text, objects (boxes in pixels, masks as RLE), timings")
        p.set_defaults(func=run, task=task)


def _check_output(path: str | None) -> None:
    from PIL import Image

    from pg_edge.errors import PgEdgeError

    if path is not None and Path(path).suffix.lower() not in Image.registered_extensions():
        raise PgEdgeError(f"cannot tell the image format of {path}; use .png or .jpg")


def run(args: argparse.Namespace) -> int:
    from pg_edge.tasks import calls
    from pg_edge.errors import PgEdgeError
    from pg_edge.pipeline import load
    from pg_edge.inputs.images import load_image

    from pg_edge.checkpoint.output_check import check_output, local_input, save_drawing

    image = load_image(args.image)  # a bad image, output name or VAE fails before the model loads
    _check_output(getattr(args, "output", None))
    check_adapters(args.adapters)
    vae = getattr(args, "vae", None)
    if vae is not None and not Path(vae).is_file():
        raise PgEdgeError(f"mask decoder not found: {vae}")
    if getattr(args, "output", None):  # never an input; an existing file only if pg-edge drew it
        check_output(args.output, True, kind="drawing", inputs=[args.image, local_input(args.model), vae, args.adapters])
    pg = load(args.model, adapters=args.adapters)
    gen = sampling_kwargs(args)
    if args.task == "caption":
        result = calls.caption(pg, image, args.lang, **gen)
    elif args.task == "ocr":
        result = calls.ocr(pg, image, **gen)
    elif args.task == "ask":
        result = calls.ask(pg, image, args.question, args.lang, **gen)
    elif args.task == "detect":
        result = calls.detect(pg, image, args.objects, **gen)
    else:
        result = calls.segment(pg, image, args.objects, vae=vae, **gen)

    if getattr(args, "output", None):
        save_drawing(calls.draw(result, image), args.output)
    if args.json:
        print(json.dumps(calls.to_json(result)))
    elif args.task in ("detect", "segment"):
        for obj in result.objects:
            box = ", ".join(f"{v:.1f}" for v in obj.box)
            area = ""
            if obj.mask is not None:
                area = f"  mask {int(obj.mask.sum())} px"
            elif args.task == "segment":  # the model wrote a box without its 16 <seg> codes
                area = "  (no mask: the answer has no <seg> codes for it)"
            print(f"{obj.label or '(no label)'}  [{box}]{area}")
        if not result.objects:
            print("(nothing found)")
        for obj in result.unmatched:
            box = ", ".join(f"{v:.1f}" for v in obj.box)
            print(f"unmatched (not asked for): {obj.label or '(no label)'}  [{box}]", file=sys.stderr)
        for s in result.skipped:
            print(f"skipped {s.text!r}: {s.reason}", file=sys.stderr)
    else:
        print(result.text)
    if args.task in ("detect", "segment") and result.truncated:
        print(f"cut off at the token limit ({args.max_tokens} tokens): objects may be missing; "
              "raise it with --max-tokens", file=sys.stderr)
    if getattr(args, "output", None) and not args.json:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
