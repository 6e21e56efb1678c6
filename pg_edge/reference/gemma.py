"""The Gemma / Gemma2 decoder in NumPy (PaliGemma 1 uses Gemma-2B, PaliGemma 2 Gemma2 2B/9B/27B).

    embeddings float[B, T, D] (text rows already scaled by sqrt(D), image rows as projected)
    -> L decoder layers: RMSNorm -> attention (RoPE, grouped KV heads) -> residual,
                         RMSNorm -> GeGLU MLP -> residual
    -> final RMSNorm -> logits against the embedding table (tied) -> float[B, T, V]

Gemma2 differs only in switches, all in GemmaSpec: the query scale comes from
query_pre_attn_scalar, attention scores and final logits are soft-capped, the attention and MLP
outputs get their own RMSNorm before the residual add, and some layers use a sliding window.
Weights live under `language_model.model.` with the HF names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pg_edge.reference.layers import (attention, check_gelu_tanh, gelu_tanh, linear, merge_heads,
                                      rms_norm, rope, soft_cap, split_heads)
from pg_edge.reference.masks import Tokens, prefix_lm_mask, sliding_window_mask
from pg_edge.reference.weights import Params

PREFIX = "language_model.model"


@dataclass(frozen=True)
class GemmaSpec:
    """Everything the decoder's code needs beyond the weights; Gemma vs Gemma2 is flags here."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    query_scale: float             # Gemma: head_dim ** -0.5; Gemma2: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None     # Gemma2: 50
    final_softcap: float | None    # Gemma2: 30
    post_norms: bool               # Gemma2: norms after attention and around the MLP
    sliding_window: int | None     # Gemma2: 4096 ...
    sliding_layers: tuple[bool, ...]  # ... on the layers marked "sliding_attention"

    @classmethod
    def from_config(cls, text_config: dict, p: Params) -> GemmaSpec:
        """From HF's text_config (model_type "gemma" or "gemma2"), with HF's defaults for absent
        keys, and the sizes read from the tensors and checked against it."""
        gemma2 = text_config.get("model_type", "gemma") == "gemma2"
        # transformers reads Gemma2's `hidden_activation` and Gemma's `hidden_act`, in which the
        # legacy value "gelu" of the official configs means the tanh form.
        act = text_config.get("hidden_activation" if gemma2 else "hidden_act") or "gelu_pytorch_tanh"
        check_gelu_tanh("gelu_pytorch_tanh" if act == "gelu" and not gemma2 else act, "text_config")
        num_layers = p.count("layers.{}.input_layernorm.weight")
        num_heads = text_config.get("num_attention_heads", 8)
        num_kv_heads = text_config.get("num_key_value_heads", num_heads)
        q_rows = p["layers.0.self_attn.q_proj.weight"].shape[0]
        k_rows = p["layers.0.self_attn.k_proj.weight"].shape[0]
        head_dim = text_config.get("head_dim") or q_rows // num_heads
        if q_rows != num_heads * head_dim or k_rows != num_kv_heads * head_dim or num_heads % num_kv_heads:
            raise ValueError(f"q_proj has {q_rows} rows and k_proj {k_rows}: that is not {num_heads} query "
                             f"and {num_kv_heads} key/value heads of width {head_dim}")
        if text_config.get("num_hidden_layers", num_layers) != num_layers:
            raise ValueError(f"text_config.num_hidden_layers = {text_config['num_hidden_layers']} "
                             f"but the weights have {num_layers} layers")
        rope_theta = (text_config.get("rope_parameters") or {}).get("rope_theta") \
            or text_config.get("rope_theta", 10000.0)
        window = text_config.get("sliding_window", 4096) if gemma2 else None
        layer_types = text_config.get("layer_types") or \
            ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return cls(
            num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            rms_norm_eps=text_config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            query_scale=text_config.get("query_pre_attn_scalar", 256) ** -0.5 if gemma2 else head_dim ** -0.5,
            attn_softcap=text_config.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_softcap=text_config.get("final_logit_softcapping", 30.0) if gemma2 else None,
            post_norms=gemma2,
            sliding_window=window,
            sliding_layers=tuple(window is not None and t == "sliding_attention" for t in layer_types),
        )


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far (float[B, K, S, hd] each)."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    tokens: Tokens | None = None  # facts about the S cached tokens (positions, blocks, valid)

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append this step's k, v (float[B, K, T, hd]) to layer's; return all of them."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = np.concatenate([self.keys[layer], k], axis=2)
            self.values[layer] = np.concatenate([self.values[layer], v], axis=2)
        return self.keys[layer], self.values[layer]


