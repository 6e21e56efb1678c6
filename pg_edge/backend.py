"""How quantized layers compute on each MLX backend: the one place that choice is made.

MLX's CPU backend has three speeds for `mx.quantized_matmul` with 4/8-bit affine weights
(measured with bench/qmm_kernels.py on this project's 2-core CPU machine, MLX 0.32):
  - 16-bit activations with 16-bit scales take a slow generic kernel: a 4-bit 64257 x 2304
    matvec takes ~850 ms in bf16/bf16, ~97 ms with float32 activations (about 8x);
  - float32 activations (or float32 scales) take the fast kernel; the result is float32;
  - for many rows at once (prefill: 256 image tokens + prompt, or SigLIP's patches), even the
    fast kernel loses to dequantizing the weight and running a dense GEMM (2.8x at 256 rows
    on a 9216 x 2304 layer), since the CPU GEMM is BLAS and the quantized kernel is not.
On Metal and CUDA, 16-bit activations are the fast path and the quantized kernel beats
dequantize + GEMM, so nothing changes there.

`apply(model)` is called once at load time (pg_edge.loader.build_model): on the CPU backend it
turns every `QuantizedLinear` / `QuantizedEmbedding` into the subclasses below, which keep the
stored weights (same parameters, same checkpoint keys, same memory) and only change how the
product is computed. The output dtype always equals the input dtype, as on Metal.
"""
from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

# Rows (tokens x batch) from which a CPU quantized product dequantizes and runs a dense GEMM.
DENSE_ROWS = 32
# ... unless the weight is bigger than this (the 257216-row tied LM head: a dense copy would
# be a 1.2 GB temporary); those keep the float32 quantized kernel.
DENSE_MAX_ELEMENTS = 64 * 2**20


def policy() -> str:
    """"cpu" (float32 matvec, dequantize + GEMM for many rows) or "native" (MLX as is).

    PG_EDGE_QMM=native|cpu overrides the choice (the benchmark uses it to show the gain)."""
    forced = os.environ.get("PG_EDGE_QMM")
    if forced in ("native", "cpu"):
        return forced
    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "native"


def cpu_quantized_product(layer, x: mx.array) -> mx.array:
    """x float[..., in] @ dequant(weight).T -> float[..., out] in x's dtype, the CPU way."""
    rows = x.size // x.shape[-1]
    elements = layer["scales"].size * layer.group_size
    if rows >= DENSE_ROWS and elements <= DENSE_MAX_ELEMENTS:
        # Dequantized in the activation dtype: float32 inputs get the exact float32 weights;
        # for bf16 inputs the bf16 rounding (2^-8 relative) is far below the 4/8-bit step.
        scales, biases = layer["scales"].astype(x.dtype), layer.get("biases")
        biases = None if biases is None else biases.astype(x.dtype)
        w = mx.dequantize(layer["weight"], scales, biases,
                          group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        return x @ w.T
    y = mx.quantized_matmul(
        x.astype(mx.float32), layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
        transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
    )
    return y.astype(x.dtype)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """`QuantizedLinear` computed as `cpu_quantized_product` (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """`QuantizedEmbedding` whose tied-head product is `cpu_quantized_product`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return cpu_quantized_product(self, x)


def apply(model: nn.Module, mode: str | None = None) -> str:
    """Switch the quantized layers of `model` to this backend's compute; returns the mode used."""
    mode = mode or policy()
    if mode != "cpu":
        return mode
    quantized_decoder = False
    for path, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CpuQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CpuQuantizedEmbedding
        else:
            continue
        quantized_decoder = quantized_decoder or path.startswith("language_model.")
    if quantized_decoder and hasattr(model, "activation_dtype"):
        # The decoder's activations in float32 from the embedding on: every quantized product
        # then takes the fast kernel without two casts around it, and the elementwise ops run
        # in the CPU's native float32 rather than emulated bf16. KV caches double (small at
        # 224-448 px: 26 layers x 300 tokens x 2 x 4 heads x 256 x 4 B = 64 MB for PG2 3B).
        model.activation_dtype = mx.float32
    return mode
