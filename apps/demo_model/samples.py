"""The three sample images shipped with the demo model (pg_edge/demo/samples/).

    python -m apps.demo_model.samples [OUT_DIR]

Drawn by pg_edge.demo.shapes from the seeds below (none is in the train / valid / test splits),
picked to show one, two and three shapes, all three kinds and all four colours.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pg_edge.demo import shapes as S

SEEDS = {"shapes_1.png": 4_000_000_002, "shapes_2.png": 4_000_000_001, "shapes_3.png": 4_000_000_009}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "pg_edge/demo/samples"
    out.mkdir(parents=True, exist_ok=True)
    for name, seed in SEEDS.items():
        s = S.make_sample(seed)
        s.image.save(out / name)
        print(f"{out / name}: {S.caption(s.shapes)}")


if __name__ == "__main__":
    main()
