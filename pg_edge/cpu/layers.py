"""CPU variants of the stacks: prefill evaluated layer by layer, a 16-bit or quantized
model's activations in float32, and its decode step's norms and residual adds in three calls a
layer.

A quantized model's dense prefill products dequantize pieces of every layer; in one lazy graph
MLX keeps many layers' pieces alive at once, so evaluating each layer's output frees its pieces
before the next layer builds its own (docs/performance.md, "Dense prefill in bounded pieces").
MLX's CPU quantized kernel is fast with float32 activations, its float32 products run on the
BLAS (pg_edge/blas.py) while its bf16 ones do not, and the CPU runs float32 natively.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..model.gemma import DecoderLayer, GemmaModel
from ..model.paligemma import PaliGemmaModel
from ..model.siglip import SiglipEncoder
from . import qmv
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


class CpuDecoderLayer(DecoderLayer):
    """`DecoderLayer` (same parameters) whose decode step runs its four norms and two residual
    adds (Gemma2; Gemma 1: two norms and two adds) as three calls of the compiled module's
    `rms_norm_add`, instead of fourteen scheduled MLX kernels (docs/performance.md, "Norms and
    residual adds in one call"). Its sum of squares runs in another order than MLX's, so the
    last bits differ: swapped in for 16-bit and quantized models only, with the compiled GELU.
    Prefill, training, tracing and a model without the module run the model class's code."""

    def __call__(self, x, mask, offset, cache=None):
        mod = qmv.module()
        if x.shape[1] != 1 or mod is None or not lean(self):
            return super().__call__(x, mask, offset, cache)
        eps = self.input_layernorm.eps  # every norm of the layer is built with the config's eps
        (n,) = mod.rms_norm_add(x, w_n=self.input_layernorm.weight, eps=eps)
        a = self.self_attn(n, mask, offset, cache)
        if self.sandwich:
            x, n = mod.rms_norm_add(x, a, self.post_attention_layernorm.weight,
                                    self.pre_feedforward_layernorm.weight, eps=eps)
            (h,) = mod.rms_norm_add(x, self.mlp(n), self.post_feedforward_layernorm.weight, eps=eps)
            return h
        x, n = mod.rms_norm_add(x, a, w_n=self.post_attention_layernorm.weight, eps=eps)
        return x + self.mlp(n)


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
    in bf16 they would not (MLX's bf16 matmul: docs/performance.md). The KV cache is float32.
    A sampled step's log-probabilities over the vocabulary take one compiled call."""

    def encode_image(self, pixel_values: mx.array) -> mx.array:
        if not lean(self):
            return super().encode_image(pixel_values)
        return self.multi_modal_projector(self.vision_tower(pixel_values.astype(mx.float32)))

    def embed_text(self, ids: mx.array) -> mx.array:
        return super().embed_text(ids).astype(mx.float32)

    def log_probs(self, logits: mx.array, limit: int, bias: mx.array | None = None) -> mx.array:
        """`PaliGemmaModel.log_probs` (the softcap, the mask of ids never emitted, the
        log-softmax) as one call of the compiled module's `log_softmax`, whose vectorised tanh
        and exp replace MLX's element-at-a-time ones over the vocabulary (docs/performance.md,
        "Sampled decoding's log-probabilities"); the model class's ops where it is not built."""
        mod = qmv.module()
        if mod is None or not lean(self) or logits.dtype != mx.float32:
            return super().log_probs(logits, limit, bias)
        return mod.log_softmax(logits, float(self.config.text.final_logit_softcapping or 0.0), int(limit))
