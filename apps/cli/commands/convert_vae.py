"""`pg-edge convert-vae VAE.npz -o OUT.safetensors`: big_vision's segmentation mask decoder
(vae-oid.npz) -> the file `pg-edge segment --vae` and `pg_edge.model.vae.load_mask_decoder` read."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-vae",
        help="convert big_vision's vae-oid.npz (segmentation masks) to MLX safetensors",
        description="Convert the VQ-VAE of PaliGemma segmentation (gs://big_vision/paligemma/"
        "vae-oid.npz) to MLX safetensors. Save it as vae.safetensors inside a converted model "
        "folder and `pg-edge segment` finds it without --vae.",
    )
    p.add_argument("src", help="vae-oid.npz")
    p.add_argument("-o", "--output", required=True, help="output file, ending in .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pg_edge.convert.vae import convert_vae

    out = convert_vae(args.src, args.output, force=args.force)
    print(f"wrote {out}")
    return 0
