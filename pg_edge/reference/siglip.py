"""SigLIP, the vision encoder, in NumPy (big_vision's ViT "So400m/14"; HF SiglipVisionModel).

    pixels float[B, H, W, 3] in [-1, 1]
    -> patch embedding: a conv with kernel = stride = patch (14), i.e. one Linear per patch
    -> + learned position embedding (one row per patch; no CLS token)
    -> L pre-LayerNorm transformer blocks (full attention, tanh-GELU MLP, all with biases)
    -> post_layernorm -> float[B, N, Dv], N = (H / patch) * (W / patch)

Weights live under `vision_tower.vision_model.` with the HF names; the patch conv is in MLX's
layout (O, kh, kw, I), HF's is (O, I, kh, kw).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pg_edge.reference.layers import (attention, check_gelu_tanh, gelu_tanh, layer_norm, linear,
                                      merge_heads, split_heads)
from pg_edge.reference.weights import Params

PREFIX = "vision_tower.vision_model"


@dataclass(frozen=True)
class SiglipSpec:
    """What the vision encoder's code needs beyond the weights."""

    num_layers: int
    num_heads: int
    patch_size: int
    layer_norm_eps: float

    @classmethod
    def from_config(cls, vision_config: dict, p: Params) -> SiglipSpec:
        """From HF's vision_config, with the sizes read from the tensors and checked against it."""
        check_gelu_tanh(vision_config.get("hidden_act", "gelu_pytorch_tanh"), "vision_config.hidden_act")
        num_layers = p.count("encoder.layers.{}.layer_norm1.weight")
        width = p["post_layernorm.weight"].shape[0]
        conv = p["embeddings.patch_embedding.weight"]
        if conv.ndim != 4 or conv.shape[3] != 3 or conv.shape[1] != conv.shape[2]:
            raise ValueError(f"{PREFIX}.embeddings.patch_embedding.weight has shape {conv.shape}; "
                             "expected MLX layout (out, patch, patch, 3): convert the checkpoint first")
        spec = cls(num_layers=num_layers,
                   num_heads=vision_config.get("num_attention_heads", 16),
                   patch_size=conv.shape[1],
                   layer_norm_eps=vision_config.get("layer_norm_eps", 1e-6))
        stated = {"num_hidden_layers": num_layers, "patch_size": conv.shape[1], "hidden_size": width}
        for key, value in stated.items():
            if key in vision_config and vision_config[key] != value:
                raise ValueError(f"vision_config.{key} = {vision_config[key]} but the weights say {value}")
        if width % spec.num_heads:
            raise ValueError(f"vision width {width} does not split into {spec.num_heads} heads")
        return spec


def patch_embedding(p: Params, pixels: np.ndarray, patch: int) -> np.ndarray:
    """float[B, H, W, 3] -> float[B, N, Dv]: each patch x patch x 3 tile through one Linear.

    The conv has kernel = stride = patch and no padding, so it is a matmul over tiles; tiles are
    numbered row by row (N = rows * cols), as the conv's output is flattened.
    """
    b, h, w, c = pixels.shape
    rows, cols = h // patch, w // patch
    tiles = pixels[:, : rows * patch, : cols * patch]
    tiles = tiles.reshape(b, rows, patch, cols, patch, c).transpose(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(b, rows * cols, patch * patch * c)                # (kh, kw, I) order
    kernel = p["patch_embedding.weight"]                                    # [Dv, kh, kw, I]
    return linear(tiles, kernel.reshape(kernel.shape[0], -1), p["patch_embedding.bias"])


def embeddings(p: Params, pixels: np.ndarray, spec: SiglipSpec) -> np.ndarray:
    """float[B, H, W, 3] -> float[B, N, Dv]: patch embedding + learned position embedding."""
    x = patch_embedding(p, pixels, spec.patch_size)
    table = p["position_embedding.weight"]                                  # [N, Dv]
    if table.shape[0] != x.shape[1]:
        raise ValueError(f"{x.shape[1]} patches from a {pixels.shape[1]}x{pixels.shape[2]} image, "
                         f"but the checkpoint has {table.shape[0]} position embeddings")
    return x + table


def self_attention(p: Params, x: np.ndarray, spec: SiglipSpec) -> np.ndarray:
    """float[B, N, Dv] -> float[B, N, Dv]: full (unmasked) multi-head attention, hd ** -0.5 scale."""
    q, k, v = (split_heads(linear(x, p[f"{n}_proj.weight"], p[f"{n}_proj.bias"]), spec.num_heads)
               for n in ("q", "k", "v"))
    out = attention(q, k, v, None, scale=q.shape[-1] ** -0.5)
    return linear(merge_heads(out), p["out_proj.weight"], p["out_proj.bias"])


def mlp(p: Params, x: np.ndarray) -> np.ndarray:
    """float[B, N, Dv] -> float[B, N, Dv]: fc1 -> tanh-GELU -> fc2.

    Quantized folders may zero-pad the hidden width (4304 -> 4352) so that it splits into whole
    quantization groups; the padded units are exactly zero, so both sides are cut to the narrower.
    """
    w1, b1, w2 = p["fc1.weight"], p["fc1.bias"], p["fc2.weight"]
    f = min(w1.shape[0], b1.shape[0], w2.shape[1])
    return linear(gelu_tanh(linear(x, w1[:f], b1[:f])), w2[:, :f], p["fc2.bias"])


def encoder_layer(p: Params, x: np.ndarray, spec: SiglipSpec) -> np.ndarray:
    """One pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)). float[B, N, Dv] -> same."""
    def norm(name, h):
        return layer_norm(h, p[f"{name}.weight"], p[f"{name}.bias"], spec.layer_norm_eps)

    x = x + self_attention(p.sub("self_attn"), norm("layer_norm1", x), spec)
    return x + mlp(p.sub("mlp"), norm("layer_norm2", x))


def vision_tower(p: Params, pixels: np.ndarray, spec: SiglipSpec) -> np.ndarray:
    """float[B, H, W, 3] in [-1, 1] -> float[B, N, Dv], the encoder's last hidden state."""
    x = embeddings(p.sub("embeddings"), pixels.astype(p.dtype, copy=False), spec)
    for i in range(spec.num_layers):
        x = encoder_layer(p.sub(f"encoder.layers.{i}"), x, spec)
    return layer_norm(x, p["post_layernorm.weight"], p["post_layernorm.bias"], spec.layer_norm_eps)
