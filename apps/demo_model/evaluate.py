"""Score a model folder on the shapes test split, per prompt form (the numbers
tests/apps/test_demo_model.py asserts).

    python -m apps.demo_model.evaluate FOLDER [--n 100] [--start 0] [--split test] [--vae VAE.safetensors] [--show N]

FOLDER: a converted or quantized folder, or "demo". Prints one JSON line: the score of every
form of pg_edge/demo/score.py (caption, count, detect_single / pair / all, segment_single / all,
absent) with how many images or objects each averages over, and the time taken; `--show N`
first prints the first N answers of each form. `--split valid` scores the validation split instead
(to choose between training checkpoints without looking at the test split the tests score).
"""
from __future__ import annotations

import argparse
import json
import time

import pg_edge
from pg_edge.demo import score, shapes as S


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--start", type=int, default=0, help="first image of the split")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--vae", default=None)
    p.add_argument("--show", type=int, default=0)
    a = p.parse_args()
    pg = pg_edge.load(a.folder)
    t0 = time.perf_counter()
    s = score.evaluate(pg, S.split(a.split, a.n, a.start), vae=a.vae, start=a.start)
    for form, texts in s.texts.items():
        for t in texts[:a.show]:
            print(f"{form}: {t!r}")
    print(json.dumps({"folder": a.folder, "split": a.split, **s.as_dict(), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
