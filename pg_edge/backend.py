"""How big products compute on each MLX backend: the one place that choice is made.

MLX's CPU backend (measured with bench/qmm_kernels.py on this project's 2-core CPU machine,
MLX 0.32):
  - `mx.quantized_matmul` with 16-bit activations and 16-bit scales takes a slow generic kernel:
    a 4-bit 64257 x 2304 matvec takes ~850 ms in bf16/bf16, ~97 ms with float32 activations
    (about 8x); float32 activations (or float32 scales) take the fast kernel;
  - for many rows at once (prefill: 256 image tokens + prompt, or SigLIP's patches), even the
    fast kernel loses to dequantizing the weight and running a dense GEMM (2.8x at 256 rows
    on a 9216 x 2304 layer), since the CPU GEMM is BLAS and the quantized kernel is not;
  - every one of these kernels runs on ONE core, the thread of the stream it is queued on. A
    product split by output rows over one CPU stream per core runs the pieces side by side:
    the 4-bit 257216 x 2304 tied LM head takes 418 ms on one stream, 205 ms on two.
On Metal and CUDA, 16-bit activations are the fast path, the quantized kernel beats
dequantize + GEMM and one kernel fills the device, so nothing changes there.

`apply(model)` is called once at load time (pg_edge.loader.build_model): on the CPU backend it
turns every `QuantizedLinear` / `QuantizedEmbedding`, and the unquantized `Linear` /
`Embedding` big enough to gain from the split, into the subclasses below. They keep the stored
weights (same parameters, same checkpoint keys, same memory: the pieces are views) and only
change how the product is computed. The output dtype always equals the input dtype, as on Metal.
`attention_on_streams` does for long attentions what the split does for products: groups of
heads, one per CPU stream (SigLIP and the decoder call it when the backend sets their flag).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

import mlx.core as mx
import mlx.nn as nn

from .cpu import qmv
from .errors import PgEdgeError

# Rows (tokens x batch) from which a CPU quantized product dequantizes and runs a dense GEMM.
DENSE_ROWS = 32
# ... unless the weight is bigger than this (the 257216-row tied LM head, whose dequantized
# copy a training step would keep for its backward pass); those keep the float32 kernel.
DENSE_MAX_ELEMENTS = 64 * 2**20
# A dense product dequantizes at most this many weight elements per piece (8 MB in float32):
# a 9216 x 2304 MLP matrix goes in 12 pieces. MLX runs a piece's dequantize ahead of the
# products before it, so a few dozen pieces can be alive at once: measured on the 1+1-layer
# PG2 3B-224 4-bit folder (bench, load + one generation), the MLX peak is 0.86 GB with whole
# matrices, 0.79 GB with 8M-element pieces, 0.59 GB with these (0.53 GB with no dense path).
DENSE_PIECE_ELEMENTS = 2 * 2**20
# Weights from this many elements are split over the CPU streams (smaller ones cost less than
# the extra dispatch: the narrow-deep bench's 64-wide layers stay whole).
SPLIT_MIN_ELEMENTS = 2 * 2**20
# Unquantized weights split only in products with fewer rows than this (decode): a training
# step's backward pass through sliced weights would build full-size zero gradients per piece.
SPLIT_MAX_ROWS_FLOAT = DENSE_ROWS
# Attention with this many scores (batch x heads x queries x keys) or more is split by heads
# over the CPU streams (pg_edge.siglip, pg_edge.gemma, via `attention_on_streams`): SigLIP's and
# the decoder's prefill from 448 px on (at 224 px: 16 x 256 x 256 = 1M, left whole). At 896 px
# one SigLIP layer's attention (16 heads x 4096 x 4096, real widths) took 14.5 s on one stream,
# 7.4 s on two, bit-identical.
ATTENTION_SPLIT_SCORES = 4 * 2**20
# ... in groups of at most this many float32 scores (256 MB) alive per stream.
ATTENTION_PIECE_SCORES = 64 * 2**20

_local = threading.local()


def policy() -> str:
    """"cpu" (float32 matvec, dequantize + GEMM for many rows, split over cores) or "native"
    (MLX as is).

    PG_EDGE_QMM=native|cpu overrides the choice (the benchmark uses it to show the gain)."""
    forced = os.environ.get("PG_EDGE_QMM")
    if forced in ("native", "cpu"):
        return forced
    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "native"


_count_cache: dict = {}


def stream_count() -> int:
    """CPU streams a big product is split over: the cores this process may run on (at most
    8), or PG_EDGE_CPU_STREAMS. Cached (per value of the variable): a decode step asks once
    per product, and the affinity query is a system call."""
    forced = os.environ.get("PG_EDGE_CPU_STREAMS")
    n = _count_cache.get(forced)
    if n is None:
        if forced:
            if not forced.isdigit() or int(forced) < 1:
                raise PgEdgeError(f"PG_EDGE_CPU_STREAMS must be a whole number >= 1, got {forced!r}")
            n = int(forced)
        else:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # macOS
                cores = os.cpu_count() or 1
            n = max(1, min(cores, 8))
        _count_cache[forced] = n
    return n


def cpu_streams() -> list:
    """This thread's CPU streams (created on first use; one thread per stream inside MLX).
    Per thread because each pg_edge worker thread builds and evaluates its own graphs."""
    n = stream_count()
    streams = getattr(_local, "streams", None)
    if streams is None or len(streams) != n:
        streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else [None]
        _local.streams = streams
    return streams


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


def _quantized_piece(layer, x, lo, hi, dense, stream):
    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    if (lo, hi) != (0, scales.shape[0]):
        w, scales = w[lo:hi], scales[lo:hi]
        biases = None if biases is None else biases[lo:hi]
    if dense:
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
    if (rows <= qmv.MAX_ROWS and not layer.training and not getattr(_local, "tracing", False)
            and qmv.supports(layer, x)):
        # decode: pg_edge's compiled matvec when built (pg_edge.cpu.qmv), on all cores itself
        return qmv.product(layer, x)
    out_rows, in_size = layer["scales"].shape[0], x.shape[-1]
    elements = out_rows * in_size
    dense = rows >= DENSE_ROWS and elements <= DENSE_MAX_ELEMENTS
    if not dense and elements < SPLIT_MIN_ELEMENTS:  # the common small matvec: one kernel call
        if x.dtype == mx.float32 and not getattr(_local, "tracing", False):
            # float32 copies of the (small) scales and biases, made once: MLX would otherwise
            # cast them to the activations' dtype in two extra ops per call.
            scales, biases = float32_scales(layer)
            return mx.quantized_matmul(x, layer["weight"], scales=scales, biases=biases, transpose=True,
                                       group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        return _quantized_piece(layer, x, 0, out_rows, False, None)
    pieces = row_pieces(out_rows, in_size, dense, split=elements >= SPLIT_MIN_ELEMENTS)
    # Inference prefill: one piece per stream at a time. Left lazy, MLX dequantizes pieces
    # ahead of the products that use them, and a dozen float32 pieces (8 MB each) can be alive.
    eager = dense and not layer.training and not getattr(_local, "tracing", False)
    parts = on_streams(lambda i, stream: _quantized_piece(layer, x, *pieces[i], dense, stream), len(pieces), eager)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def on_streams(make, n: int, eager: bool) -> list:
    """[make(i, stream) for i in range(n)], piece i on CPU stream i % streams (stream None:
    one piece, the default stream). With `eager` and more pieces than streams, each round of
    one piece per stream is evaluated before the next is built, so a round's temporaries are
    freed before the next round's exist (inference only: no eval in training or tracing)."""
    streams = cpu_streams() if n > 1 else [None]
    eager = eager and n > len(streams)
    parts = []
    for i in range(n):
        parts.append(make(i, streams[i % len(streams)]))
        if eager and (i + 1) % len(streams) == 0:
            mx.eval(parts[-len(streams):])
    return parts


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


