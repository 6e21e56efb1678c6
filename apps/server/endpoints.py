"""The endpoints of `pg-edge serve`, each a function of the connection's Handler.

    GET  /health                  {"status": "ok", "model", "busy", "waiting", "rejected", "pixels_held"}
    GET  /v1/models               the served base model, then every adapter loaded on it
    POST /v1/chat/completions     OpenAI chat format (apps/server/openai_format.py); stream: true = SSE
    POST /v1/detect, /v1/segment  {"image": data URL, "objects": "cat ; dog", ...} -> the JSON of
                                  `pg-edge detect/segment --json` (pg_edge.tasks.calls.to_json)

A request's `model` picks the base (the served name, or none given) or an adapter by its name
(`pg-edge serve --adapter NAME=DIR`); another name is a 404 in OpenAI's error format. Up to
`--max-batch` requests generate at once, in one batch (pg_edge/batching.py), each with its own
adapter; one client hanging up cancels its own row only.

A chat request is announced to the model as soon as its body is read (`pg.announce()`: an
idle batch waits briefly for requests arriving together, so they share one prefill). A
request's image is fetched and its header read in the connection's thread (a bad one is a
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
                            generation_settings, models_list, new_id, parse_chat, pick_model, usage)


def health(h) -> None:
    gate = h.server.gate
    h.send_json(200, {"status": "ok", "model": h.server.model_id, "busy": gate.running > 0,
                       "running": gate.running, "waiting": gate.waiting, "rejected": gate.rejected, "pixels_held": gate.pixels_held})


def models(h) -> None:
    h.send_json(200, models_list(h.server.model_id, h.server.created, h.server.pg.adapters))


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
    req = parse_chat(h.read_json(), srv.model_id, srv.max_tokens, srv.pg.adapters)
    cid = new_id()
    pieces: list[str] = []

    def start_stream():  # at the first piece: an error before it still gets a status code
        if not h.streaming:
            h.start_stream()
            h.event(chunk(cid, req.model, {"role": "assistant", "content": ""}))

    def emit(text: str) -> None:
        if req.stream:
            start_stream()
            h.event(chunk(cid, req.model, {"content": text}))
        else:
            pieces.append(text)

    # Announced as soon as it is read: its image is fetched and decoded below, and a batch
    # starting meanwhile waits briefly so that requests arriving together share one prefill.
    with srv.pg.announce() as arrival, generation(h, req.image_url, "image_url") as (image, entry):
        result, stopped = _run(h, req, image, emit, entry, arrival)
    # The model is free and the history written before the last bytes go out: a client that
    # has its answer finds its generation recorded, and the next request need not wait on I/O.
    if result.finish_reason == "cancelled" and not stopped:
        raise cut(srv, len(result.tokens))
    finish = finish_reason(result.finish_reason, stopped)
    use = usage(result.prompt_tokens, len(result.tokens))
    if req.stream:
        start_stream()
        h.event(chunk(cid, req.model, {}, finish))
        if req.include_usage:
            h.event(chunk(cid, req.model, None, use=use))
        h.event("[DONE]")
    else:
        h.send_json(200, completion(cid, req.model, "".join(pieces), finish, use))


def _run(h, req, image, emit, entry, arrival=None):
    """Generate, sending text through emit() with stop strings cut; -> (result, stopped)."""
    matcher = StopMatcher(req.stop)
    stream = h.server.pg.stream(image, req.prompt, arrival=arrival, **req.gen)
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
    _, adapter = pick_model(body, srv.model_id, srv.pg.adapters)
    objects = body.get("objects")
    if not (isinstance(objects, str) or isinstance(objects, list)
            and all(isinstance(o, str) for o in objects)):
        raise bad("'objects' must be a string like \"cat ; dog\" or a list of names", "objects")
    gen = generation_settings(body, srv.max_tokens)
    if adapter is not None:
        gen["adapter"] = adapter
    decoder = srv.mask_decoder() if task == "segment" else None  # a missing VAE fails fast
    with generation(h, body.get("image"), "image") as (image, entry), _cancel_on_hangup(h) as watch:
        gen["cancel"] = watch["cancel"]
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
    """While a blocking task call runs: poll the client and, if it left, set the event its
    generation was given (yields a dict: "cancel" that event, "gone" whether the client left).
    Only this request's row stops; the others in the batch go on."""
    done, state = threading.Event(), {"gone": False, "cancel": threading.Event()}

    def watch():
        while not done.wait(0.05):
            if h.gone():
                state["gone"] = True
                state["cancel"].set()
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
