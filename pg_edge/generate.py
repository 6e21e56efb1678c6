"""Generation in three layers, as mlx-lm does it.

1. `generate_step`: a generator over a KV cache (mlx-lm's `KVCache`) with a `sampler` callable
   (mlx-lm's `make_sampler`: greedy, temperature, top-p, top-k). Prefill computes only the last
   position's logits; ids past the real vocabulary (`<image>` and HF's junk padding rows) are
   never sampled.
2. `StreamDecoder`: incremental detokenization whose pieces concatenate to exactly the final
   decoded text, holding back an unfinished multi-byte character.
3. The convenience calls (`PaliGemma.generate`, `.stream`) live in pipeline.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_sampler

from .errors import PgEdgeError
from .paligemma import PaliGemmaModel


def sampler_for(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Callable:
    """mlx-lm's sampler for these settings, after checking them (bad values are user errors)."""
    if not temperature >= 0:
        raise PgEdgeError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise PgEdgeError(f"top_p must be in (0, 1], got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise PgEdgeError(f"top_k must be a non-negative integer, got {top_k}")
    return make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=int(top_k))


def vocab_mask(vocab_size: int, limit: int) -> mx.array:
    """Additive float[V]: 0 for ids < limit, -inf for the rest (never emitted)."""
    return mx.where(mx.arange(vocab_size) < limit, 0.0, -mx.inf)


def generate_step(
    model: PaliGemmaModel,
    input_ids: mx.array,
    image_features: mx.array | None,
    *,
    valid: mx.array | None = None,
    sampler: Callable | None = None,
    max_tokens: int = 256,
    vocab_limit: int | None = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield (tokens int[B], logprobs float[B, V]) for each generated position.

    input_ids int[B, T] left-padded prompts (valid bool[B, T], None = no padding);
    image_features float[B, N, D] from `PaliGemmaModel.encode_image` (cache them per image).
    The caller stops on eos; this generator only stops after max_tokens.
    """
    sampler = sampler or sampler_for()
    n_layers = len(model.language_model.model.layers)
    cache = [KVCache() for _ in range(n_layers)]
    limit = vocab_limit or model.config.real_vocab_size
    B, T = input_ids.shape

    logits = model(input_ids, image_features=image_features, valid=valid, cache=cache, last_only=True)[:, -1]
    # Next position of each row = number of its valid tokens (positions count from 0).
    offset = valid.astype(mx.int32).sum(axis=1) if valid is not None else T
    bias = vocab_mask(logits.shape[-1], limit)

    def sample(lg):
        lg = lg.astype(mx.float32) + bias
        logprobs = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    tokens, logprobs = sample(logits)
    mx.async_eval(tokens, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            # Queue the next step before handing this token out (overlaps host and device).
            if valid is not None:
                valid = mx.concatenate([valid, mx.ones((B, 1), dtype=mx.bool_)], axis=1)
            nxt_logits = model.step(tokens[:, None], valid, offset, cache)[:, -1]
            offset = offset + 1
            nxt = sample(nxt_logits)
            mx.async_eval(*nxt)
        yield tokens, logprobs
        if n + 1 < max_tokens:
            tokens, logprobs = nxt


class StreamDecoder:
    """Token ids in, text pieces out; "".join(pieces) == tokenizer.decode(all ids).

    Each step decodes the whole sequence so far (cheap at these lengths, and immune to
    SentencePiece's context-dependent joins) and emits what is new, except a trailing
    U+FFFD: byte-fallback tokens of a multi-byte character decode to replacement characters
    until the character is complete. `finish()` emits whatever is left, even a dangling byte.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.emitted):
            return ""  # an earlier piece re-joined differently: wait for finish() to settle
        piece = stable[len(self.emitted):]
        self.emitted = stable
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            return piece
        return ""  # cannot happen with SentencePiece decoding; see test_streaming


@dataclass
class GenerationResult:
    """What one (image, prompt) generation produced. `text` excludes eos."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos) or "length"
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    vision_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def generation_tps(self) -> float:
        return len(self.tokens) / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": len(self.tokens),
            "timings": {
                "vision_s": round(self.vision_seconds, 4),
                "prefill_s": round(self.prompt_seconds, 4),
                "generation_s": round(self.generation_seconds, 4),
                "prompt_tps": round(self.prompt_tps, 2),
                "generation_tps": round(self.generation_tps, 2),
            },
            "peak_memory_gb": round(self.peak_memory_gb, 3),
            **self.extra,
        }
