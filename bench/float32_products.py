"""MLX's CPU products with and without float32, on one PG2 3B-224 prefill-sized MLP product.

    python bench/float32_products.py                  # with the fast BLAS (pg_edge/blas.py)
    PG_EDGE_BLAS=off python bench/float32_products.py # MLX's bundled reference BLAS

x [259, 2304] (224 px: 256 image tokens + a short prompt) against a 9216 x 2304 weight: MLX's bf16
GEMM; float32 on one stream, in two pieces on two streams, in ten pieces evaluated one round of
streams at a time (pg_edge.cpu.products.float32_product's way); the 4-bit layer dequantized in
float32 pieces + GEMM (MLX's dequantize, and pg_edge's compiled one when built:
pg_edge.cpu.qmv) against MLX's float32 quantized kernel; and one decode row: the bf16
matvec on one stream and split over two, against casting the weight to float32 per token; the
compiled module's dequantization of one piece and its tanh GELU against MLX's; and, on a CPU with
AMX, the compiled module's bfloat16 products of the bf16 and 4-bit weights on its tiles
(pg_edge.cpu.qmv, bf16_gemm.cpp); on a CPU with AVX512-VNNI, its int8 GEMM of the 4-bit weight
(qmm_int8.cpp: what prefill runs there without AMX); and without AMX the bf16 weight and its
8-bit version on the AVX512-BF16 GEMM (qmm_bf16dot.cpp) where the CPU has it, else on the int16
GEMM (qmm_int16.cpp; PG_EDGE_PREFILL=int16 picks it there too), and on AVX2 the int8 GEMM
(qmm_int8_avx2.cpp).
Figures: docs/performance.md ("The measurements behind the CPU rules in the code").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from pg_edge.cpu import qmv  # noqa: E402
from pg_edge.cpu.streams import cpu_streams, on_streams  # noqa: E402


def best(f, repeat: int = 3) -> float:
    mx.eval(f())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    print(f"BLAS: {pg_edge.blas.describe()}")
    R, O, I = 259, 9216, 2304
    w = (mx.random.normal((O, I)) * 0.02).astype(mx.bfloat16)
    x = mx.random.normal((R, I)).astype(mx.bfloat16)
    x32 = x.astype(mx.float32)
    mx.eval(w, x, x32)
    gflop = 2 * R * O * I / 1e9

    def pieces(n, eager):
        step = O // n
        return mx.concatenate(on_streams(lambda i, s: mx.matmul(
            x32, w[i * step:(i + 1) * step].astype(mx.float32, stream=s).T, stream=s), n, eager), -1)

    wq, sc, bi = mx.quantize(w, 64, 4)
    sc32, bi32 = sc.astype(mx.float32), bi.astype(mx.float32)
    mx.eval(wq, sc32, bi32)

    def dequantized(n, kernel=mx.dequantize):
        step = O // n
        return mx.concatenate(on_streams(lambda i, s: mx.matmul(x32, kernel(
            wq[i * step:(i + 1) * step], sc32[i * step:(i + 1) * step], bi32[i * step:(i + 1) * step], 64, 4,
            stream=s).T, stream=s), n, True), -1)

    rows = [("bf16 GEMM, one stream", lambda: x @ w.T, 1),
            ("float32 GEMM, one stream", lambda: x32 @ w.astype(mx.float32).T, 3),
            ("float32, 2 pieces on 2 streams", lambda: pieces(2, False), 3),
            ("float32, 10 pieces, rounds of streams", lambda: pieces(10, True), 3),
            ("4-bit MLX-dequantized float32 pieces + GEMM", lambda: dequantized(10), 3),
            ("4-bit MLX quantized kernel, float32", lambda: mx.quantized_matmul(x32, wq, sc32, bi32, True, 64, 4), 1)]
    if qmv.module() is not None:
        rows.insert(5, ("4-bit pg_edge-dequantized pieces + GEMM", lambda: dequantized(10, qmv.module().dequantize), 3))
    if qmv.amx_prefill():
        rows += [("bf16 weight, pg_edge AMX tiles", lambda: qmv.module().bf16_matmul(x32, w), 3),
                 ("4-bit weight, pg_edge AMX tiles", lambda: qmv.module().bf16_quantized_matmul(x32, wq, sc, bi, 64, 4), 3)]
    if qmv.module() is not None and qmv.module().bf16_kernel() in ("int16", "avx512bf16"):
        wq8, sc8, bi8 = mx.quantize(w.astype(mx.float32), group_size=64, bits=8)
        which = ("bf16 GEMM (AVX512-BF16)" if qmv.module().bf16_kernel() == "avx512bf16" else
                 f"int16 GEMM ({qmv.module().int16_kernel().removeprefix('int16 on ')})")
        rows += [(f"bf16 weight, pg_edge {which}", lambda: qmv.module().bf16_matmul(x32, w), 3),
                 (f"8-bit weight, pg_edge {which}",
                  lambda: qmv.module().bf16_quantized_matmul(x32, wq8, sc8, bi8, 64, 8), 3)]
    if qmv.module() is not None and qmv.module().decode_kernel() in ("int8 on AVX512-VNNI", "int8 on AVX2"):
        which = qmv.module().decode_kernel().removeprefix("int8 on ")
        rows += [(f"4-bit weight, pg_edge int8 GEMM ({which})", lambda: qmv.module().quantized_matvec(x32, wq, sc, bi, 64, 4), 3)]
    print(f"compiled kernels: {qmv.kernel()}; prefill products: {qmv.prefill_kernel()}")
    for name, f, r in rows:
        print(f"{name:<46} {gflop / best(f, r):7.2f} GFLOP/s")
    x1 = x[:1]
    streams = cpu_streams()

    def split(n):
        step = O // n
        return mx.concatenate([mx.matmul(x1, w[i * step:(i + 1) * step].T, stream=streams[i % len(streams)])
                               for i in range(n)], -1)

    for name, f in [("decode row: bf16 matvec, one stream", lambda: x1 @ w.T),
                    (f"decode row: bf16 matvec, {len(streams)} streams", lambda: split(len(streams))),
                    ("decode row: weight cast to float32 + matvec", lambda: x1.astype(mx.float32) @ w.astype(mx.float32).T)]:
        print(f"{name:<46} {1e3 * best(f, 5):7.1f} ms")
    # What the compiled module does on its own: dequantize one prefill piece (1024 x 2304, 4-bit),
    # and the tanh GELU of one decoder layer's hidden units (x [R, 9216] float32).
    piece = (wq[:1024], sc32[:1024], bi32[:1024], 64, 4)
    hidden = mx.random.normal((R, O)) * 2
    mx.eval(hidden)
    kernels = [("dequantize 1024x2304 4-bit: MLX", lambda: mx.dequantize(*piece)),
               ("tanh GELU 259x9216: MLX nn.gelu_approx", lambda: nn.gelu_approx(hidden))]
    if qmv.module() is not None:
        kernels.insert(1, ("dequantize 1024x2304 4-bit: pg_edge", lambda: qmv.module().dequantize(*piece)))
        kernels.append(("tanh GELU 259x9216: pg_edge", lambda: qmv.module().gelu_tanh(hidden)))
    for name, f in kernels:
        print(f"{name:<46} {1e3 * best(f, 5):7.2f} ms")


if __name__ == "__main__":
    main()
