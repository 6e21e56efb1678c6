"""`pg-edge bench MODEL`: load time, vision encode, time to first token, decode speed and
peak memory of a converted folder on this machine (pg_edge.benchmark.measure)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time load, vision encode, first token and decode on this machine",
                       description="Measure a converted folder here: load time, vision-encode time, "
                       "time to first token, decode tokens/s (greedy, eos ignored, after a warm-up "
                       "call), peak memory (MLX counter and process RSS) and folder size. To compare "
                       "with mlx-vlm and mlx-lm, see bench/vs_peers.py in the repository.")
    p.add_argument("model", help="converted folder, mlx-community folder, or hub id")
    p.add_argument("--prompt", default="caption en", help='prompt (default "caption en")')
    p.add_argument("--tokens", type=int, default=32, help="decode steps to time (default 32)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; each figure is the best (default 1)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up call (a big model on a slow machine: it costs a whole prefill)")
    p.add_argument("--attention", choices=["window", "global"], default=None,
                   help="Gemma2 sliding-window layers: window (default) or global")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pg_edge.benchmark import measure, to_text

    r = measure(args.model, prompt=args.prompt, tokens=args.tokens, attention=args.attention, repeat=args.repeat,
                warmup=args.warmup)
    if args.json:
        r.pop("tokens", None)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    else:
        print(to_text(r))
    return 0
