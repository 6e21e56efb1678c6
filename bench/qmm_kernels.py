"""The CPU kernel measurements behind pg_edge/cpu/products.py, on this machine.

    python bench/qmm_kernels.py [--rows 1] [--streams 2]

For each weight shape (PaliGemma 2 3B's tied LM head, MLP and attention, and the narrow-deep
bench's 64-wide head) and bit width: one `mx.quantized_matmul` with each activation / scale
dtype pair, dequantize + dense GEMM, and pg_edge's own product (products.cpu_quantized_product:
float32 kernel, dense pieces, split over `--streams` CPU streams). Prints wall and process-CPU
milliseconds per product; wall < CPU means the product ran on several cores at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402,F401  (first: it loads the fast BLAS before MLX, as for a user)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

SHAPES = {"lm head 257216x2304": (257216, 2304), "mlp 9216x2304": (9216, 2304),
          "attn q 2048x2304": (2048, 2304), "narrow lm head 257216x64": (257216, 64)}


def timed(fn, repeat: int) -> tuple[float, float]:
    mx.eval(fn())
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        mx.eval(fn())
    return ((time.perf_counter() - wall) / repeat * 1e3, (time.process_time() - cpu) / repeat * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1 = decode)")
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    os.environ["PG_EDGE_CPU_STREAMS"] = str(a.streams)
    from pg_edge.cpu import products

    mx.set_default_device(mx.cpu)
    print(f"{'weight':28s} {'bits':>4s} {'product':34s} {'wall ms':>9s} {'cpu ms':>9s}")
    for name, (n, k) in SHAPES.items():
        for bits in map(int, a.bits.split(",")):
            lin = nn.QuantizedLinear(k, n, bias=False, group_size=64, bits=bits)
            lin.set_dtype(mx.bfloat16)  # bf16 scales and biases, as a converted bf16 folder has
            mx.eval(lin.parameters())
            q, s, b = lin["weight"], lin["scales"], lin["biases"]
            runs = {}
            for xd, sd in ((mx.bfloat16, mx.bfloat16), (mx.float32, mx.bfloat16), (mx.bfloat16, mx.float32)):
                x, ss, bb = mx.random.normal((a.rows, k)).astype(xd), s.astype(sd), b.astype(sd)
                mx.eval(x, ss, bb)
                runs[f"quantized_matmul x {xd} scales {sd}"] = (
                    lambda x=x, ss=ss, bb=bb: mx.quantized_matmul(x, q, ss, bb, transpose=True, group_size=64, bits=bits))
            x = mx.random.normal((a.rows, k))
            if n * k <= products.DENSE_MAX_ELEMENTS:
                runs["dequantize + GEMM float32"] = lambda: x @ mx.dequantize(q, s.astype(mx.float32),
                                                                               b.astype(mx.float32), group_size=64, bits=bits).T
            runs[f"pg_edge ({a.streams} streams)"] = lambda: products.cpu_quantized_product(lin, x)
            for label, fn in runs.items():
                wall, cpu = timed(fn, a.repeat)
                print(f"{name:28s} {bits:4d} {label.replace('mlx.core.', ''):34s} {wall:9.2f} {cpu:9.2f}", flush=True)


if __name__ == "__main__":
    main()
