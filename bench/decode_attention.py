"""A decode step's attention: MLX's ops against pg_edge's one kernel (qmv.decode_attention).

    python bench/decode_attention.py [--folder FOLDER] [--tokens 32] [--rounds 4]

Needs the compiled module (`make qmv`) on an AVX-512 or AVX2 CPU (PG_EDGE_QMV_SIMD=avx2 runs the
AVX2 kernel on an AVX-512 one). Part 1: one PaliGemma 2 3B layer's
attention for one token (8 query heads, 4 kv heads of 256, softcap 50, float32), the keys and
values strided slices of a cache buffer as mlx-lm's KVCache returns them, at 260, 1040 and 4100
cached tokens (224, 448 and 896 px with a short prompt): the model's ops (scale, batched
products, softcap, softmax) against the kernel; best of 5 x 200 calls evaluated together,
microseconds per layer. Part 2 (with --folder, a 16-bit or quantized folder, e.g.
bench/random_folder.py's full-size all4): decode tokens/s with the kernel and with MLX's ops,
alternately round by round in one process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402

from pg_edge.cpu import ops, qmv  # noqa: E402

H, K, E, CAP, SCALE = 8, 4, 256, 50.0, 256 ** -0.5


def mlx_ops(q, k, v):
    """The model's graph for one token (pg_edge.model.gemma.Attention.attend, CPU softcap)."""
    s = (q * SCALE).reshape(1, K, H // K, 1, E) @ k[:, :, None].swapaxes(-1, -2)
    p = mx.softmax(ops.softcap(s, CAP), axis=-1)
    return (p @ v[:, :, None]).reshape(1, H, 1, E)


def per_layer_us(fn, n: int = 200) -> float:
    for _ in range(10):
        mx.eval(fn())
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval([fn() for _ in range(n)])
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def layers() -> None:
    print("one layer's decode attention (8 x 256 query heads, 4 kv heads), us:")
    for S in (260, 1040, 4100):
        kb, vb = mx.random.normal((1, K, S + 256, E)), mx.random.normal((1, K, S + 256, E))
        q = mx.random.normal((1, H, 1, E))
        mx.eval(kb, vb, q)
        k, v = kb[:, :, :S], vb[:, :, :S]
        a = per_layer_us(lambda: mlx_ops(q, k, v))
        b = per_layer_us(lambda: qmv.decode_attention(q, k, v, None, SCALE, CAP))
        print(f"  {S:5d} cached tokens: MLX's ops {a:8.1f}  kernel {b:7.1f}  ({a / b:.1f}x)", flush=True)


def decode(folder: str, tokens: int, rounds: int) -> None:
    from pg_edge.benchmark import bench_image, decode_tokens

    pg = pg_edge.load(folder)
    image = bench_image(pg.config.vision.image_size)
    real = qmv.supports_attention
    runs = {"MLX's ops": [], "kernel": []}
    decode_tokens(pg, image, "caption en", 8)  # warm-up
    for _ in range(rounds):
        for name in runs:
            qmv.supports_attention = real if name == "kernel" else (lambda *a: False)
            runs[name].append(decode_tokens(pg, image, "caption en", tokens)["decode_tps"])
    qmv.supports_attention = real
    for name, tps in runs.items():
        print(f"decode, attention by {name}: " + " ".join(f"{t:.2f}" for t in tps)
              + f" tok/s (mean {statistics.mean(tps):.2f})")
    a, b = runs["MLX's ops"], runs["kernel"]
    print(f"kernel / MLX's ops: {sum(b) / sum(a):.3f}x; rounds faster with the kernel: "
          f"{sum(y > x for x, y in zip(a, b))} of {rounds}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=None, help="a 16-bit or quantized folder for the whole-decode comparison")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    if qmv.module() is None or not qmv.module().decode_attention_supported():
        sys.exit(f"needs the compiled module on an AVX-512 or AVX2 CPU: {qmv.kernel()}")
    layers()
    if a.folder:
        decode(a.folder, a.tokens, a.rounds)


if __name__ == "__main__":
    main()
