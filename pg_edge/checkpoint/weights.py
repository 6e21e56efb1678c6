"""Checkpoint key names and layouts: every Hugging Face layout -> the converted-folder layout.

The converted folder (pg_edge's and mlx-vlm's) uses the hub's classic key names with MLX layouts:
    vision_tower.vision_model.{embeddings,encoder,post_layernorm}.*  (patch conv OHWI)
    multi_modal_projector.linear.{weight,bias}
    language_model.model.{embed_tokens,layers.N.*,norm}.*
    language_model.lm_head.weight  (only when not tied to the embeddings)

Hugging Face checkpoints come in three layouts:
    classic (hub, transformers <= 4.51): the names above, conv OIHW
    4.52+:  model.vision_tower.vision_model.*, model.multi_modal_projector.*,
            model.language_model.{layers,embed_tokens,norm}.*, lm_head.weight
    5.x:    as 4.52 but the SigLIP tower flattened: model.vision_tower.{embeddings,encoder,...}

`sanitize` is pure, and its output is in the converted layout: sanitizing that again as such
(`mlx_layout=True`) changes nothing (tests/checkpoint/test_fixtures.py checks it). Which transforms apply
is decided by the safetensors metadata marker `format: mlx` written by MLX tools, never by
guessing from shapes, so the caller passes the marker of the file the tensors came from.
"""
from __future__ import annotations

from typing import Mapping

VISION_PARTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")
# Buffers, and SigLIP's pooling head (PaliGemma feeds every patch token, never the pooled one).
DROP = ("position_ids", "rotary_emb.inv_freq", "vision_model.head.")


def canonical_key(key: str) -> str:
    """Any HF layout's key -> the classic key name (identity on classic names)."""
    k = key
    for top in ("language_model", "vision_tower", "multi_modal_projector"):
        if k.startswith(f"model.{top}"):
            k = k[len("model."):]
            break
    if k == "lm_head.weight" or k.startswith("lm_head."):
        return "language_model." + k
    if k.startswith("language_model.") and not k.startswith(("language_model.model.", "language_model.lm_head")):
        return "language_model.model." + k[len("language_model."):]
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        rest = k[len("vision_tower."):]
        if rest.startswith(VISION_PARTS):
            return "vision_tower.vision_model." + rest
    return k


def is_dropped(key: str) -> bool:
    return any(d in key for d in DROP)


def sanitize(weights: Mapping, mlx_layout: bool, tie_word_embeddings: bool = True) -> dict:
    """Rename to classic keys, transpose the patch conv to OHWI unless `mlx_layout`, drop
    buffers that are not parameters and a tied LM head. Works on mx.array or np.ndarray."""
    out = {}
    for key, value in weights.items():
        k = canonical_key(key)
        if is_dropped(k):
            continue
        if k.endswith("patch_embedding.weight") and not mlx_layout:
            value = value.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        out[k] = value
    if tie_word_embeddings:
        out.pop("language_model.lm_head.weight", None)
    return out


def component(key: str) -> str:
    """Which part of the model a key belongs to: vision, connector, embed, decoder."""
    if key.startswith("vision_tower."):
        return "vision"
    if key.startswith("multi_modal_projector."):
        return "connector"
    if "embed_tokens" in key or "lm_head" in key:
        return "embed"
    return "decoder"
