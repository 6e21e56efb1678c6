"""MLP variants whose tanh GELU runs as pg_edge's compiled kernel (pg_edge.cpu.qmv, act.cpp).

SigLIP's MLP, fc2(gelu(fc1(x))), and Gemma's GeGLU, down(gelu(gate(x)) * up(x)), apply the
tanh-approximated GELU to every hidden unit of every token: x float[B, T, intermediate]. MLX's
CPU code evaluates its tanh one element at a time, a large share of a prefill layer's time; the
compiled kernel computes x / (1 + exp(-2z)), the same function, with a vectorised exp
(measurements: docs/performance.md, "GELU"). It is taken at every size in inference when the
module is built, a decode step's single row too (where MLX's op costs more than the products
around it would suggest: docs/performance.md, "GELU"); otherwise, and for the exact GELU, the model class's activation
runs.

Swapped in only for 16-bit and quantized models (pg_edge.cpu.apply): a float32 model keeps the
model classes' exact numbers (the kernel's results differ from MLX's tanh in the last bits).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model.gemma import MLP
from ..model.siglip import SiglipMLP
from . import qmv
from .products import cpu_quantized_products
from .streams import lean


def cpu_activation(module: nn.Module, x: mx.array) -> mx.array:
    """module.act(x), by the compiled kernel where it applies."""
    if (module.act is nn.gelu_approx and lean(module)
            and x.dtype in (mx.float32, mx.bfloat16) and qmv.module() is not None):
        return qmv.module().gelu_tanh(mx.contiguous(x))
    return module.act(x)


class CpuSiglipMLP(SiglipMLP):
    """`SiglipMLP` with `cpu_activation` (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(cpu_activation(self, self.fc1(x)))


class CpuMLP(MLP):
    """Gemma's `MLP` with `cpu_activation` (same parameters); a quantized decode step's gate and
    up products from one compiled call."""

    def __call__(self, x: mx.array) -> mx.array:
        # decode of a quantized model: gate and up from one call of the compiled matvec
        fused = cpu_quantized_products((self.gate_proj, self.up_proj), x) if lean(self) else None
        gate, up = fused if fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(cpu_activation(self, gate) * up)