def cpu_float_product(weight: mx.array, x: mx.array) -> mx.array:
    """x float[..., in] @ weight[out, in].T, split over the CPU streams for decode-sized x."""
    rows = x.size // x.shape[-1]
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
    """`Linear` whose decode-sized products are split over the CPU streams (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_float_product(self["weight"], x)
        return y + self["bias"] if "bias" in self else y


class CpuEmbedding(nn.Embedding):
    """`Embedding` whose tied-head product is split over the CPU streams."""

    def as_linear(self, x: mx.array) -> mx.array:
        return cpu_float_product(self["weight"], x)


def attention_on_streams(attend, q: mx.array, k: mx.array, v: mx.array, mask):
    """attend(q, k, v, mask) computed over groups of heads, the groups spread over the CPU
    streams: q float[B, H, T, hd]; k, v float[B, K, S, hd] (query head n uses kv head
    n // (H / K)); mask None or [B, 1, T, S], shared by every head. -> float[B, H, T, hd].

    MLX runs one attention on one core; heads are independent, so each group is the same
    numbers (bit-identical: the same per-head products) and the groups run side by side. A
    group holds at most ATTENTION_PIECE_SCORES scores; with more groups than streams, one per
    stream is evaluated at a time, so the [H, T, S] float32 scores never exist at once (SigLIP
    at 896 px: 16 x 4096 x 4096 = 1.07 GB per layer). Small attentions stay whole.
    Inference only (the callers check): the eager evaluation has no place in training or
    while tracing."""
    B, H, T, _ = q.shape
    K, S = k.shape[1], k.shape[2]
    scores = B * H * T * S
    if scores < ATTENTION_SPLIT_SCORES:
        return attend(q, k, v, mask)
    # Units that keep the kv mapping: kv heads with their query heads, or the query heads alone
    # when one kv head serves them all (PaliGemma 1's multi-query Gemma).
    units, per = (K, H // K) if K > 1 else (H, 1)
    s = stream_count()
    n = max(1, min(units, s * math.ceil(math.ceil(scores / ATTENTION_PIECE_SCORES) / s)))
    bounds = [units * i // n for i in range(n + 1)]

    def group(i, stream):
        lo, hi = bounds[i], bounds[i + 1]
        qs, ks, vs = (q[:, lo * per:hi * per], k[:, lo:hi], v[:, lo:hi]) if K > 1 else (q[:, lo:hi], k, v)
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            return attend(qs, ks, vs, mask)

    return mx.concatenate(on_streams(group, n, eager=True), axis=1)  # a round's scores freed before the next's


SWAPS = {nn.QuantizedLinear: CpuQuantizedLinear, nn.QuantizedEmbedding: CpuQuantizedEmbedding,
         nn.Linear: CpuLinear, nn.Embedding: CpuEmbedding}


def apply(model: nn.Module, mode: str | None = None) -> str:
    """Switch the big products of `model` to this backend's compute; returns the mode used."""
    mode = mode or policy()
    if mode != "cpu":
        return mode
    quantized_decoder = quantized = False
    for path, module in model.named_modules():
        if hasattr(module, "cpu_ops"):
            # gemma's RMSNorm and Attention: pg_edge.cpu_ops graphs; gemma's and SigLIP's
            # attention: long ones split by heads (attention_on_streams)
            module.cpu_ops = True
        swap = SWAPS.get(type(module))
        if swap is None or (swap in (CpuLinear, CpuEmbedding)
                            and module["weight"].size < SPLIT_MIN_ELEMENTS):
            continue  # small float layers gain nothing from the split: left as they are
        module.__class__ = swap
        if swap in (CpuQuantizedLinear, CpuQuantizedEmbedding):
            quantized = True
            quantized_decoder = quantized_decoder or path.startswith("language_model.")
    if quantized:
        # Dense prefill products dequantize pieces of every layer: evaluate layer by layer so
        # only one layer's pieces exist at a time (1+1 -> 2+2 layers of PG2 3B-224 at 4 bits
        # added 128 MB of MLX peak for 53 MB of weights in one lazy graph).
        for _, module in model.named_modules():
            if hasattr(module, "sync_each_layer"):
                module.sync_each_layer = True
    if quantized_decoder and hasattr(model, "activation_dtype"):
        # The decoder's activations in float32 from the embedding on: every quantized product
        # then takes the fast kernel without two casts around it, and the elementwise ops run
        # in the CPU's native float32 rather than emulated bf16. KV caches double (small at
        # 224-448 px: 26 layers x 300 tokens x 2 x 4 heads x 256 x 4 B = 64 MB for PG2 3B).
        model.activation_dtype = mx.float32
    return mode


@contextlib.contextmanager
def for_tracing(model: nn.Module):
    """Within: `model` computes as plain MLX graphs that function transformations (`mx.exporter`,
    `mx.compile`) can trace: no per-layer evaluation in its prefill (MLX refuses an eval
    inside them), no pg_edge.cpu_ops graphs, no attention split over streams (it evaluates
    round by round) and no cached float32 scales (their per-step
    caches would keep the tracer's arrays). Per thread for the scales."""
    synced = [m for _, m in model.named_modules() if getattr(m, "sync_each_layer", False)]
    lean = [m for _, m in model.named_modules() if getattr(m, "cpu_ops", False)]
    for m in synced:
        m.sync_each_layer = False
    for m in lean:
        m.cpu_ops = False
    was, _local.tracing = getattr(_local, "tracing", False), True
    try:
        yield
    finally:
        _local.tracing = was
        for m in synced:
            m.sync_each_layer = True
        for m in lean:
            m.cpu_ops = True
