"""SigLIP vision encoder (So400m/14 in the real checkpoints), as PaliGemma uses it.

Axis letters as in pg_edge.model.gemma (N patches, C width, H heads, E head width).

No CLS token, no pooling head: every patch token goes to the connector. Attribute names follow
the checkpoint keys under `vision_tower.vision_model.` so weights load with no rename table.
The patch convolution weight is stored in MLX layout OHWI (out, kh, kw, in); HF stores OIHW,
the converter transposes once.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import PgEdgeError
from .config import VisionConfig


def activation(name: str):
    """The GELU variant a config names: tanh approximation unless plain "gelu" is asked for."""
    if name in ("gelu", "gelu_python"):
        return nn.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
        return nn.gelu_approx  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    raise PgEdgeError(f"unsupported activation {name!r}")


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        """float[B, N, C] -> float[B, N, C]; full (bidirectional) attention over patches."""
        B, N, C = x.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(B, N, h, C // h).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = self.attend(q, k, v, None)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, N, C))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: None) -> mx.array:
        """q, k, v float[B, H, N, E] -> float[B, H, N, E]; every patch sees every patch."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN1(x)); x + mlp(LN2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipEmbeddings(nn.Module):
    """Patch convolution + one learned position row per grid cell ((S / patch)^2 rows): what
    ties a checkpoint to its resolution (docs/architecture.md, "Why 448 and 896 need their own
    checkpoints")."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
            stride=cfg.patch_size, bias=True,
        )
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        """float[B, P, P, 3] in [-1, 1] -> float[B, N, C], N = (P / patch)^2, row-major."""
        x = self.patch_embedding(pixels)
        B, gh, gw, C = x.shape
        x = x.reshape(B, gh * gw, C)
        return x + self.position_embedding.weight[None].astype(x.dtype)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


class VisionTower(nn.Module):
    """`vision_tower`: holds `vision_model` so the checkpoint's key prefix maps directly."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def __call__(self, pixels: mx.array) -> mx.array:
        """float[B, P, P, 3] -> float[B, N, C]."""
        return self.vision_model(pixels)