def self_attention(p: Params, x: np.ndarray, positions: np.ndarray, allowed: np.ndarray,
                   spec: GemmaSpec, cache: KVCache | None, layer: int) -> np.ndarray:
    """float[B, T, D] -> float[B, T, D]. allowed bool[B, T, S] over the S keys (cached + these)."""
    q = rope(split_heads(linear(x, p["q_proj.weight"]), spec.num_heads), positions, spec.rope_theta)
    k = rope(split_heads(linear(x, p["k_proj.weight"]), spec.num_kv_heads), positions, spec.rope_theta)
    v = split_heads(linear(x, p["v_proj.weight"]), spec.num_kv_heads)
    if cache is not None:
        k, v = cache.extend(layer, k, v)
    out = attention(q, k, v, allowed, spec.query_scale, spec.attn_softcap)
    return linear(merge_heads(out), p["o_proj.weight"])


def mlp(p: Params, x: np.ndarray) -> np.ndarray:
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). float[B, T, D] -> float[B, T, D]."""
    return linear(gelu_tanh(linear(x, p["gate_proj.weight"])) * linear(x, p["up_proj.weight"]),
                  p["down_proj.weight"])


def decoder_layer(p: Params, x: np.ndarray, positions: np.ndarray, allowed: np.ndarray,
                  spec: GemmaSpec, cache: KVCache | None, layer: int) -> np.ndarray:
    """One decoder layer, float[B, T, D] -> float[B, T, D].

    Gemma:  x += attn(norm(x));  x += mlp(norm'(x))           (HF calls norm' post_attention_layernorm)
    Gemma2: x += norm2(attn(norm(x)));  x += norm4(mlp(norm3(x)))
            (input_, post_attention_, pre_feedforward_, post_feedforward_layernorm)
    """
    def norm(name, h):
        return rms_norm(h, p[f"{name}.weight"], spec.rms_norm_eps)

    h = self_attention(p.sub("self_attn"), norm("input_layernorm", x), positions, allowed, spec, cache, layer)
    if not spec.post_norms:
        x = x + h
        return x + mlp(p.sub("mlp"), norm("post_attention_layernorm", x))
    x = x + norm("post_attention_layernorm", h)
    return x + norm("post_feedforward_layernorm", mlp(p.sub("mlp"), norm("pre_feedforward_layernorm", x)))


def decoder(p: Params, x: np.ndarray, tokens: Tokens, spec: GemmaSpec,
            cache: KVCache | None = None) -> np.ndarray:
    """float[B, T, D] embeddings -> float[B, T, D] final-normed hidden states.

    With a cache, these T tokens attend to the cached ones as well, and are added to it.
    """
    keys = tokens if cache is None or cache.tokens is None else cache.tokens.then(tokens)
    full = prefix_lm_mask(tokens, keys)
    local = sliding_window_mask(tokens, keys, spec.sliding_window) if spec.sliding_window else None
    for i in range(spec.num_layers):
        allowed = local if spec.sliding_layers[i] else full
        x = decoder_layer(p.sub(f"layers.{i}"), x, tokens.positions, allowed, spec, cache, i)
    if cache is not None:
        cache.tokens = keys
    return rms_norm(x, p["norm.weight"], spec.rms_norm_eps)


def lm_head(p: Params, h: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """float[B, T, D] -> float[B, T, V] logits, soft-capped for Gemma2.

    `p` is the root view: the head is `language_model.lm_head.weight` when the checkpoint has
    one, else the embedding table (tied weights, the usual case).
    """
    table = p.get("language_model.lm_head.weight")
    if table is None:
        table = p[f"{PREFIX}.embed_tokens.weight"]
    return soft_cap(linear(h, table), spec.final_softcap)
