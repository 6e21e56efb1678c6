"""Named access to the checkpoint's tensors, in the compute dtype.

The model code reads weights by their checkpoint names (`p["self_attn.q_proj.weight"]` under
the prefix `language_model.model.layers.3`), so the code and the key table are the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pg_edge.errors import CheckpointError
from pg_edge.reference.dequant import DequantizedWeights


class Params:
    """The tensors under one name prefix, converted to `dtype` on first use (and kept if `cache`)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], dtype=np.float32, prefix: str = "",
                 cache: dict | None = None):
        self.tensors = tensors
        self.dtype = np.dtype(dtype)
        self.prefix = prefix
        self.cache = cache  # shared by every sub-view; None = convert on every access

    @classmethod
    def of_checkpoint(cls, weights: Mapping[str, np.ndarray], config: dict, dtype=np.float32,
                      cache_weights: bool = True) -> Params:
        """All weights of a checkpoint, MLX-quantized ones dequantized, as a Params at the root."""
        return cls(DequantizedWeights(weights, config), dtype, "", {} if cache_weights else None)

    def sub(self, prefix: str) -> Params:
        """The view under `prefix` ("vision_tower.vision_model", then "encoder.layers.0", ...)."""
        return Params(self.tensors, self.dtype, self._full(prefix), self.cache)

    def _full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def __contains__(self, name: str) -> bool:
        return self._full(name) in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        full = self._full(name)
        if self.cache is not None and full in self.cache:
            return self.cache[full]
        if full not in self.tensors:
            raise CheckpointError(f"the checkpoint has no tensor {full!r}")
        array = np.asarray(self.tensors[full], dtype=self.dtype)
        if self.cache is not None:
            self.cache[full] = array
        return array

    def get(self, name: str) -> np.ndarray | None:
        """The tensor, or None when the checkpoint has none of that name (an optional bias)."""
        return self[name] if name in self else None

    def count(self, pattern: str) -> int:
        """How many consecutive indices N have `pattern.format(N)` present (layers 0, 1, ...)."""
        n = 0
        while pattern.format(n) in self:
            n += 1
        return n
