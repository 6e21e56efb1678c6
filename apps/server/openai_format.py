"""OpenAI chat-completions requests in, responses out: validation, stop strings, JSON shapes.

A request becomes one PaliGemma call. PaliGemma is single-turn and needs one image, so:
the prompt is the text of the LAST user message (its text parts joined by spaces, e.g.
"caption en" or "answer en what is on the table?"); the image is the last `image_url` part in
the conversation (an app that attaches the image to its first message can ask follow-ups);
earlier text turns are not shown to the model. `system` messages are accepted and ignored.

Every mistake raises `ApiError` with the HTTP status and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answer: status, OpenAI's error body, optional extra headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A validated chat request. image_url: the URL string of the image part (data:, http(s):
    or a path; apps/server/images.py decides what is allowed). gen: PaliGemma generation
    keyword arguments (max_tokens, temperature, top_p, seed)."""

    model: str
    prompt: str
    image_url: str
    stream: bool
    include_usage: bool
    stop: list[str]
    gen: dict = field(default_factory=dict)


def number(body: dict, name: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
    """body[name] checked as a JSON number (an integer if `integer`) within [lo, hi]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise bad(f"'{name}' must be a number, got {value!r}", name)
    if integer and int(value) != value:
        raise bad(f"'{name}' must be an integer, got {value!r}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value!r}", name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be <= {hi}, got {value!r}", name)
    return int(value) if integer else float(value)


def generation_settings(body: dict, max_tokens_limit: int) -> dict:
    """max_tokens / max_completion_tokens, temperature (default 0: greedy), top_p, seed."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, name, min(256, max_tokens_limit), lo=1, integer=True)
    if max_tokens > max_tokens_limit:
        raise bad(f"'{name}' must be <= {max_tokens_limit} on this server (pg-edge serve "
                  f"--max-tokens), got {max_tokens}", name)
    gen = {"max_tokens": max_tokens,
           "temperature": number(body, "temperature", 0.0, lo=0, hi=2),
           "top_p": number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)}
    seed = number(body, "seed", None, integer=True)
    if seed is not None:
        gen["seed"] = seed % 2**32
    return gen


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _parts(message: dict, i: int) -> list[dict]:
    """A message's content as a list of parts {"type": "text"|"image_url", ...}."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None and message.get("role") == "assistant":
        return []
    if not isinstance(content, list):
        raise bad(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise bad(f"{where} must be a part of type 'text' or 'image_url'", where)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise bad(f"{where}.text must be a string", where)
        if part["type"] == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise bad(f"{where}.image_url.url must be a string", where)
    return content


def _url(part: dict) -> str:
    url = part["image_url"]
    return url["url"] if isinstance(url, dict) else url


def parse_chat(body, model_id: str, max_tokens_limit: int) -> ChatRequest:
    """Validate a /v1/chat/completions body; raise ApiError (400/404) naming the field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server runs '{model_id}'",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if number(body, "n", 1, integer=True) != 1:
        raise bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options")

    image_url, last_user = None, None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}", f"messages[{i}]")
        parts = _parts(message, i)
        images = [p for p in parts if p["type"] == "image_url"]
        if message["role"] == "user":
            last_user = (i, parts)
            if len(images) > 1:
                raise bad(f"messages[{i}] has {len(images)} images; PaliGemma takes one per request",
                          f"messages[{i}].content")
        if images:
            image_url = _url(images[-1])
    if last_user is None:
        raise bad("'messages' needs a user message", "messages")
    prompt = " ".join(p["text"].strip() for p in last_user[1] if p["type"] == "text").strip()
    if not prompt:
        raise bad(f"messages[{last_user[0]}] has no text: PaliGemma needs a prompt such as "
                  "'caption en'", f"messages[{last_user[0]}].content")
    if image_url is None:
        raise bad("no image in the messages: PaliGemma needs one image_url part", "messages")
    return ChatRequest(model_id, prompt, image_url, stream, include_usage,
                       _stops(body), generation_settings(body, max_tokens_limit))


class StopMatcher:
    """Cuts generated text at the first stop string. feed(piece) returns the text safe to send
    now, holding back a tail that could be the start of a stop string; `hit` is set once one
    matched (everything after it is dropped); flush() returns the held-back tail at the end."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[:min(found)], "", True
            return out
        keep = 0
        for s in self.stops:
            keep = max(keep, next((k for k in range(min(len(s) - 1, len(self.buf)), 0, -1)
                                   if self.buf.endswith(s[:k])), 0))
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


def finish_reason(generation_finish: str, stopped: bool) -> str:
    """OpenAI's finish_reason: "length" at max_tokens, else "stop" (eos or a stop string).
    (A generation cancelled on the server never gets here: apps/server/endpoints.py answers
    an error for it instead.)"""
    return "stop" if stopped or generation_finish != "length" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish: str, use: dict) -> dict:
    """The non-streamed answer (object "chat.completion")."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use, "system_fingerprint": None}


def chunk(cid: str, model: str, delta: dict | None, finish: str | None = None,
          use: dict | None = None) -> dict:
    """One streamed event (object "chat.completion.chunk"); delta None = the usage-only chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": choices, "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    return out


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "pg_edge"}]}
