"""Decode products one call each against one `quantized_matvecs` call (pg_edge.cpu.qmv), and a
whole decode with the fused calls on and off.

    python bench/fused_products.py [--folder FOLDER] [--tokens 48] [--rounds 4]

Needs the compiled module (`make qmv`). Part 1: PaliGemma 2 3B's q, k, v (2048 + 1024 + 1024 rows)
and gate, up (2 x 9216 rows), K = 2304, random 4-bit weights (group 64, bf16 scales), one token;
40 distinct layers so that every product reads its weights from memory; each layer's products
evaluated together, as three (two) calls or as one; best of the rounds, microseconds per layer.
Part 2 (with --folder, a quantized folder, e.g. bench/random_folder.py's full-size all4): decode
tokens/s with the fused calls and without them (each layer's products one call each, as before),
the two interleaved round by round in one process, so the host's drift hits both alike. The read
bandwidth (bench/bandwidth.py) is printed before and after.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402

from bandwidth import read_gbs  # noqa: E402
from pg_edge.cpu import qmv  # noqa: E402

K = 2304
LAYERS = 40


def weight(rows: int) -> tuple:
    """Random 4-bit weight in MLX's affine layout: (w uint32 [rows, K / 8], scales, biases)."""
    w = mx.random.randint(0, 2**31, (rows, K // 8)).astype(mx.uint32)
    scales = (mx.random.uniform(shape=(rows, K // 64)) * 0.01).astype(mx.bfloat16)
    biases = (mx.random.uniform(shape=(rows, K // 64)) * -0.05).astype(mx.bfloat16)
    return w, scales, biases


def products(rounds: int) -> None:
    mod = qmv.module()
    x = mx.random.normal((1, 1, K))
    for name, rows in (("q, k, v", (2048, 1024, 1024)), ("gate, up", (9216, 9216))):
        layers = [[weight(r) for r in rows] for _ in range(LAYERS)]
        mx.eval(x, layers)
        mb = sum(rows) * K * (0.5 + 2 * 2 / 64) / 1e6
        best = {"one call each": 1e9, "one call": 1e9}
        for _ in range(rounds):
            for kind in best:
                t = time.perf_counter()
                for ws in layers:
                    if kind == "one call each":
                        mx.eval([mod.quantized_matvec(x, *w, 64, 4) for w in ws])
                    else:
                        mx.eval(mod.quantized_matvecs(x, [a for w in ws for a in w], 64, 4))
                best[kind] = min(best[kind], (time.perf_counter() - t) / LAYERS * 1e6)
        print(f"{name} ({mb:.1f} MB): " + ", ".join(f"{k} {v:.0f} us ({mb / v * 1e3:.1f} GB/s)"
                                                    for k, v in best.items()), flush=True)
        del layers


def decode(folder: str, tokens: int, rounds: int) -> None:
    import pg_edge.cpu.attention as attention
    import pg_edge.cpu.mlp as mlp
    from pg_edge.benchmark import bench_image, decode_tokens
    from pg_edge.cpu.products import cpu_quantized_products

    pg = pg_edge.load(folder)
    mx.eval(pg.model.parameters())
    image = bench_image(pg.config.vision.image_size)

    def fused(on: bool) -> None:  # the modules' own name for it: what CpuAttention / CpuMLP call
        f = cpu_quantized_products if on else (lambda layers, x: None)
        attention.cpu_quantized_products = mlp.cpu_quantized_products = f

    decode_tokens(pg, image, "caption en", 8)  # warm-up
    runs = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            fused(on)
            runs[on].append(decode_tokens(pg, image, "caption en", tokens)["decode_tps"])
    fused(True)
    for on, tps in runs.items():
        print(f"decode, fused calls {'on ' if on else 'off'}: " + " ".join(f"{t:.2f}" for t in tps)
              + f" tok/s (mean {sum(tps) / len(tps):.2f})")
    gain = sum(runs[True]) / sum(runs[False])
    print(f"on / off: {gain:.3f}x; rounds where on was faster: "
          f"{sum(a > b for a, b in zip(runs[True], runs[False]))} of {rounds}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=None, help="a quantized folder for the whole-decode comparison")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    if qmv.module() is None:
        sys.exit(f"the compiled module is needed: {qmv.kernel()}")
    print(f"read bandwidth: {read_gbs():.1f} GB/s (2 threads); kernel: {qmv.kernel()}", flush=True)
    products(a.rounds)
    if a.folder:
        decode(a.folder, a.tokens, a.rounds)
    print(f"read bandwidth: {read_gbs():.1f} GB/s (2 threads)")


if __name__ == "__main__":
    main()
