"""Checks on user text and generation settings, made before any model compute.

- `check_text`: a prompt must be a `str` of valid Unicode. Python turns undecodable bytes on
  the command line (invalid UTF-8) into lone surrogates, which neither tokenizer can encode:
  they are refused with the position of the first one. Control characters (NUL, BEL, ESC...)
  are ordinary text: both tokenizers encode them as byte tokens, and nothing else reads them.
- `check_context`: prompt tokens (image tokens included) plus `max_tokens` must fit the
  model's context (`text_config.max_position_embeddings`, 8192 for every PaliGemma); longer
  prompts are refused with the numbers, before the vision tower or the decoder runs.
- `check_sampling`: max_tokens, temperature, top_p, top_k and seed are numbers of the right
  kind and range (MLX seeds are unsigned 64-bit; an infinite temperature would sample masked
  ids). A top_k at least the vocabulary size means no filtering (generate.Sampling.sampler).
"""
from __future__ import annotations

import math
import operator

from ..errors import PgEdgeError

DEFAULT_CONTEXT = 8192  # max_position_embeddings of every PaliGemma 1 and 2 checkpoint


def check_text(text, what: str = "prompt") -> str:
    """`text` itself, if it is a str of valid Unicode; PgEdgeError saying what is wrong."""
    if not isinstance(text, str):
        raise PgEdgeError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise PgEdgeError(f"{what} is not valid UTF-8 text{byte} at character {err.start}; "
                          "pass UTF-8 encoded text") from None
    return text


def context_length(config) -> int:
    """The decoder's context in tokens, from config.json (text_config.max_position_embeddings)."""
    t = config.raw.get("text_config") or {}
    return int(t.get("max_position_embeddings") or DEFAULT_CONTEXT)


def check_context(prompt_tokens: int, max_tokens: int, context: int, num_image_tokens: int = 0) -> None:
    """Refuse a prompt that, with `max_tokens` to generate, does not fit `context` tokens."""
    if prompt_tokens + max_tokens <= context:
        return
    image = f" ({num_image_tokens} of them image tokens)" if num_image_tokens else ""
    if prompt_tokens >= context:
        raise PgEdgeError(f"the prompt is {prompt_tokens} tokens{image}, past the model's context of "
                          f"{context} tokens; shorten the prompt")
    raise PgEdgeError(f"the prompt is {prompt_tokens} tokens{image} and max_tokens is {max_tokens}: "
                      f"{prompt_tokens + max_tokens} is past the model's context of {context} tokens; "
                      f"lower max_tokens to at most {context - prompt_tokens} or shorten the prompt")


def check_max_tokens(n) -> int:
    try:
        value = operator.index(n)
    except TypeError:
        value = 0
    if isinstance(n, bool) or value < 1:
        raise PgEdgeError(f"max_tokens must be an integer >= 1, got {n!r}")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    try:
        value = operator.index(seed)  # int or NumPy integer; not a float or bool-like string
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not 0 <= value < 2**64:
        raise PgEdgeError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return value


def _number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise PgEdgeError(f"{name} must be a finite number, got {x!r}")
    return x


def check_sampling(temperature, top_p, top_k, seed) -> None:
    """Raise PgEdgeError naming the first sampling setting of the wrong kind or range."""
    temperature, top_p = _number(temperature, "temperature"), _number(top_p, "top_p")
    if temperature < 0:
        raise PgEdgeError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise PgEdgeError(f"top_p must be in (0, 1], got {top_p}")
    try:
        k = operator.index(top_k)
    except TypeError:
        k = -1
    if isinstance(top_k, bool) or k < 0:
        raise PgEdgeError(f"top_k must be a non-negative integer, got {top_k!r}")
    check_seed(seed)
