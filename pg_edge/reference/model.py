"""PaliGemma end to end, in NumPy: image -> SigLIP -> projector -> merged with text -> Gemma.

    pixels float[B, H, W, 3] --vision_tower--> float[B, N, Dv]
                             --multi_modal_projector.linear--> float[B, N, D]   (image features)
    input_ids int[B, T]: N `<image>` tokens (image_token_index), <bos>, prompt, "\\n", suffix...
      text rows: embed_tokens[id] * sqrt(D);   image rows: the image features, in order, unscaled
    -> Gemma decoder under the prefix-LM mask -> logits float[B, T, V]

(HF divides the image features by sqrt(D) and then multiplies every row by sqrt(D): the net
effect is the identity used here, as in big_vision.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pg_edge.reference import gemma, siglip
from pg_edge.reference.layers import linear
from pg_edge.reference.masks import Tokens
from pg_edge.reference.safetensors_np import read_folder
from pg_edge.reference.weights import Params

IMAGE_TOKEN_INDEX = 257152  # `<image>`; the real vocabulary is the 257152 ids below it


class ReferenceModel:
    """A PaliGemma 1 or 2 checkpoint (HF config + pg_edge/HF-classic weight names) in NumPy."""

    def __init__(self, config: dict, weights: Mapping[str, np.ndarray], dtype=np.float32,
                 cache_weights: bool = True):
        """config: HF config.json as a dict; weights: name -> array (MLX-quantized ones are
        dequantized per config["quantization"]); dtype: float32 or float64 for all compute.
        cache_weights=False converts each weight on every use (less memory for big models)."""
        self.config = config
        self.dtype = np.dtype(dtype)
        self.params = Params.of_checkpoint(weights, config, self.dtype, cache_weights)
        self.vision = siglip.SiglipSpec.from_config(config.get("vision_config", {}),
                                                    self.params.sub(siglip.PREFIX))
        self.text = gemma.GemmaSpec.from_config(config.get("text_config", {}), self.params.sub(gemma.PREFIX))
        self.image_token_index = config.get("image_token_index",
                                            config.get("image_token_id", IMAGE_TOKEN_INDEX))

    @classmethod
    def from_folder(cls, path: str | Path, dtype=np.float32, cache_weights: bool = True) -> ReferenceModel:
        """A converted pg_edge folder (config.json + model*.safetensors, tensors read lazily)."""
        config, weights = read_folder(path)
        return cls(config, weights, dtype, cache_weights)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """float[B, H, W, 3] (NHWC, in [-1, 1]) -> float[B, N, D]: SigLIP then the projector."""
        pixel_values = np.asarray(pixel_values)
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(f"pixel_values must be float[B, H, W, 3] (NHWC); got shape {pixel_values.shape}")
        x = siglip.vision_tower(self.params.sub(siglip.PREFIX), pixel_values, self.vision)
        p = self.params.sub("multi_modal_projector.linear")
        return linear(x, p["weight"], p["bias"])

    def embed(self, input_ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
        """int[B, T] (+ float[B, H, W, 3]) -> float[B, T, D]: text rows embed_tokens * sqrt(D),
        each row's `<image>` positions filled with that row's image features in order."""
        input_ids = np.asarray(input_ids)
        is_image = input_ids == self.image_token_index
        table = self.params[f"{gemma.PREFIX}.embed_tokens.weight"]
        x = table[np.where(is_image, 0, input_ids)] * np.asarray(np.sqrt(table.shape[1]), self.dtype)
        if not is_image.any():
            return x
        if pixel_values is None:
            raise ValueError("input_ids has <image> tokens but no pixel_values were given")
        features = self.image_features(pixel_values)                           # [B, N, D]
        counts = is_image.sum(axis=1)
        if features.shape[0] != x.shape[0] or np.any(counts != features.shape[1]):
            raise ValueError(f"each row needs {features.shape[1]} <image> tokens for {features.shape[0]} "
                             f"image(s); rows have {counts.tolist()}")
        x[is_image] = features.reshape(-1, features.shape[-1])  # row-major: row b, then token order
        return x

    def _run(self, input_ids, pixel_values, mask_ar, valid, cache=None, last_only=False) -> np.ndarray:
        """Embed, decode (continuing `cache` if given) and project to logits float[B, T or 1, V]."""
        input_ids = np.atleast_2d(np.asarray(input_ids))
        mask_ar = np.zeros(input_ids.shape, np.int64) if mask_ar is None else np.asarray(mask_ar)
        valid = np.ones(input_ids.shape, bool) if valid is None else np.asarray(valid, bool)
        if mask_ar.shape != input_ids.shape or valid.shape != input_ids.shape:
            raise ValueError(f"mask_ar {mask_ar.shape} and valid {valid.shape} must match "
                             f"input_ids {input_ids.shape}")
        tokens = Tokens.of(mask_ar, valid, after=cache.tokens if cache is not None else None)
        x = self.embed(input_ids, pixel_values)
        h = gemma.decoder(self.params.sub(gemma.PREFIX), x, tokens, self.text, cache)
        return gemma.lm_head(self.params, h[:, -1:] if last_only else h, self.text)

    def logits(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None,
               mask_ar: np.ndarray | None = None, valid: np.ndarray | None = None) -> np.ndarray:
        """Logits at every position: float[B, T, V].

        input_ids int[B, T]; pixel_values float[B, H, W, 3]; mask_ar int[B, T], 0 for the prefix
        and 1 for the suffix (None: all prefix, fully bidirectional); valid bool[B, T], False
        for padding (None: no padding). Positions count valid tokens from 0.
        """
        return self._run(input_ids, pixel_values, mask_ar, valid)

    def greedy(self, input_ids: np.ndarray, pixel_values: np.ndarray | None, max_tokens: int,
               eos_id: int = 1, vocab_limit: int = IMAGE_TOKEN_INDEX) -> list[int]:
        """Greedy decoding of one example: the prompt int[T] is the bidirectional prefix, each
        generated token a causal suffix token. Returns up to max_tokens ids (ending with eos_id
        if it came); ids >= vocab_limit (the padded, untrained rows) are never chosen."""
        prompt = np.asarray(input_ids).reshape(1, -1)
        cache = gemma.KVCache()
        logits = self._run(prompt, pixel_values, None, None, cache, last_only=True)
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(np.argmax(logits[0, -1, :vocab_limit]))
            out.append(token)
            if token == eos_id:
                break
            logits = self._run([[token]], None, [[1]], None, cache, last_only=True)
        return out
