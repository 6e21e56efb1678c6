"""CPU variants of the stacks: prefill evaluated layer by layer, and a quantized decoder's
activations in float32.

A quantized model's dense prefill products dequantize pieces of every layer; in one lazy graph
MLX keeps many layers' pieces alive at once, so evaluating each layer's output frees its pieces
before the next layer builds its own (docs/performance.md, "Dense prefill in bounded pieces").
MLX's CPU quantized kernel is fast with float32 activations, and the CPU runs float32 natively.
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
    """`PaliGemmaModel` whose decoder computes in float32 from the embedding on (a quantized
    decoder: every quantized product then takes the fast kernel without casts around it)."""

    def embed_text(self, ids: mx.array) -> mx.array:
        return super().embed_text(ids).astype(mx.float32)
