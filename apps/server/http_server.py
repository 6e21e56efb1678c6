"""The HTTP side of `pg-edge serve`: the standard library's ThreadingHTTPServer, as mlx-lm's server.

Routes:
    GET  /health                  {"status": "ok", "model", "busy", "waiting", "rejected"} (no key needed)
    GET  /v1/models               the one model this server runs
    POST /v1/chat/completions     OpenAI chat format (apps/server/openai_format.py); stream: true = SSE
    POST /v1/detect, /v1/segment  {"image": data URL, "objects": "cat ; dog", ...} -> the JSON of
                                  `pg-edge detect/segment --json` (pg_edge.model_tasks.to_json)

Each connection gets a thread (up to max_connections, then 503); the model runs one generation at a time behind a Gate (a
bounded line; a full line answers 503 + Retry-After). Between tokens the handler checks whether
its client hung up and, if so, cancels the generation, so the next request starts within a token
or two. Every failure is answered in OpenAI's error shape and the server keeps serving.

Why not an ASGI framework: the model serialises the work anyway, so async buys nothing here,
and the standard library keeps the runtime's dependency list as it is.
"""
from __future__ import annotations

import collections
import hmac
import json
import select
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from pg_edge.errors import PgEdgeError

from .gate import ClientGone, Gate, busy
from .images import ImagePolicy, fetch_image
from .openai_format import (ApiError, StopMatcher, bad, chunk, completion, finish_reason,
                            generation_settings, models_list, new_id, parse_chat, usage)

DRAIN_LIMIT = 8 * 2**20  # an oversized body up to this much more is read away so the 413 arrives


