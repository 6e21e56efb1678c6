"""Generation in three layers, as mlx-lm does it.

1. `generate_step(model, input_ids, image_features, sampler=...)`: a generator of (token,
   logprobs) over the KV caches the model makes (`model.make_cache`: pg_edge.model.masks).
   Prefill computes only the
   last position's logits; ids past the real vocabulary (`<image>`, HF's junk padding rows)
   are never sampled. The caller stops it; it stops only after max_tokens.
2. `stream_generate(...)`: one prompt, yielding `Chunk`s of text as tokens arrive (through a
   `Detokenizer`), the last one carrying the `GenerationResult`.
3. `generate(...)` / `generate_batch(...)`: the convenience calls returning results.

Layers 2 and 3 take `should_stop`, a callable checked once per token: when it returns True the
generation ends with finish_reason "cancelled" (how `PaliGemma.cancel()` stops one).

Sampling settings travel as one `Sampling` (temperature, top_p, top_k, seed), turned into an
mlx-lm sampler (`make_sampler`) in one place. `until_eos` is the one loop that stops rows on
eos; batch generation, streaming and the trainer's evaluation all use it. pg_edge.pipeline's
`PaliGemma.stream` / `.generate` / `.generate_batch` are thin calls onto layers 2 and 3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import mlx.core as mx

from ._mlx_lm import make_sampler
from .errors import PgEdgeError
from .model.paligemma import PaliGemmaModel, vocab_mask
from .inputs.checks import check_max_tokens, check_sampling


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: temperature 0 = greedy; top_p 1 / top_k 0 = off; seed: reseeds
    MLX's generator before generating (None: leave it as it is). Checked on creation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)  # kinds and ranges

    @classmethod
    def of(cls, sampling: "Sampling | None" = None, **settings) -> "Sampling":
        """`sampling`, or one built from keyword settings (temperature, top_p, top_k, seed)."""
        if sampling is not None and settings:
            raise PgEdgeError(f"give either sampling= or {', '.join(settings)}, not both")
        if sampling is not None:
            return sampling
        unknown = set(settings) - {"temperature", "top_p", "top_k", "seed"}
        if unknown:
            raise PgEdgeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return cls(**settings)

    def sampler(self, vocab_size: int | None = None) -> Callable[[mx.array], mx.array]:
        """mlx-lm's sampler: logprobs float[B, V] -> token ids int[B]. A top_k of at least
        `vocab_size` (the ids the model may emit) keeps them all: no filtering."""
        if self.temperature == 0:
            return greedy  # what make_sampler gives at temperature 0, as a known function
        top_k = 0 if vocab_size is not None and self.top_k >= vocab_size else int(self.top_k)
        return make_sampler(temp=self.temperature, top_p=self.top_p if self.top_p < 1 else 0.0, top_k=top_k)


def greedy(logprobs: mx.array) -> mx.array:
    """Temperature 0: float[B, V] -> the most likely id int[B]."""
    return mx.argmax(logprobs, axis=-1)


GREEDY = Sampling()


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
    """Yield (tokens int[B], logprobs float[B, V]) for each generated position (with the
    greedy sampler the logprobs are lazy: computed only if the caller evaluates them).

    input_ids int[B, T] left-padded prompts (valid bool[B, T], None = no padding);
    image_features float[B, N, D] from `PaliGemmaModel.encode_image` (cache them per image).
    The caller stops on eos; this generator only stops after max_tokens.
    """
    sampler = sampler or GREEDY.sampler()
    cache = model.make_cache(padded=valid is not None)
    limit = vocab_limit or model.config.real_vocab_size
    B, T = input_ids.shape

    # The model returns raw logits (Gemma2's final softcap left off). Greedy picks their argmax
    # (the same id: the softcap is an increasing tanh) and leaves the logprobs lazy, computed
    # only if a caller evaluates them (their cost: docs/performance.md, "Greedy decoding takes
    # the raw argmax"); other samplers get `model.log_probs` (capped, masked, log-softmax).
    lazy = sampler is greedy
    logits = model(input_ids, image_features=image_features, valid=valid, cache=cache, last_only=True,
                   capped=False)[:, -1]
    # Next position of each row = number of its valid tokens (positions count from 0).
    offset = valid.astype(mx.int32).sum(axis=1) if valid is not None else T
    bias = vocab_mask(logits.shape[-1], limit)

    def sample(lg):
        # The argmax over the ids that may be emitted (a view of the first `limit`): the same id
        # as over the capped, -inf-biased float32 logits, in one kernel rather than three.
        best = mx.argmax(lg[..., :limit], axis=-1)
        logprobs = model.log_probs(lg, limit, bias)
        if lazy:
            return best, logprobs
        tok = sampler(logprobs)
        # Extreme temperatures (1/T overflowing) can make a sampler pick a masked id; never emit one.
        return mx.where(tok < limit, tok, best), logprobs

    def start(step):  # what is evaluated ahead: the token only, when the logprobs stay lazy
        mx.async_eval(step[0]) if lazy else mx.async_eval(*step)

    tokens, logprobs = sample(logits)
    start((tokens, logprobs))
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            # Queue the next step before handing this token out (overlaps host and device).
            if valid is not None:
                valid = mx.concatenate([valid, mx.ones((B, 1), dtype=mx.bool_)], axis=1)
            nxt_logits = model.step(tokens[:, None], valid, offset, cache, capped=False)[:, -1]
            offset = offset + 1
            nxt = sample(nxt_logits)
            start(nxt)
        yield tokens, logprobs
        if n + 1 < max_tokens:
            tokens, logprobs = nxt


def until_eos(steps: Iterable[tuple[mx.array, mx.array]], eos_id: int) -> Iterator[list[int | None]]:
    """The one eos loop: for each generated position, every row's new token, or None for a row
    that has finished (its eos is never yielded). Ends when every row has emitted eos or the
    steps run out; a row then ended by eos exactly when it has fewer than max_tokens tokens."""
    done: list[bool] | None = None
    for tokens, _ in steps:
        row = tokens.tolist()
        done = done or [False] * len(row)
        out: list[int | None] = []
        for b, t in enumerate(row):
            done[b] = done[b] or t == eos_id
            out.append(None if done[b] else t)
        yield out
        if all(done):
            return


class Detokenizer:
    """Streaming detokenizer: token ids in, text pieces out, with "".join(pieces) ==
    tokenizer.decode(all ids).

    Each step decodes the whole sequence so far (cheap at these lengths, and immune to
    SentencePiece's context-dependent joins) and emits what is new, except a trailing U+FFFD:
    byte-fallback tokens of a multi-byte character decode to replacement characters until the
    character is complete, so they are held back. `finalize()` emits whatever is left, even a
    dangling byte. (mlx-lm's streaming detokenizers need its transformers-based tokenizer
    wrapper; this one needs only `decode`.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # what has been emitted so far

    def add_token(self, token: int) -> str:
        self.tokens.append(int(token))
        stable = self.tokenizer.decode(self.tokens).rstrip("\ufffd")
        if not stable.startswith(self.text):
            return ""  # an earlier piece re-joined differently: wait for finalize() to settle
        piece, self.text = stable[len(self.text):], stable
        return piece

    def finalize(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.text):
            return ""  # cannot happen with SentencePiece decoding; see tests/runtime/test_generate.py
        piece, self.text = text[len(self.text):], text
        return piece


@dataclass
class GenerationResult:
    """What one (image, prompt) generation produced. `text` excludes eos."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos), "length" (max_tokens) or "cancelled" (pg.cancel())
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    vision_seconds: float = 0.0
    peak_memory_gb: float = 0.0

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
        }


@dataclass
class Chunk:
    """One streamed piece: new text (possibly empty), the token that produced it, and on the
    last chunk (token None) the whole result."""

    text: str
    token: int | None
    result: GenerationResult | None = None


def _rows(model, tokenizer, input_ids, image_features, valid, sampling, max_tokens):
    """Layer 2's shared start: checks, the seed, and the eos-stopped steps."""
    max_tokens = check_max_tokens(max_tokens)
    sampling = sampling or GREEDY
    if sampling.seed is not None:
        mx.random.seed(int(sampling.seed))
    steps = generate_step(model, input_ids, image_features, valid=valid,
                          sampler=sampling.sampler(model.config.real_vocab_size), max_tokens=max_tokens)
    return until_eos(steps, tokenizer.eos_id)


def stream_generate(model: PaliGemmaModel, tokenizer, input_ids: mx.array, image_features: mx.array, *,
                    valid: mx.array | None = None, sampling: Sampling | None = None, max_tokens: int = 256,
                    vision_seconds: float = 0.0, should_stop: Callable[[], bool] | None = None
                    ) -> Iterator[Chunk]:
    """One prompt (input_ids int[1, T], image_features float[1, N, D]): yield text pieces as
    tokens arrive; the last chunk carries the GenerationResult (timings from the call, plus
    `vision_seconds` spent before it; peak memory since the caller's mx.reset_peak_memory)."""
    t1 = time.perf_counter()
    detok = Detokenizer(tokenizer)
    tokens: list[int] = []
    t2, cancelled, ended = None, False, False
    for (t,) in _rows(model, tokenizer, input_ids, image_features, valid, sampling, max_tokens):
        t2 = t2 or time.perf_counter()
        if should_stop is not None and should_stop():
            cancelled = True
            break
        if t is None:
            ended = True  # eos
            break
        tokens.append(t)
        piece = detok.add_token(t)
        if piece:
            yield Chunk(piece, t)
    t3 = time.perf_counter()
    tail = detok.finalize()
    result = _results([detok.text], [tokens], input_ids, valid, [ended], cancelled, (t1, t2, t3), vision_seconds)[0]
    yield Chunk(tail, None, result)


def _results(texts: list[str], rows: list[list[int]], input_ids: mx.array, valid: mx.array | None,
             ended: list[bool], cancelled: bool, times: tuple, vision_seconds: float) -> list[GenerationResult]:
    """One GenerationResult per row. times: (start, first token or None, end) from
    time.perf_counter(); ended[b]: row b emitted eos. A row that did not end was cancelled
    (when the caller stopped the generation) or ran out of max_tokens."""
    t1, t2, t3 = times
    lengths = [input_ids.shape[1]] * len(rows) if valid is None else valid.astype(mx.int32).sum(axis=1).tolist()
    return [
        GenerationResult(
            text=text, tokens=r, prompt_tokens=int(n),
            finish_reason="stop" if end else "cancelled" if cancelled else "length",
            vision_seconds=vision_seconds,
            prompt_seconds=(t2 or t3) - t1, generation_seconds=t3 - (t2 or t3),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        for text, r, n, end in zip(texts, rows, lengths, ended)
    ]


def generate(model: PaliGemmaModel, tokenizer, input_ids: mx.array, image_features: mx.array,
             **kwargs) -> GenerationResult:
    """`stream_generate` run to the end: the GenerationResult."""
    for chunk in stream_generate(model, tokenizer, input_ids, image_features, **kwargs):
        if chunk.result is not None:
            return chunk.result
    raise AssertionError("stream_generate ended without a result")


def generate_batch(model: PaliGemmaModel, tokenizer, input_ids: mx.array, image_features: mx.array, *,
                   valid: mx.array | None = None, sampling: Sampling | None = None, max_tokens: int = 256,
                   vision_seconds: float = 0.0, should_stop: Callable[[], bool] | None = None
                   ) -> list[GenerationResult]:
    """Several left-padded prompts at once (input_ids int[B, T], valid bool[B, T] or None,
    image_features float[B, N, D]); greedy results equal running each prompt alone."""
    t1 = time.perf_counter()
    B = input_ids.shape[0]
    rows: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B  # the row emitted eos
    t2, cancelled = None, False
    for new in _rows(model, tokenizer, input_ids, image_features, valid, sampling, max_tokens):
        t2 = t2 or time.perf_counter()
        if should_stop is not None and should_stop():
            cancelled = True
            break
        for b, t in enumerate(new):
            if t is None:
                ended[b] = True
            else:
                rows[b].append(t)
    t3 = time.perf_counter()
    return _results([tokenizer.decode(r) for r in rows], rows, input_ids, valid, ended, cancelled,
                    (t1, t2, t3), vision_seconds)


__all__ = ["Sampling", "GREEDY", "generate_step", "until_eos", "Detokenizer", "GenerationResult", "Chunk",
           "stream_generate", "generate", "generate_batch", "vocab_mask"]
