"""`pg-edge explain MODEL --image IMG --prompt P [-o DIR]`: one generation, stage by stage.

Prints each stage with its shapes and numbers (pg_edge.tasks.explain) and, with `-o DIR`, writes the
pictures: the model's input with its patch grid, the token layout, the attention mask of this
input, and the parsed answer (boxes, masks). Bad input gets the one-line errors of `pg-edge run`;
DIR may not be or hold an input, and pictures in it are replaced only if pg-edge drew them.
"""
from __future__ import annotations

import argparse
import sys

from pg_edge.cli.commands.run import add_adapters_arg, check_adapters


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="run one generation and show every stage: shapes, tokens, mask, top candidates",
                       description="Run one greedy generation and show each stage with its shapes and numbers.")
    p.add_argument("model", help="converted folder, mlx-community folder, hub id, or demo")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en" or "detect cat"')
    p.add_argument("-o", "--output", default=None, help="folder for the pictures (created)")
    add_adapters_arg(p)
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    p.add_argument("--top", type=int, default=5, help="candidates shown per generated token (1-20, default 5)")
    p.add_argument("--vae", default=None, help="mask decoder for segment prompts (default: the model folder's)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the teacher-forced pass that checks the drawn mask against generation "
                   "(it costs about one more prefill)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pg_edge
    from pg_edge.errors import PgEdgeError
    from pg_edge.tasks.explain import explain
    from pg_edge.tasks.explain_draw import check_folder
    from pg_edge.checkpoint.output_check import local_input
    from pg_edge.inputs.images import load_image
    from pg_edge.inputs.checks import check_max_tokens

    image = load_image(args.image)  # a bad image, setting or output fails before the model loads
    check_max_tokens(args.max_tokens)
    check_adapters(args.adapters)
    if not 1 <= args.top <= 20:
        raise PgEdgeError(f"--top must be from 1 to 20, got {args.top}")
    inputs = [args.image, local_input(args.model), args.vae, args.adapters]
    if args.output:  # never an input; replaces only pictures an earlier explain drew
        check_folder(args.output, inputs)
    pg = pg_edge.load(args.model, adapters=args.adapters)
    ex = explain(pg, image, args.prompt, max_tokens=args.max_tokens, top_k=args.top, vae=args.vae,
                 check=not args.no_check)
    ex.model = args.model  # the name as given ("demo", a hub id), not the resolved folder
    print(ex.to_text())
    if args.output:
        for path in ex.save(args.output, inputs):
            print(f"wrote {path}", file=sys.stderr)
    return 0
