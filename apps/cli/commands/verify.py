"""`pg-edge verify MODEL [--against FLOAT]`: check a converted or quantized folder numerically."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="check a model against the NumPy reference, or against the checkpoint it came from",
        description="Run MODEL (MLX, float32) and an independent computation on probe images and task "
        "prompts and compare: top-1 agreement over teacher-forced positions, mean KL, max relative logit "
        "error, greedy agreement. Without --against the independent side is pg_edge's NumPy reference on "
        "the same weights (checks the MLX computation); with --against SOURCE, MODEL is compared with the "
        "checkpoint it came from (the original HF folder or hub id, or the float folder of a quantized "
        "MODEL) through MLX and through the reference (checks the conversion / the quantization). "
        "Exits 1 when a figure is past its limit.")
    p.add_argument("model", help="converted (or quantized) folder, or hub id")
    p.add_argument("--against", help="the source: original HF folder / hub id, or the float folder of a quantized MODEL")
    p.add_argument("--images", nargs="+", help="probe images (default: bundled photos and drawings)")
    p.add_argument("--prompts", nargs="+", help="probe prompts, each run on every --images image")
    p.add_argument("--probes", type=int, default=4, help="how many built-in probes without --images (default 4)")
    p.add_argument("--max-tokens", type=int, default=8, help="teacher-forced tokens per probe (default 8)")
    p.add_argument("--min-top1", type=float, help="fail below this top-1 agreement")
    p.add_argument("--max-kl", type=float, help="fail above this mean KL (nats)")
    p.add_argument("--max-rel", type=float, help="fail above this max |logit error| / max |logit|")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pg_edge.errors import PgEdgeError
    from pg_edge.eval.probes import probes_for
    from pg_edge.inputs.images import load_image
    from pg_edge.eval.verify import format_report, verify

    if args.prompts and not args.images:
        raise PgEdgeError("--prompts needs --images")
    probes = args.probes
    if args.images:
        for path in args.images:
            load_image(path)  # unreadable images fail before any model loads
        probes = probes_for(args.images, args.prompts or ["caption en"])
    report = verify(args.model, args.against, probes=probes, max_tokens=args.max_tokens,
                    limits={"min_top1": args.min_top1, "max_kl": args.max_kl, "max_rel": args.max_rel})
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    if not report.passed:
        print(f"pg-edge verify: FAIL: {'; '.join(report.failures)}", file=sys.stderr)
        return 1
    return 0
