"""PaliGemma: SigLIP -> linear connector -> merge with text embeddings -> Gemma/Gemma2.

Data flow for one forward pass (axis letters: pg_edge.model.gemma):
    pixels float[B, P, P, 3] --vision_tower--> float[B, N, C] --multi_modal_projector--> float[B, N, D]
    input_ids int[B, T] --embed_tokens * sqrt(D)--> float[B, T, D]
    merge: positions holding `<image>` take the image features in order (unscaled: HF divides
           them by sqrt(D) before the common sqrt(D) multiply, a net identity)
    decoder with the prefix-LM mask (pg_edge.model.masks) -> logits float[B, T or 1, V]
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import PaliGemmaConfig
from .gemma import LanguageModel
from .masks import bounded_windows, decode_masks, layer_windows, make_cache, prefill_masks
from .siglip import VisionTower


def vocab_mask(vocab_size: int, limit: int) -> mx.array:
    """Additive float[V]: 0 for ids < limit, -inf for the rest (never emitted)."""
    return mx.where(mx.arange(vocab_size) < limit, 0.0, -mx.inf)


class MultiModalProjector(nn.Module):
    """`multi_modal_projector.linear`: one Linear(C -> D, bias) per image token."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class PaliGemmaModel(nn.Module):
    def __init__(self, config: PaliGemmaConfig, tie_word_embeddings: bool = True):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size, config.text.hidden_size)
        self.language_model = LanguageModel(config.text, tie_word_embeddings)
        # Bits of the KV cache `make_cache` builds: None = the activations' float dtype;
        # 8 = mlx-lm's QuantizedKVCache (`pg_edge.load(kv_bits=8)`).
        self.kv_bits = None

    # -- stages --------------------------------------------------------------------------
    def encode_image(self, pixel_values: mx.array) -> mx.array:
        """float[B, P, P, 3] in [-1, 1] -> image features float[B, N, D]."""
        # The patch conv is never quantized or wrapped (LoRA), so its dtype is the model's.
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        return self.multi_modal_projector(self.vision_tower(pixel_values.astype(dtype)))

    def embed_text(self, ids: mx.array) -> mx.array:
        """int[B, T] -> float[B, T, D], the embedding rows (unscaled) in the decoder's dtype."""
        return self.language_model.model.embed_tokens(ids)

    def embed(self, input_ids: mx.array, image_features: mx.array | None) -> mx.array:
        """int[B, T] (+ float[B, N, D]) -> float[B, T, D], text scaled by sqrt(D)."""
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        # `<image>` lies past the embedding of real checkpoints' vocabulary: look up pad instead.
        h = self.embed_text(mx.where(is_image, self.config.pad_token_id, input_ids))
        h = h * mx.array(self.config.text.hidden_size**0.5, dtype=h.dtype)
        if image_features is None:
            return h
        # The k-th `<image>` of a row takes feature k of that row's image.
        k = mx.maximum(mx.cumsum(is_image.astype(mx.int32), axis=1) - 1, 0)
        feats = mx.take_along_axis(image_features.astype(h.dtype), k[..., None], axis=1)
        return mx.where(is_image[..., None], feats, h)

    # -- masks and caches (the rules: pg_edge.model.masks) ---------------------------------
    def layer_windows(self) -> list:
        """Each decoder layer's sliding window (None: global)."""
        return [layer.window for layer in self.language_model.model.layers]

    def set_attention(self, mode: str) -> None:
        """"window" (Gemma2's sliding layers keep their window) or "global" (none do); see
        pg_edge.model.masks.ATTENTION_MODES. Gemma 1 has no window: both are the same model."""
        for layer, w in zip(self.language_model.model.layers, layer_windows(self.config.text, mode)):
            layer.window = w

    def masks(self, mask_ar: mx.array | None, valid: mx.array | None, B: int, T: int) -> dict:
        """{window: bool[B, 1, T, T] or None} for a pass from position 0 (mask_ar None: all
        prefix; valid None: no padding)."""
        return prefill_masks(set(self.layer_windows()), mask_ar, valid, B, T)

    def make_cache(self, padded: bool = False) -> list:
        """One KV cache per decoder layer for a generation (padded: some rows are left-padded)."""
        return make_cache(self.layer_windows(), padded, self.kv_bits, self.config.text.head_dim)

    def cap_logits(self, logits: mx.array) -> mx.array:
        """The logits `capped=True` gives, from those `capped=False` gives."""
        return self.language_model.cap(logits)

    def log_probs(self, logits: mx.array, limit: int, bias: mx.array | None = None) -> mx.array:
        """Raw logits float[B, V] (`capped=False`) -> float32[B, V] log-softmax of the capped
        logits over the ids < limit, -inf for the rest (never emitted). bias: `vocab_mask(V,
        limit)`, passed in by a caller that computes it once per generation."""
        lg = self.cap_logits(logits.astype(mx.float32))
        lg = lg + (vocab_mask(lg.shape[-1], limit) if bias is None else bias)
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    # -- whole pass ----------------------------------------------------------------------
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        *,
        image_features: mx.array | None = None,
        mask_ar: mx.array | None = None,
        valid: mx.array | None = None,
        cache: list | None = None,
        last_only: bool = False,
        logits_from: int = 0,
        capped: bool = True,
    ) -> mx.array:
        """A full (prefill or training) pass from position 0.

        input_ids int[B, T]; pixel_values float[B, P, P, 3] or precomputed image_features
        float[B, N, D]; mask_ar int[B, T] (None: all prefix); valid bool[B, T] (None: no
        padding; padding may be on either side but must be contiguous at the ends).
        Returns logits float[B, T, V]; float[B, 1, V] with last_only; float[B, T - k, V] with
        logits_from=k (scoring a suffix without pushing every prompt row through the LM head).
        capped=False: Gemma2's final logit softcap left off (see LanguageModel.logits).
        """
        if image_features is None and pixel_values is not None:
            image_features = self.encode_image(pixel_values)
        h = self.embed(input_ids, image_features)
        offset: Any = 0
        if valid is not None:
            # Positions count valid tokens from 0 (big_vision); leading padding shifts them.
            offset = -mx.argmax(valid.astype(mx.int32), axis=1).astype(mx.int32)  # argmax is uint32
        masks = self.masks(mask_ar, valid, *input_ids.shape)
        if last_only:
            logits_from = input_ids.shape[1] - 1
        return self.language_model(h, masks, offset, cache, logits_from=logits_from, capped=capped)

    def step(self, tokens: mx.array, valid: mx.array | None, offset: Any, cache: list,
             capped: bool = True) -> mx.array:
        """Decode: tokens int[B, T] appended causally after the cache; valid bool[B, S] covers
        every key including the new ones (None: no padding anywhere); offset: position of
        tokens[:, 0], int or int[B]. Returns logits float[B, T, V] (capped: as in __call__)."""
        # Generated ids are real text ids (never `<image>`): a plain lookup, no remapping.
        h = self.embed_text(tokens)
        h = h * mx.array(self.config.text.hidden_size**0.5, dtype=h.dtype)
        windows = self.layer_windows()
        S = cache[0].offset + tokens.shape[1]
        masks = decode_masks(set(windows), valid, tokens.shape[1], S, bounded_windows(windows, cache))
        return self.language_model(h, masks, offset, cache, capped=capped)
