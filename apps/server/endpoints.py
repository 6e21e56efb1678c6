"""The endpoints of `pg-edge serve`, each a function of the connection's Handler.

    GET  /health                  {"status": "ok", "model", "busy", "waiting", "rejected", "pixels_held"}
    GET  /v1/models               the one model this server runs
    POST /v1/chat/completions     OpenAI chat format (apps/server/openai_format.py); stream: true = SSE
    POST /v1/detect, /v1/segment  {"image": data URL, "objects": "cat ; dog", ...} -> the JSON of
                                  `pg-edge detect/segment --json` (pg_edge.tasks.calls.to_json)

A request's image is fetched and its header read in the connection's thread (a bad one is a
400 at once); it is decoded only once the Gate has admitted the request and holds its pixels
(apps/server/gate.py). Between tokens the handler checks whether its client went away and,
if so, cancels the generation, so the next request starts within a token or two. A
generation cut short on the server (shutdown, `pg.cancel()`) is never reported as complete:
a 503 error, or an error event ending the stream instead of `finish_reason` and `[DONE]`.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from .gate import ClientGone, shutting_down
from .images import decode, header_pixels, image_bytes
from .openai_format import (ApiError, StopMatcher, bad, chunk, completion, finish_reason,
                            generation_settings, models_list, new_id, parse_chat, usage)


def health(h) -> None:
    gate = h.server.gate
    h.send_json(200, {"status": "ok", "model": h.server.model_id, "busy": gate.running,
                       "waiting": gate.waiting, "rejected": gate.rejected, "pixels_held": gate.pixels_held})


def models(h) -> None:
    h.send_json(200, models_list(h.server.model_id, h.server.created))


@contextmanager
def generation(h, url, param: str):
    """Admission, the image decoded within the pixel budget, the model held; yields (image,
    history entry) and records the entry."""
    srv = h.server
    data = image_bytes(url, srv.image_policy, param)
    pixels = header_pixels(data, param)
    with srv.gate.slot(gone=h.gone, pixels=pixels, prepare=lambda: decode(data, param)) as image:
        del data
        entry = {"path": h.path, "start": time.monotonic(), "finish": "client_gone"}
        try:
            yield image, entry
        finally:
            entry["end"] = time.monotonic()
            srv.history.append(entry)


def cut(srv, tokens: int) -> ApiError:
    """The error for a generation the server stopped before its end."""
    if srv.stopping.is_set():
        return shutting_down(f"the server is shutting down: the answer was cut after {tokens} tokens")
    return ApiError(503, f"the generation was cancelled on the server after {tokens} tokens",
                    type="server_error", code="generation_cancelled")


def chat(h) -> None:
    srv = h.server
    req = parse_chat(h.read_json(), srv.model_id, srv.max_tokens)
    cid = new_id()
    pieces: list[str] = []

    def start_stream():  # at the first piece: an error before it still gets a status code
        if not h.streaming:
            h.start_stream()
            h.event(chunk(cid, srv.model_id, {"role": "assistant", "content": ""}))

    def emit(text: str) -> None:
        if req.stream:
            start_stream()
            h.event(chunk(cid, srv.model_id, {"content": text}))
        else:
            pieces.append(text)

    with generation(h, req.image_url, "image_url") as (image, entry):
        result, stopped = _run(h, req, image, emit, entry)
    # The model is free and the history written before the last bytes go out: a client that
    # has its answer finds its generation recorded, and the next request need not wait on I/O.
    if result.finish_reason == "cancelled" and not stopped:
        raise cut(srv, len(result.tokens))
    finish = finish_reason(result.finish_reason, stopped)
    use = usage(result.prompt_tokens, len(result.tokens))
    if req.stream:
        start_stream()
        h.event(chunk(cid, srv.model_id, {}, finish))
        if req.include_usage:
            h.event(chunk(cid, srv.model_id, None, use=use))
        h.event("[DONE]")
    else:
        h.send_json(200, completion(cid, srv.model_id, "".join(pieces), finish, use))


def _run(h, req, image, emit, entry):
    """Generate, sending text through emit() with stop strings cut; -> (result, stopped)."""
    matcher = StopMatcher(req.stop)
    stream = h.server.pg.stream(image, req.prompt, **req.gen)
    result = None
    try:
        for piece in stream:
            out = matcher.feed(piece.text)
            if piece.result is not None:
                result, out = piece.result, out + matcher.flush()
            if out:
                emit(out)
            if result is None:
                if matcher.hit:
                    stream.cancel()  # keep reading: the result follows within a token
                elif h.gone():
                    raise ClientGone()
    finally:
        stream.close()
    entry["finish"], entry["tokens"] = result.finish_reason, len(result.tokens)
    return result, matcher.hit


def detect(h) -> None:
    _vision_task(h, "detect")


def segment(h) -> None:
    _vision_task(h, "segment")


def _vision_task(h, task: str) -> None:
    from pg_edge.tasks.calls import to_json

    srv = h.server
    body = h.read_json()
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("model") not in (None, srv.model_id):
        raise ApiError(404, f"the model '{body['model']}' does not exist; this server runs "
                       f"'{srv.model_id}'", param="model", code="model_not_found")
    objects = body.get("objects")
    if not (isinstance(objects, str) or isinstance(objects, list)
            and all(isinstance(o, str) for o in objects)):
        raise bad("'objects' must be a string like \"cat ; dog\" or a list of names", "objects")
    gen = generation_settings(body, srv.max_tokens)
    decoder = srv.mask_decoder() if task == "segment" else None  # a missing VAE fails fast
    with generation(h, body.get("image"), "image") as (image, entry), _cancel_on_hangup(h) as watch:
        if task == "detect":
            result = srv.pg.detect(image, objects, **gen)
        else:
            result = srv.pg.segment(image, objects, vae=decoder, **gen)
        entry["finish"] = result.generation.finish_reason
    if entry["finish"] == "cancelled":
        if watch["gone"]:
            raise ClientGone()
        raise cut(srv, len(result.generation.tokens))
    h.send_json(200, to_json(result))


@contextmanager
def _cancel_on_hangup(h):
    """While a blocking task call runs: poll the client and cancel the generation if it left
    (yields a dict whose "gone" says whether it did)."""
    done, state = threading.Event(), {"gone": False}

    def watch():
        while not done.wait(0.05):
            if h.gone():
                state["gone"] = True
                h.server.pg.cancel()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield state
    finally:
        done.set()
        watcher.join()


ROUTES = {
    "/health": ("GET", health),
    "/v1/models": ("GET", models),
    "/v1/chat/completions": ("POST", chat),
    "/v1/detect": ("POST", detect),
    "/v1/segment": ("POST", segment),
}
