"""`pg-edge quantize SRC -o DST`: 4/8-bit quantization of a converted folder, with a report."""
from __future__ import annotations

import argparse

from pg_edge.quantize.recipes import DEFAULT_RECIPE, RECIPES, UNSET


def add_parser(sub) -> None:
    recipes = "; ".join(f"{name}: " + ", ".join(f"{c} {b or 'float'}" for c, b in mix.items())
                        for name, mix in RECIPES.items())
    p = sub.add_parser(
        "quantize",
        help="quantize a converted folder to 4/8 bits, per component, and report the quality",
        description="Quantize a float pg_edge (or mlx-vlm) folder with MLX's group-wise affine "
        "quantization. Components: vision (SigLIP), connector, decoder, embed (embeddings and "
        f"the tied LM head). Recipes: {recipes}. Default: {DEFAULT_RECIPE}. The report gives "
        "size, bits per weight and agreement with the float model (top-1, KL, max logit error) "
        "on built-in probe images and prompts.",
    )
    p.add_argument("src", help="float converted folder (from `pg-edge convert`)")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("-q", "--bits", type=int, default=None, metavar="BITS",
                   help="decoder bits, 4 or 8 (default: the recipe's)")
    add_mix_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def add_mix_args(p: argparse.ArgumentParser) -> None:
    """Group size, per-component bits, recipe and probes: shared with `pg-edge convert -q`."""
    p.add_argument("--group-size", type=int, default=64, help="columns per scale: 32, 64 (default) or 128")
    for comp in ("vision", "connector", "embed"):
        p.add_argument(f"--{comp}-bits", default=UNSET, metavar="4|8|none",
                       help=f"{comp} bits, or none to leave it float (default: the recipe's)")
    p.add_argument("--recipe", default=None, help=f"named mix: {', '.join(RECIPES)} (default {DEFAULT_RECIPE})")
    p.add_argument("--probes", type=int, default=4, help="probe inputs to score (0 = size report only)")


def run(args: argparse.Namespace) -> int:
    from pg_edge.quantize.folder import quantize
    from pg_edge.quantize.recipes import resolve_settings

    settings = resolve_settings(bits=args.bits, group_size=args.group_size, vision_bits=args.vision_bits,
                                connector_bits=args.connector_bits, embed_bits=args.embed_bits,
                                recipe=args.recipe)
    report = quantize(args.src, args.output, settings, force=args.force, probes=args.probes,
                      quiet=args.quiet or args.json)
    print(report.to_json() if args.json else report.to_text())
    return 0