class PgEdgeServer(ThreadingHTTPServer):
    """A loaded PaliGemma behind HTTP. `history` keeps the last generations (finish reason,
    start and end on time.monotonic()) for /health and the tests."""

    daemon_threads = True
    block_on_close = False  # closing does not wait for idle keep-alive connections
    allow_reuse_address = True
    # listen() backlog: socketserver's default of 5 drops a burst of simultaneous connects (16
    # clients at once in tests/test_server_load.py); the Gate, not the backlog, bounds the work.
    request_queue_size = 128

    def __init__(self, pg, address: tuple[str, int], *, model_id: str, api_key: str | None = None,
                 max_body_bytes: int = 20 * 2**20, max_tokens: int = 512, queue_size: int = 8,
                 queue_timeout: float = 120.0, image_policy: ImagePolicy | None = None,
                 vae=None, verbose: bool = False, max_connections: int = 64):
        self.pg, self.model_id, self.api_key, self.vae = pg, model_id, api_key, vae
        self.max_body_bytes, self.max_tokens, self.verbose = max_body_bytes, max_tokens, verbose
        self.image_policy = image_policy or ImagePolicy(max_bytes=max_body_bytes)
        self.gate = Gate(queue_size, queue_timeout)
        self.history: collections.deque = collections.deque(maxlen=64)
        self.created = int(time.time())
        self._decoder, self._vae_lock = None, threading.Lock()
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        """A thread per connection, up to max_connections; past that a 503 at once."""
        if self._connections.acquire(blocking=False):
            super().process_request(request, client_address)
            return
        body = json.dumps(busy("too many open connections; retry later").body()).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                            b"Content-Type: application/json\r\nConnection: close\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def mask_decoder(self):
        """The VAE for /v1/segment, loaded on first use (PgEdgeError when there is none)."""
        from pg_edge.model_tasks import find_vae

        with self._vae_lock:
            if self._decoder is None:
                self._decoder = find_vae(self.pg, self.vae)
            return self._decoder

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; event streams close at the end
    server_version = "pg-edge"
    timeout = 60  # seconds an idle connection (and its thread) is kept
    server: PgEdgeServer

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # -- plumbing ------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._streaming = False
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            route = ROUTES.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="unknown_url")
            if method != route[0]:
                raise ApiError(405, f"{path} takes {route[0]}, not {method}", code="method_not_allowed",
                               headers={"Allow": route[0]})
            if path != "/health":
                self._check_key()
            route[1](self)
        except ClientGone:
            self.close_connection = True
        except ApiError as err:
            self._send_error(err)
        except PgEdgeError as err:  # the runtime's "bad input" (a prompt, an image, a setting)
            self._send_error(bad(str(err)))
        except Exception as err:  # a bug: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            self._send_error(ApiError(500, f"internal error: {type(err).__name__}: {err}",
                                      type="server_error", code="internal_error"))

    def _check_key(self) -> None:
        key = self.server.api_key
        if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                           f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length", code="length_required")
        try:
            n = int(self.headers.get("Content-Length", ""))
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "a POST needs a valid Content-Length header", code="length_required") from None
        limit = self.server.max_body_bytes
        if n > limit:
            self.close_connection = True
            if n <= limit + DRAIN_LIMIT:
                self.rfile.read(n)
            raise ApiError(413, f"the request body is {n} bytes; this server takes at most {limit} "
                           "(pg-edge serve --max-body-mb)", code="request_too_large")
        raw = self.rfile.read(n)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":  # also keeps web pages from posting "simple" requests
            raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got {ctype or 'none'!r}",
                           code="unsupported_media_type")
        try:
            return json.loads(raw)
        except RecursionError:
            raise bad("the request body's JSON is nested too deeply", code="invalid_json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"the request body is not valid JSON: {err}", code="invalid_json") from None

    def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_error(self, err: ApiError) -> None:
        if self._streaming:  # headers went out already: end the stream with the error
            try:
                self._event(err.body())
            except ClientGone:
                pass
            self.close_connection = True
            return
        self._send_json(err.status, err.body(), err.headers)

    def gone(self) -> bool:
        """Has the client closed its connection? (A readable socket with nothing to read.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except OSError:
            raise ClientGone() from None

    @contextmanager
    def _generation(self):
        """Hold the model (or answer 503) and record the generation in the history."""
        with self.server.gate.slot(gone=self.gone):
            entry = {"path": self.path, "start": time.monotonic(), "finish": "client_gone"}
            try:
                yield entry
            finally:
                entry["end"] = time.monotonic()
                self.server.history.append(entry)

    # -- endpoints -----------------------------------------------------------------------
    def health(self) -> None:
        gate = self.server.gate
        self._send_json(200, {"status": "ok", "model": self.server.model_id, "busy": gate.running,
                              "waiting": gate.waiting, "rejected": gate.rejected})

    def models(self) -> None:
        self._send_json(200, models_list(self.server.model_id, self.server.created))

    def chat(self) -> None:
        srv = self.server
        req = parse_chat(self._body(), srv.model_id, srv.max_tokens)
        image = fetch_image(req.image_url, srv.image_policy, "image_url")
        cid = new_id()
        pieces: list[str] = []

        def start_stream():  # at the first piece: an error before it still gets a status code
            if not self._streaming:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = self._streaming = True
                self._event(chunk(cid, srv.model_id, {"role": "assistant", "content": ""}))

        def emit(text: str) -> None:
            if req.stream:
                start_stream()
                self._event(chunk(cid, srv.model_id, {"content": text}))
            else:
                pieces.append(text)

        with self._generation() as entry:
            result, stopped = self._run(req, image, emit, entry)
        # The model is free and the history written before the last bytes go out: a client that
        # has its answer finds its generation recorded, and the next request need not wait on I/O.
        finish = finish_reason(result.finish_reason, stopped)
        use = usage(result.prompt_tokens, len(result.tokens))
        if req.stream:
            start_stream()
            self._event(chunk(cid, srv.model_id, {}, finish))
            if req.include_usage:
                self._event(chunk(cid, srv.model_id, None, use=use))
            self._event("[DONE]")
        else:
            self._send_json(200, completion(cid, srv.model_id, "".join(pieces), finish, use))

    def _run(self, req, image, emit, entry):
        """Generate, sending text through emit() with stop strings cut; -> (result, stopped)."""
        matcher = StopMatcher(req.stop)
        stream = self.server.pg.stream(image, req.prompt, **req.gen)
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
                    elif self.gone():
                        raise ClientGone()
        finally:
            stream.close()
        entry["finish"], entry["tokens"] = result.finish_reason, len(result.tokens)
        return result, matcher.hit

    def detect(self) -> None:
        self._vision_task("detect")

    def segment(self) -> None:
        self._vision_task("segment")

    def _vision_task(self, task: str) -> None:
        from pg_edge.model_tasks import to_json

        srv = self.server
        body = self._body()
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        if body.get("model") not in (None, srv.model_id):
            raise ApiError(404, f"the model '{body['model']}' does not exist; this server runs "
                           f"'{srv.model_id}'", param="model", code="model_not_found")
        objects = body.get("objects")
        if not (isinstance(objects, str) or isinstance(objects, list)
                and all(isinstance(o, str) for o in objects)):
            raise bad("'objects' must be a string like \"cat ; dog\" or a list of names", "objects")
        image = fetch_image(body.get("image"), srv.image_policy, "image")
        gen = generation_settings(body, srv.max_tokens)
        decoder = srv.mask_decoder() if task == "segment" else None  # a missing VAE fails fast
        with self._generation() as entry, self._cancel_on_hangup():
            if task == "detect":
                result = srv.pg.detect(image, objects, **gen)
            else:
                result = srv.pg.segment(image, objects, vae=decoder, **gen)
            entry["finish"] = result.generation.finish_reason
        if entry["finish"] == "cancelled":
            raise ClientGone()
        self._send_json(200, to_json(result))

    @contextmanager
    def _cancel_on_hangup(self):
        """While a blocking task call runs: poll the client and cancel the generation if it left."""
        done = threading.Event()

        def watch():
            while not done.wait(0.05):
                if self.gone():
                    self.server.pg.cancel()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()


ROUTES = {
    "/health": ("GET", Handler.health),
    "/v1/models": ("GET", Handler.models),
    "/v1/chat/completions": ("POST", Handler.chat),
    "/v1/detect": ("POST", Handler.detect),
    "/v1/segment": ("POST", Handler.segment),
}
