"""Decode with the weights on 4 KB pages against the same weights on 2 MB pages (pg_edge.cpu.pages).

    python bench/hugepages.py [--folder FOLDER] [--tokens 32] [--rounds 4] [--layers 26]

Part 1, products alone: a decode step's products of PaliGemma 2 3B at 4 bits (each Gemma2
layer's q, k, v, o, gate, up, down, over --layers distinct layers, then the tied LM head:
random weights, group 64, bf16 scales, one token, each product its own call of pg_edge's
compiled matvec), in two copies: one left on 4 KB pages, one moved to 2 MB pages by
pg_edge.cpu.pages' own calls. The copies are timed alternately, round by round, in one process,
so the host's drift hits both alike. Effective GB/s = the weights' bytes / time.
Part 2 (with --folder, a quantized or bf16 folder, e.g. bench/random_folder.py's full-size
all4): the folder loaded twice, one copy's weights left on 4 KB pages and one settled
(`pages.settle`, what `pg_edge.load` does), decode tokens/s of each, alternately.
The read bandwidth (bench/bandwidth.py) is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PG_EDGE_HUGEPAGES"] = "off"  # loads leave 4 KB pages; the settled copies are moved below

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402

from bandwidth import read_gbs  # noqa: E402
from pg_edge.cpu import pages, qmv  # noqa: E402

HIDDEN = 2304
SHAPES = [(2048, HIDDEN), (1024, HIDDEN), (1024, HIDDEN), (HIDDEN, 2048),
          (9216, HIDDEN), (9216, HIDDEN), (HIDDEN, 9216)]  # q, k, v, o, gate, up, down
HEAD = (257216, HIDDEN)


def weight(n: int, k: int) -> tuple:
    """Random 4-bit weight in MLX's affine layout: (w uint32 [n, k / 8], scales, biases)."""
    w = mx.random.randint(0, 2**31, (n, k // 8)).astype(mx.uint32)
    scales = (mx.random.uniform(shape=(n, k // 64)) * 0.01).astype(mx.bfloat16)
    biases = (mx.random.uniform(shape=(n, k // 64)) * -0.05).astype(mx.bfloat16)
    mx.eval(w, scales, biases)
    return w, scales, biases


class Holder:
    """Weights in a module-like tree, for pages.settle (it reads `parameters()`)."""

    def __init__(self, weights: list[tuple]):
        self.weights = weights

    def parameters(self) -> dict:
        return {"w": [list(t) for t in self.weights]}


def products(layers: int, rounds: int) -> None:
    m = qmv.module()
    copies = {}
    for name in ("4 KB pages", "2 MB pages"):
        ws = [weight(n, k) for _ in range(layers) for n, k in SHAPES] + [weight(*HEAD)]
        copies[name] = ws
    os.environ["PG_EDGE_HUGEPAGES"] = "on"
    moved = pages.settle(Holder(copies["2 MB pages"]))
    os.environ["PG_EDGE_HUGEPAGES"] = "off"
    print(f"settled copy: {pages.describe()}", flush=True)
    nbytes = sum(a.nbytes for t in copies["4 KB pages"] for a in t)
    xs = {k: mx.random.normal((1, k)) for k in (HIDDEN, 2048, 9216)}
    mx.eval(list(xs.values()))

    def step(ws) -> float:
        t = time.perf_counter()
        for w, s, b in ws:
            mx.eval(m.quantized_matvec(xs[w.shape[1] * 8], w, s, b, 64, 4))
        return time.perf_counter() - t

    runs = {name: [] for name in copies}
    for name, ws in copies.items():
        step(ws)  # warm-up
    for _ in range(rounds):
        for name, ws in copies.items():
            runs[name].append(step(ws))
    print(f"decode-step products ({layers} layers + LM head, {nbytes / 1e9:.2f} GB; "
          f"{moved['bytes'] / 1e9:.2f} GB moved):")
    for name, ts in runs.items():
        print(f"  {name}: best {min(ts) * 1e3:.1f} ms ({nbytes / min(ts) / 1e9:.1f} GB/s), "
              f"median {statistics.median(ts) * 1e3:.1f} ms")
    a, b = runs["4 KB pages"], runs["2 MB pages"]
    print(f"  2 MB / 4 KB speed: {sum(a) / sum(b):.3f}x; rounds faster on 2 MB pages: "
          f"{sum(y < x for x, y in zip(a, b))} of {rounds}", flush=True)


def decode(folder: str, tokens: int, rounds: int) -> None:
    from pg_edge.benchmark import bench_image, decode_tokens

    models = {"4 KB pages": pg_edge.load(folder), "2 MB pages": pg_edge.load(folder)}
    os.environ["PG_EDGE_HUGEPAGES"] = "on"
    pages.settle(models["2 MB pages"].model)
    os.environ["PG_EDGE_HUGEPAGES"] = "off"
    print(f"settled copy: {pages.describe()}", flush=True)
    image = bench_image(models["4 KB pages"].config.vision.image_size)
    for pg in models.values():
        decode_tokens(pg, image, "caption en", 8)  # warm-up
    runs = {name: [] for name in models}
    for _ in range(rounds):
        for name, pg in models.items():
            runs[name].append(decode_tokens(pg, image, "caption en", tokens)["decode_tps"])
    for name, tps in runs.items():
        print(f"decode, {name}: " + " ".join(f"{t:.2f}" for t in tps) + f" tok/s (mean {statistics.mean(tps):.2f})")
    a, b = runs["4 KB pages"], runs["2 MB pages"]
    print(f"2 MB / 4 KB: {sum(b) / sum(a):.3f}x; rounds faster on 2 MB pages: "
          f"{sum(y > x for x, y in zip(a, b))} of {rounds}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=None, help="a folder for the whole-decode comparison")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=26)
    a = ap.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("2 MB pages are a Linux matter: nothing to compare here")
    if qmv.module() is None:
        sys.exit(f"the compiled module is needed: {qmv.kernel()}")
    print(f"read bandwidth: {read_gbs():.1f} GB/s (2 threads); kernel: {qmv.kernel()}", flush=True)
    products(a.layers, a.rounds)
    if a.folder:
        decode(a.folder, a.tokens, a.rounds)
    print(f"read bandwidth: {read_gbs():.1f} GB/s (2 threads)")


if __name__ == "__main__":
    main()
