"""Score a model folder on the shapes test split (the numbers tests/apps/test_demo_model.py asserts).

    python -m apps.demo_model.evaluate FOLDER [--n 100] [--vae VAE.safetensors]

FOLDER: a converted or quantized folder, or "demo". Prints the four scores (pg_edge/demo/score.py)
and the time taken.
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
    p.add_argument("--vae", default=None)
    a = p.parse_args()
    pg = pg_edge.load(a.folder)
    t0 = time.perf_counter()
    s = score.evaluate(pg, S.split("test", a.n), vae=a.vae)
    print(json.dumps({"folder": a.folder, **s.as_dict(), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
