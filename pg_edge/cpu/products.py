"""Big products the CPU way: `Linear` / `Embedding` (quantized or not) variants with the same
parameters, which `pg_edge.cpu.apply` swaps in at load.

On MLX's CPU backend `mx.quantized_matmul` is fast only with float32 activations or scales;
for many rows (prefill, SigLIP's patches) dequantizing and running the BLAS GEMM beats it; a
16-bit float weight's many-row product runs in float32 (MLX's bf16/fp16 matmul has no BLAS
behind it: ~1-2 GFLOP/s here, float32 with OpenBLAS 20-45, pg_edge/blas.py); and every kernel
runs on one core, so a product split by output rows over one CPU stream per core
runs its pieces side by side (measurements: docs/performance.md). Decode-sized products
(quantized, and of bf16/fp16 weights) take pg_edge's compiled matvecs instead when they are
built (pg_edge.cpu.qmv; `cpu_quantized_products` runs several of one x in one call), and on a CPU with AMX the many-row products of 16-bit and quantized
weights of BF16_MIN_ELEMENTS+ take its bfloat16 tile kernel (x rounded to bf16, sums in float32);
without AMX those of 4-bit weights take its int8 GEMM (x rounded to int8 per group) and those of
16-bit and 8-bit weights its int16 GEMM (AVX512-VNNI or AVX2). The variants keep the stored
weights (the pieces are views) and only change how the product is computed; the output dtype of a quantized product always equals the
input dtype, as on Metal; an unquantized one's is promote(x, weight), as `x @ weight.T`.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import qmv
from .streams import cpu_streams, lean, on_streams, stream_count, tracing

# Rows (tokens x batch) from which a CPU quantized product dequantizes and runs a dense GEMM.
DENSE_ROWS = 32
# ... unless the weight is bigger than this (the tied LM head, whose dequantized copy a
# training step would keep for its backward pass); those keep the float32 kernel.
DENSE_MAX_ELEMENTS = 64 * 2**20
# Weight elements dequantized per piece of a dense product (8 MB in float32): smaller pieces,
# lower MLX peak (docs/performance.md, "Dense prefill in bounded pieces").
DENSE_PIECE_ELEMENTS = 2 * 2**20
# Weights from this many elements are split over the CPU streams in decode-sized products;
# smaller ones cost less than the extra dispatch.
SPLIT_MIN_ELEMENTS = 2 * 2**20
# ... and in many-row (dense) products from this many: OpenBLAS runs one thread per call
# (pg_edge/blas.py), so an unsplit GEMM would use one core (SigLIP's 1152 x 1152 projections).
DENSE_SPLIT_MIN_ELEMENTS = 2**18
# Weights from this many elements take the compiled bfloat16 kernel for their many-row products
# when the CPU has AMX, or the int8 / int16 GEMMs without it (pg_edge.cpu.qmv.bf16_prefill,
# int8_prefill): they need no pieces, and
# a smaller weight (the demo model's) gains little over the float32 GEMM, which keeps its output
# the same on every x86 CPU.
BF16_MIN_ELEMENTS = 2**20
# Outside inference's own paths (`lean_ok`), unquantized weights split only in products with
# fewer rows than this (decode): a training step's backward pass through sliced weights would
# build full-size zero gradients per piece. Inference splits its many-row products too.
SPLIT_MAX_ROWS_FLOAT = DENSE_ROWS


def row_pieces(out_rows: int, in_size: int, dense: bool, split: bool) -> list[tuple[int, int]]:
    """[lo, hi) output-row ranges a product of an [out_rows, in_size] weight is computed in:
    a multiple of the stream count when split, and pieces of at most DENSE_PIECE_ELEMENTS
    when dense."""
    n = 1
    if dense:
        n = math.ceil(out_rows * in_size / DENSE_PIECE_ELEMENTS)
    if split:
        s = stream_count()
        n = s * math.ceil(n / s)
    n = max(1, min(n, out_rows))
    step = math.ceil(out_rows / n)
    return [(lo, min(lo + step, out_rows)) for lo in range(0, out_rows, step)]


def _rows(a: mx.array) -> mx.array:
    """A row range of a weight: row-contiguous already (what the compiled kernels need); MLX
    copies only when it is not."""
    return mx.contiguous(a)


def _quantized_piece(layer, x, lo, hi, dense, stream):
    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    if (lo, hi) != (0, scales.shape[0]):
        w, scales = w[lo:hi], scales[lo:hi]
        biases = None if biases is None else biases[lo:hi]
    if dense:
        if x.dtype == mx.float32 and not layer.training and not tracing() and qmv.dequantizes(layer, w):
            # pg_edge's compiled dequantization (pg_edge.cpu.qmv): MLX's is slower than the GEMM
            # (inference only: the primitive has no gradient and cannot be exported)
            wd = qmv.dequantize(layer, _rows(w), _rows(scales), _rows(biases), stream=stream)
            return mx.matmul(x, wd.T, stream=stream)
        # Dequantized in the activation dtype: float32 inputs get the exact float32 weights;
        # for bf16 inputs the bf16 rounding (2^-8 relative) is far below the 4/8-bit step.
        scales = scales.astype(x.dtype, stream=stream)
        biases = None if biases is None else biases.astype(x.dtype, stream=stream)
        wd = mx.dequantize(w, scales, biases, group_size=layer.group_size, bits=layer.bits,
                           mode=layer.mode, stream=stream)
        return mx.matmul(x, wd.T, stream=stream)
    x32 = x if x.dtype == mx.float32 else x.astype(mx.float32, stream=stream)
    y = mx.quantized_matmul(x32, w, scales=scales, biases=biases, transpose=True,
                            group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
                            stream=stream)
    return y if x.dtype == mx.float32 else y.astype(x.dtype, stream=stream)


def cpu_quantized_product(layer, x: mx.array) -> mx.array:
    """x float[..., in] @ dequant(weight).T -> float[..., out] in x's dtype, the CPU way."""
    rows = x.size // x.shape[-1]
    if rows <= qmv.MAX_ROWS and not layer.training and not tracing() and qmv.supports(layer, x):
        # decode: pg_edge's compiled matvec when built (pg_edge.cpu.qmv), on all cores itself
        return qmv.product(layer, x)
    out_rows, in_size = layer["scales"].shape[0], x.shape[-1]
    elements = out_rows * in_size
    dense = rows >= DENSE_ROWS and elements <= DENSE_MAX_ELEMENTS
    if (dense and elements >= BF16_MIN_ELEMENTS and x.dtype == mx.float32 and not layer.training
            and not tracing() and qmv.bf16_prefill(layer=layer) and qmv.dequantizes(layer, layer["weight"])):
        # prefill in bf16 on AMX tiles (the weight dequantized block by block in the kernel), or
        # 8-bit weights in int16 on AVX2 (qmm_int16.cpp)
        return qmv.bf16_quantized_product(layer, x)
    if (dense and elements >= BF16_MIN_ELEMENTS and x.dtype == mx.float32 and not layer.training
            and not tracing() and qmv.int8_prefill(layer, x)):
        # no AMX: 4-bit prefill with x rounded to int8, on AVX512-VNNI (pg_edge.cpu.qmv)
        return qmv.product(layer, x)
    if not dense and elements < SPLIT_MIN_ELEMENTS:  # the common small matvec: one kernel call
        if x.dtype == mx.float32 and not tracing():
            # float32 copies of the (small) scales and biases, made once: MLX would otherwise
            # cast them to the activations' dtype in two extra ops per call.
            scales, biases = float32_scales(layer)
            return mx.quantized_matmul(x, layer["weight"], scales=scales, biases=biases, transpose=True,
                                       group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        return _quantized_piece(layer, x, 0, out_rows, False, None)
    pieces = row_pieces(out_rows, in_size, dense,
                        split=elements >= (DENSE_SPLIT_MIN_ELEMENTS if dense else SPLIT_MIN_ELEMENTS))
    # Inference prefill: one piece per stream at a time. Left lazy, MLX dequantizes pieces
    # ahead of the products that use them, and a dozen float32 pieces (8 MB each) can be alive.
    eager = dense and not layer.training and not tracing()
    parts = on_streams(lambda i, stream: _quantized_piece(layer, x, *pieces[i], dense, stream), len(pieces), eager)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def cpu_quantized_products(layers, x: mx.array) -> list[mx.array] | None:
    """[x float[..., in] @ dequant(layer.weight).T for each layer] from one call of the compiled
    matvec (pg_edge.cpu.qmv.products: a decode step's q, k and v, or gate and up, as one split of
    their rows over the cores), or None where that does not apply: not each a
    `CpuQuantizedLinear` (a LoRA wrapper, a float layer), more than qmv.MAX_ROWS rows, training,
    tracing, or the module not built. The same numbers as each layer's own product."""
    if (not all(type(l) is CpuQuantizedLinear and not l.training for l in layers) or tracing()
            or not qmv.fusable(layers, x)):  # fusable: qmv.supports each, which caps the rows
        return None
    return qmv.products(layers, x)


def float32_scales(layer) -> tuple:
    """(scales, biases) of a quantized layer in float32, cached on the layer (outside its
    parameters) until its scales are replaced."""
    scales, biases = layer["scales"], layer.get("biases")
    hit = layer.__dict__.get("_f32_scales")
    if hit is None or hit[0] is not scales:
        # Lazy: computed with the first product that uses them, then kept.
        hit = (scales, scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32))
        object.__setattr__(layer, "_f32_scales", hit)  # not a parameter: never saved or trained
    return hit[1], hit[2]


