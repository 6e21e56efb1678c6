"""`pg-edge run MODEL --image PATH --prompt TEXT`: generate, streaming to the terminal."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default {max_tokens})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The generation keywords of `PaliGemma.generate` / `.stream`: max_tokens and one Sampling."""
    from pg_edge.generate import Sampling

    return dict(max_tokens=args.max_tokens,
                sampling=Sampling(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed))


def add_adapters_arg(p: argparse.ArgumentParser) -> None:
    """`--adapters DIR`, the one definition every command that loads a model shares (run, caption,
    ocr, ask, detect, segment, explain, label; the desktop example too)."""
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="adapters folder written by `pg-edge finetune` (OUT/adapters), applied on the model")


def check_adapters(path: str | None) -> None:
    """One-line PgEdgeError when --adapters names no adapters folder (checked before the model
    loads; pg_edge.adapters checks the files' contents against the model at load)."""
    if path is None:  # (pg_edge.adapters pulls in mlx-lm's LoRA layers: only when asked)
        return
    from pg_edge.adapters import ADAPTER_CONFIG, ADAPTER_FILE
    from pg_edge.errors import PgEdgeError

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PgEdgeError(f"adapters folder not found: {path}")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_FILE) if not (folder / f).is_file()]
    if missing:
        raise PgEdgeError(f"{path} is not an adapters folder (no {' or '.join(missing)}; "
                          "`pg-edge finetune --export adapters` writes OUT/adapters)")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text for an image and a prompt",
                       description="Run a converted PaliGemma model on one image and prompt.")
    p.add_argument("model", help="converted folder, mlx-community folder, or hub id")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en" or "detect cat"')
    add_sampling_args(p)
    add_adapters_arg(p)
    p.add_argument("--attention", choices=["window", "global"], default="window",
                   help="PaliGemma 2's sliding-window layers past 4096 tokens (896 px): window "
                   "(default, as transformers) or global (as big_vision, which trained them)")
    p.add_argument("--kv-bits", type=int, choices=[8], default=None,
                   help="keep the KV cache quantized to 8 bits: about half a bf16 cache's memory "
                   "and reads (its agreement with the float cache: docs/performance.md)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token ids, timings, peak memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pg_edge
    from pg_edge.inputs.images import load_image

    image = load_image(args.image)  # a bad image or adapters folder fails before the model loads
    check_adapters(args.adapters)
    pg = pg_edge.load(args.model, adapters=args.adapters, attention=args.attention, kv_bits=args.kv_bits)
    if args.json:
        result = pg.generate(image, args.prompt, **sampling_kwargs(args))
        print(json.dumps(result.to_dict()))
        return 0
    result = None
    for chunk in pg.stream(image, args.prompt, **sampling_kwargs(args)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        result = chunk.result or result
    sys.stdout.write("\n")
    print(f"[{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated, "
          f"{result.generation_tps:.1f} tok/s, peak {result.peak_memory_gb:.2f} GB]", file=sys.stderr)
    return 0
