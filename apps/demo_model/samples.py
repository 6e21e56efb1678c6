"""The three sample images shipped with the demo model (pg_edge/demo/samples/) and their truth.

    python -m apps.demo_model.samples [OUT_DIR]

Drawn by pg_edge.demo.shapes from the seeds below (none is in the train / valid / test splits),
picked to show one, two and three shapes, all three kinds and all four colours. Also writes
OUT_DIR/labels.jsonl, the truth as `pg-edge finetune` data ({"image", "prefix", "suffix"}): per
image the caption, the count, `detect` of all three kinds, and `detect` of each kind alone (an
empty suffix when the image has none). The README's demo commands are checked against it
(tests/apps/test_demo_model.py), and `pg-edge finetune FOLDER --data pg_edge/demo/samples` runs on it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pg_edge.demo import shapes as S

SEEDS = {"shapes_1.png": 4_000_000_002, "shapes_2.png": 4_000_000_001, "shapes_3.png": 4_000_000_009}


def truth_lines(name: str, sample: S.Sample) -> list[dict]:
    rows = [(S.CAPTION_PROMPT, S.caption(sample.shapes)), (S.COUNT_PROMPT, S.count(sample.shapes)),
            (S.detect_prompt(S.KINDS), S.detect_target(sample.shapes, S.KINDS))]
    rows += [(S.detect_prompt([k]), S.detect_target(sample.shapes, [k])) for k in S.KINDS]
    return [{"image": name, "prefix": p, "suffix": s} for p, s in rows]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "pg_edge/demo/samples"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, seed in SEEDS.items():
        s = S.make_sample(seed)
        s.image.save(out / name)
        lines += truth_lines(name, s)
        print(f"{out / name}: {S.caption(s.shapes)}")
    (out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"{out / 'labels.jsonl'}: {len(lines)} lines")


if __name__ == "__main__":
    main()
