"""`pg-edge verify` figures on the test fixtures: MLX vs the NumPy reference (float32), and each
quantization recipe against its float source through MLX and through the reference.

    .venv/bin/python bench/verify_fixtures.py

Uses fixtures/quantizable.py's random-weight PaliGemma 1 and 2 (widths that every group size
divides) and the test tokenizer; everything is built in a temporary folder.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.tokenizer import build_tokenizer  # noqa: E402
from fixtures.quantizable import make_quantizable_checkpoint  # noqa: E402

from pg_edge.convert.hf import convert_hf  # noqa: E402
from pg_edge.eval.verify import verify  # noqa: E402
from pg_edge.quantize import quantize  # noqa: E402

RECIPES = ("all8", "decoder4-vision8", "all4")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(root / "tokenizer")
        for v in (1, 2):
            hf = make_quantizable_checkpoint(root / f"hf{v}", tok, version=v)
            f = convert_hf(hf, root / f"f{v}", dtype="float32", quiet=True)
            r = verify(str(f))
            print(f"PG{v} float32, MLX vs reference: max rel {r.mlx['max_rel_err']:.1e}  "
                  f"top-1 {r.mlx['top1_agreement']:.3f}  KL {r.mlx['mean_kl']:.1e}  greedy {r.greedy_agreement:.0%}")
            for recipe in RECIPES:
                q = quantize(f, root / f"{recipe}{v}", recipe, probes=0).output
                r = verify(str(q), str(f))
                m, ref = r.mlx, r.reference
                print(f"PG{v} {recipe:<17} vs float: MLX top-1 {m['top1_agreement']:.3f} KL {m['mean_kl']:.3f} "
                      f"max rel {m['max_rel_err']:.3f} | reference top-1 {ref['top1_agreement']:.3f} "
                      f"KL {ref['mean_kl']:.3f} | greedy {r.greedy_agreement:.0%}")


if __name__ == "__main__":
    main()
