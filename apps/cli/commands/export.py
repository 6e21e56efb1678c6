"""`pg-edge export MODEL -o BUNDLE`: the graphs and weights an app runs without Python."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export encode/prefill/decode graphs for C++ or Swift (MLX, no Python)",
        description="Write a bundle: encode/prefill/decode .mlxfn graphs (weights passed as "
                    "inputs), the weights once, the tokenizer and a manifest. See docs/embedding.md.")
    p.add_argument("model", help="converted folder (float or quantized), mlx-community folder, or hub id")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="text tokens a prompt may have after the image tokens, <bos> and \"\\n\" "
                        "included (default 64)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="tokens the KV cache holds for generation (default 256)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pg_edge.export import export_bundle

    export_bundle(args.model, args.output, prompt_tokens=args.prompt_tokens,
                  max_tokens=args.max_tokens, force=args.force, quiet=args.quiet)
    return 0