def float32_product(weight: mx.array, x: mx.array) -> mx.array:
    """x float[..., in] @ weight[out, in].T for a 16-bit weight, computed in float32: pieces of
    the weight (at most DENSE_PIECE_ELEMENTS each) cast to float32 one round of streams at a
    time (inference only: evaluated as it goes), the BLAS GEMM; the result in x's dtype."""
    split = weight.size >= DENSE_SPLIT_MIN_ELEMENTS and stream_count() > 1
    pieces = row_pieces(weight.shape[0], weight.shape[1], True, split)
    x32 = x.astype(mx.float32)
    parts = on_streams(lambda i, s: mx.matmul(x32, weight[pieces[i][0]:pieces[i][1]].astype(mx.float32, stream=s).T,
                                              stream=s), len(pieces), True)
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def cpu_float_product(weight: mx.array, x: mx.array, lean_ok: bool = False) -> mx.array:
    """x float[..., in] @ weight[out, in].T: with `lean_ok` (inference, not tracing) a 16-bit
    weight's product over at most qmv.MAX_ROWS rows by pg_edge's compiled matvec when built,
    over DENSE_ROWS+ rows in float32 (`float32_product`), and a float32 weight's many-row
    products split over the CPU streams; other decode-sized x split over the CPU streams."""
    rows = x.size // x.shape[-1]
    if lean_ok and rows <= qmv.MAX_ROWS and qmv.supports_float(weight, x):
        # decode: bf16/fp16 weights read near the memory bandwidth, on all cores itself
        return qmv.float_product(weight, x)
    if lean_ok and rows >= DENSE_ROWS and weight.dtype in (mx.bfloat16, mx.float16):
        if (weight.size >= BF16_MIN_ELEMENTS and x.dtype == mx.float32 and weight.ndim == 2
                and qmv.bf16_prefill(weight)):
            # prefill in bf16 on AMX tiles (pg_edge.cpu.qmv): x rounded, sums in float32; or in
            # int16 on AVX2 (qmm_int16.cpp)
            return qmv.bf16_float_product(mx.contiguous(weight), x)
        return float32_product(weight, x)
    if (lean_ok and rows >= DENSE_ROWS and weight.dtype == mx.float32 and weight.ndim == 2
            and weight.size >= DENSE_SPLIT_MIN_ELEMENTS and stream_count() > 1):
        # a float32 model's prefill: output rows over the CPU streams, one OpenBLAS thread each
        streams = cpu_streams()
        parts = [mx.matmul(x, weight[lo:hi].T, stream=streams[i % len(streams)])
                 for i, (lo, hi) in enumerate(row_pieces(weight.shape[0], weight.shape[1], False, True))]
        return mx.concatenate(parts, axis=-1)
    if rows >= SPLIT_MAX_ROWS_FLOAT or weight.size < SPLIT_MIN_ELEMENTS or stream_count() == 1:
        return x @ weight.T
    streams = cpu_streams()
    parts = [mx.matmul(x, weight[lo:hi].T, stream=streams[i % len(streams)])
             for i, (lo, hi) in enumerate(row_pieces(weight.shape[0], weight.shape[1], False, True))]
    return mx.concatenate(parts, axis=-1)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """`QuantizedLinear` computed as `cpu_quantized_product` (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """`QuantizedEmbedding` whose tied-head product is `cpu_quantized_product`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return cpu_quantized_product(self, x)


class CpuLinear(nn.Linear):
    """`Linear` whose decode-sized products take the compiled matvec (16-bit weights, when
    built) or are split over the CPU streams, and whose 16-bit many-row products run in float32
    (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_float_product(self["weight"], x, lean(self))
        return y + self["bias"] if "bias" in self else y


class CpuEmbedding(nn.Embedding):
    """`Embedding` whose tied-head product is `cpu_float_product` (the compiled matvec for a
    16-bit decode token when built, else split over the CPU streams)."""

    def as_linear(self, x: mx.array) -> mx.array:
        return cpu_float_product(self["weight"], x, lean(self))
