"""Quality of every quantization recipe (and one-component ablations) on the tiny fixtures,
beside the full-size size of the same mix: the evidence behind quantize.recipes.DEFAULT_RECIPE.

    .venv/bin/python bench/quantize_recipes.py              # PG1 and PG2 fixtures, 6 probes
    .venv/bin/python bench/quantize_recipes.py --probes 3 --versions 1

The fixtures are fixtures/quantizable.py's random-weight PaliGemma 1 and 2 models (widths 64, so
every matrix can be quantized; SigLIP MLP 72, padded like the real 4304). Random weights are a
pessimistic stand-in for trained ones, so read the numbers as a ranking, not as the quality a
real checkpoint keeps. Sizes are bench/quantize_sizes.py's arithmetic for PaliGemma 2 3B-224.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.quantizable import make_quantizable_checkpoint  # noqa: E402

from bench.quantize_sizes import config_raw, predicted_bytes  # noqa: E402
from pg_edge.convert.hf import convert_hf  # noqa: E402
from pg_edge.quantize import quantize  # noqa: E402
from pg_edge.quantize.recipes import RECIPES, resolve_settings  # noqa: E402

# name -> resolve_settings arguments: the recipes, then all8 with one component at 4 bits
# (which component's 4 bits cost the most quality), then the default at other group sizes.
CASES = {r: dict(recipe=r) for r in RECIPES}
CASES.update({
    "all8, vision 4": dict(recipe="all8", vision_bits=4),
    "all8, connector 4": dict(recipe="all8", connector_bits=4),
    "all8, decoder 4": dict(recipe="all8", bits=4),
    "all8, embed 4": dict(recipe="all8", embed_bits=4),
    "default, group 32": dict(group_size=32),
})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=6)
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens per probe (teacher-forced)")
    p.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    full = config_raw("pg2-3b-224")
    bf16 = sum(predicted_bytes(full, None).values())
    with tempfile.TemporaryDirectory() as tmp:
        from fixtures.tokenizer import build_tokenizer

        tok = build_tokenizer(Path(tmp) / "tok")
        srcs = {}
        for v in args.versions:
            hf = make_quantizable_checkpoint(Path(tmp) / f"hf{v}", tok, version=v)
            srcs[v] = convert_hf(hf, Path(tmp) / f"f32_{v}", dtype="float32", quiet=True)
        head = f"{'mix':<20} {'3B-224 GB':>9} {'vs bf16':>7}"
        for v in args.versions:
            head += f" | PG{v}: {'top-1':>5} {'mean KL':>8} {'max rel':>7}"
        print(f"fixture agreement with float32 ({args.probes} probes x {args.tokens} teacher-forced tokens); "
              "size of the same mix for full PaliGemma 2 3B-224 (bf16 scales)")
        print(head)
        for name, kw in CASES.items():
            settings = resolve_settings(**kw)
            size = sum(predicted_bytes(full, settings).values())
            row = f"{name:<20} {size / 1e9:>9.3f} {size / bf16:>7.1%}"
            for v in args.versions:
                r = quantize(srcs[v], Path(tmp) / "q", settings=settings, probes=args.probes,
                             max_new_tokens=args.tokens, force=True)
                q = r.quality
                row += f" |      {q['top1_agreement']:>5.3f} {q['mean_kl']:>8.4f} {q['max_rel_err']:>7.3f}"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
