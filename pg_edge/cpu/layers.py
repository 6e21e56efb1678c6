"""CPU variants of the stacks: prefill evaluated layer by layer, and a 16-bit or quantized
model's activations in float32.

A quantized model's dense prefill products dequantize pieces of every layer; in one lazy graph
MLX keeps many layers' pieces alive at once, so evaluating each layer's output frees its pieces
before the next layer builds its own (docs/performance.md, "Dense prefill in bounded pieces").
MLX's CPU quantized kernel is fast with float32 activations, its float32 products run on the
BLAS (pg_edge/blas.py) while its bf16 ones do not, and the CPU runs float32 natively.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..model.gemma import GemmaModel
from ..model.paligemma import PaliGemmaModel
from ..model.siglip import SiglipEncoder
from .streams import lean


class CpuGemmaModel(GemmaModel):
    """`GemmaModel` that evaluates each layer's output in an inference prefill (never in
    decode, training or tracing)."""

    def __call__(self, h: mx.array, masks: dict, offset: Any, cache=None) -> mx.array:
        if h.shape[1] == 1 or not lean(self):
            return super().__call__(h, masks, offset, cache)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, masks[layer.window], offset, c)
            mx.eval(h)
        return self.norm(h)


class CpuSiglipEncoder(SiglipEncoder):
    """`SiglipEncoder` that evaluates each layer's output outside training and tracing."""

    def __call__(self, x: mx.array) -> mx.array:
        if not lean(self):
            return super().__call__(x)
        for layer in self.layers:
            x = layer(x)
            mx.eval(x)
        return x


class CpuPaliGemmaModel(PaliGemmaModel):
    """`PaliGemmaModel` that computes in float32 in inference, a 16-bit or quantized model's
    vision tower, connector and decoder alike: every product then is a float32 GEMM on the
    BLAS, dequantizes in float32, or takes the fast float32 quantized kernel with no casts
    around it; attention's own products (scores, weighted values) run on the BLAS too, where
    in bf16 they would not (MLX's bf16 matmul: docs/performance.md). The KV cache is float32."""

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        if not lean(self):
            return super().encode_image(pixel_values)
        return self.multi_modal_projector(self.vision_tower(pixel_values.astype(mx.float32)))

    def embed_text(self, ids: mx.array) -> mx.array:
        return super().embed_text(ids).astype(mx.float32)
