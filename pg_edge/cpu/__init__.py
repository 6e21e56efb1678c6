"""Everything MLX's CPU backend needs to run PaliGemma fast; `apply(model)` swaps classes, nothing else.

Read in this order:
    streams.py     the one pool of CPU streams (one per core), the tracing flag
    products.py    Linear / Embedding variants: float32 quantized kernel, dequantize + GEMM for
                   many rows, products split by output rows over the streams
    ops.py         leaner RMSNorm / RoPE / softcap graphs, and CpuRMSNorm
    attention.py   long attentions split by heads over the streams: CpuAttention, CpuSiglipAttention;
                   a decode step's attention in one compiled kernel: CpuDecodeAttention
    layers.py      prefill evaluated layer by layer; float32 activations for 16-bit and
                   quantized models; their decode step's norms and residual adds in three
                   compiled calls a layer
    mlp.py         SigLIP's and Gemma's MLPs with the compiled tanh GELU (16-bit and quantized
                   models)
    pages.py       the loaded weights moved onto 2 MB pages (Linux; pg_edge.load calls it)

`apply(model)` is called once at load (pg_edge.checkpoint.loader.build_model). On the CPU backend it turns
modules into their CPU subclasses: same parameters, same checkpoint keys, same memory, the same
numbers (bit-identical, tested), only computed differently. Each variant takes its CPU path
only outside training and tracing, and otherwise runs its model class's code; the model files
(pg_edge.model) know nothing of this package. On Metal and CUDA nothing is swapped: there
16-bit activations and MLX's own kernels are the fast path (docs/performance.md).
"""
from __future__ import annotations

import contextlib
import os

import mlx.core as mx
import mlx.nn as nn

from ..model.gemma import MLP, Attention, DecoderLayer, GemmaModel, RMSNorm
from ..model.paligemma import PaliGemmaModel
from ..model.siglip import SiglipAttention, SiglipEncoder, SiglipMLP
from .attention import CpuAttention, CpuDecodeAttention, CpuSiglipAttention
from .layers import CpuDecoderLayer, CpuGemmaModel, CpuPaliGemmaModel, CpuSiglipEncoder
from .mlp import CpuMLP, CpuSiglipMLP
from . import products
from .ops import CpuRMSNorm
from .products import CpuEmbedding, CpuLinear, CpuQuantizedEmbedding, CpuQuantizedLinear
from .streams import tracing_on

# Always swapped on the CPU backend.
SWAPS = {nn.QuantizedLinear: CpuQuantizedLinear, nn.QuantizedEmbedding: CpuQuantizedEmbedding,
         nn.Linear: CpuLinear, nn.Embedding: CpuEmbedding,
         RMSNorm: CpuRMSNorm, Attention: CpuAttention, SiglipAttention: CpuSiglipAttention}
# Swapped when the model holds quantized or 16-bit float layers (their dense or float32 prefill
# pieces; the compiled GELU, decode attention and decode norms, whose last bits differ from
# MLX's: a float32 model keeps those).
LAYER_BY_LAYER = {GemmaModel: CpuGemmaModel, SiglipEncoder: CpuSiglipEncoder,
                  MLP: CpuMLP, SiglipMLP: CpuSiglipMLP, CpuAttention: CpuDecodeAttention,
                  DecoderLayer: CpuDecoderLayer}


def policy() -> str:
    """"cpu" (float32 matvec, dequantize + GEMM for many rows, split over cores) or "native"
    (MLX as is).

    PG_EDGE_QMM=native|cpu overrides the choice (the benchmark uses it to show the gain)."""
    forced = os.environ.get("PG_EDGE_QMM")
    if forced in ("native", "cpu"):
        return forced
    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "native"


def apply(model: nn.Module, mode: str | None = None) -> str:
    """Swap the modules of `model` for this backend's variants; returns the mode used."""
    mode = mode or policy()
    if mode != "cpu":
        return mode
    quantized = half = False
    for path, module in model.named_modules():
        swap = SWAPS.get(type(module))
        if swap in (CpuLinear, CpuEmbedding):
            half = half or module["weight"].dtype in (mx.bfloat16, mx.float16)
            if module["weight"].size < products.DENSE_SPLIT_MIN_ELEMENTS:
                continue  # small float layers gain nothing from the variant: left as they are
        if swap is None:
            continue
        module.__class__ = swap
        if swap in (CpuQuantizedLinear, CpuQuantizedEmbedding):
            quantized = True
    if quantized or half:
        for _, module in model.named_modules():
            swap = LAYER_BY_LAYER.get(type(module))
            if swap is not None:
                module.__class__ = swap
        if type(model) is PaliGemmaModel:  # float32 activations, vision and decoder
            model.__class__ = CpuPaliGemmaModel
    return mode


@contextlib.contextmanager
def for_tracing(model: nn.Module | None = None):
    """Within, on this thread, the variants compute as their model classes do, as plain MLX
    graphs that function transformations (`mx.exporter`, `mx.compile`) can trace: no eval
    inside (per-layer evaluation, the attention split's rounds), no compiled CPU ops and no
    cached float32 scales (their caches would keep the tracer's arrays)."""
    with tracing_on():
        yield


__all__ = ["apply", "for_tracing", "policy", "SWAPS", "LAYER_BY_LAYER"]
