"""Who may attend to whom: PaliGemma's prefix-LM mask, padding, and Gemma2's sliding window.

big_vision describes a sequence by two per-token flags (models/proj/paligemma/paligemma.py,
`make_attn_mask`):

    mask_ar  0 for the prefix (image tokens, <bos>, the prompt, "\\n"), 1 for the suffix
    valid    False for padding

and lets token i attend to token j when cum[j] <= cum[i] and valid[j], with cum = cumsum(mask_ar).
The prefix (cum 0) is one block that attends both ways; each suffix token starts a block of
its own, so the suffix is causal and sees the whole prefix.

Gemma2's sliding-window layers additionally limit how far back a query looks. HF transformers
(5.x, eager attention; PaliGemmaModel.forward with token_type_ids) builds that mask as
    (j <= i and i - j < window)  OR  (i and j both in the prefix),  and valid[j]
so the window never cuts the bidirectional prefix; it only hides prefix and suffix tokens more
than `window - 1` positions behind a suffix query. Here: same rule, with "both in the prefix"
read as "same block" (the same thing for prefix + suffix) and distances counted in positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tokens:
    """Per-token facts the masks and RoPE need, all int/bool[B, T]."""

    positions: np.ndarray  # 0-based index among the valid tokens (RoPE position)
    blocks: np.ndarray     # cumsum(mask_ar): the prefix is block 0, each suffix token a new block
    valid: np.ndarray      # False for padding

    @classmethod
    def of(cls, mask_ar: np.ndarray, valid: np.ndarray, after: Tokens | None = None) -> Tokens:
        """Facts for a [B, T] chunk, continuing the chunk `after` (the tokens already cached)."""
        mask_ar, valid = np.asarray(mask_ar, np.int64), np.asarray(valid, bool)
        positions = np.cumsum(valid, axis=1) - 1
        blocks = np.cumsum(mask_ar, axis=1)
        if after is not None:
            positions = positions + after.positions[:, -1:] + 1
            blocks = blocks + after.blocks[:, -1:]
        return cls(np.maximum(positions, 0), blocks, valid)

    def then(self, later: Tokens) -> Tokens:
        """These tokens followed by `later` (a KV cache's keys after an update)."""
        def join(a, b):
            return np.concatenate([a, b], axis=1)

        return Tokens(join(self.positions, later.positions), join(self.blocks, later.blocks),
                      join(self.valid, later.valid))


def prefix_lm_mask(queries: Tokens, keys: Tokens) -> np.ndarray:
    """bool[B, Tq, Tk]: big_vision's rule, block[key] <= block[query] and the key is valid."""
    earlier_block = keys.blocks[:, None, :] <= queries.blocks[:, :, None]
    return earlier_block & keys.valid[:, None, :]


def sliding_window_mask(queries: Tokens, keys: Tokens, window: int) -> np.ndarray:
    """bool[B, Tq, Tk]: the prefix-LM mask, keys further than window - 1 back hidden, except in
    the query's own block (the bidirectional prefix stays whole, as in HF transformers)."""
    near = queries.positions[:, :, None] - keys.positions[:, None, :] < window
    same_block = keys.blocks[:, None, :] == queries.blocks[:, :, None]
    return prefix_lm_mask(queries, keys) & (near | same_block)
