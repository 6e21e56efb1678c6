"""Running transformers' PaliGemma on the same inputs as pg_edge, for parity tests.

Inputs cross between the two as NumPy: pg_edge's NHWC pixels become HF's NCHW; the prompt ids
come from pg_edge's processor (tests elsewhere prove they equal HF's processor ids).
"""
from __future__ import annotations

import numpy as np
import torch


def hf_inputs(ids: np.ndarray, pixels: np.ndarray) -> dict:
    """ids int[B, T] (no padding), pixels float[B, S, S, 3] -> HF keyword arguments."""
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    return {
        "input_ids": ids_t,
        "pixel_values": torch.tensor(np.asarray(pixels).transpose(0, 3, 1, 2).copy()),
        "attention_mask": torch.ones_like(ids_t),
        # The whole prompt is the bidirectional prefix (processor's token_type_ids = 0).
        "token_type_ids": torch.zeros_like(ids_t),
    }


@torch.no_grad()
def hf_last_logits(model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """float32[B, V] logits at the last prompt position."""
    return model(**hf_inputs(ids, pixels)).logits[:, -1].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids: np.ndarray, pixels: np.ndarray, n: int, vocab: int = 257152):
    """Up to n greedy tokens from transformers' generate (stops at eos, like pg_edge), and the
    log-probabilities over the first `vocab` ids at each step: float32[steps, vocab]."""
    out = model.generate(**hf_inputs(ids, pixels), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    logprobs = np.stack([torch.log_softmax(lg[0, :vocab].float(), -1).numpy() for lg in out.logits])
    return out.sequences[0, ids.shape[1]:].tolist(), logprobs


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())
