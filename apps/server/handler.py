"""One connection of `pg-edge serve`: read requests strictly, check them, answer in OpenAI's JSON.

The request cycle (handle_one_request):
1. wait for the next request's first byte, at most `idle_timeout` (then close quietly);
2. read its head (apps/server/wire.py) and, later, its body, all within `request_timeout` of
   that first byte: a client that dribbles gets 408 and the connection is closed;
3. the framing is checked (strict Content-Length, no Transfer-Encoding), then Host and Origin
   (apps/server/hosts.py), the route, the API key; the endpoint (apps/server/endpoints.py) runs;
4. every answer is JSON, errors in OpenAI's shape, the HTTP layer's own (400, 408, 411, 413,
   414, 431, 505) included. An answer given while part of the request is unread (a 401 or 404
   before the body, a malformed head) closes the connection after it, reading away what the
   client still sends (up to DRAIN_LIMIT bytes, LINGER_S seconds) so the client sees the
   answer rather than a reset: what follows is never parsed as another request.

Hang-ups: `gone()` tells whether the client went away. A socket that reads as ended may also be
a client that only shut its sending side after the request (and still waits for the answer),
so the first time, a probe is written: `HTTP/1.1 100 Continue` before the answer (HTTP/1.1
lets a server send it unasked); a client that has really closed answers it with a reset, after
which the socket has no peer (getpeername fails) at the next check. Once the answer's headers
are out, the next write tells. HTTP/1.0 clients get no probe: their ended input counts as a
hang-up.
"""
from __future__ import annotations

import hmac
import io
import json
import select
import socket
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from pg_edge.errors import PgEdgeError

from .gate import ClientGone, busy, shutting_down
from .openai_format import ApiError, bad
from .wire import DeadlineReader, RequestTimeout, WireError, body_length, printable, read_head

DRAIN_LIMIT = 8 * 2**20  # bytes read away after an answer that leaves part of a request unread
LINGER_S = 2.0  # and for at most this long


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; event streams close at the end
    server_version = "pg-edge"
    timeout = None  # the DeadlineReader times every read instead

    # -- the request cycle ---------------------------------------------------------------
    def setup(self):
        super().setup()
        self.rfile.close()  # the plain file socketserver made: reads go through the deadline
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, 2**16)
        self.conn = self.server.connection_of(self.request)
        self._linger = False

    def handle(self):
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self):
        srv = self.server
        self.streaming, self._body_left, self._probed, self._gone = False, 0, False, False
        self.command, self.path, self.request_version, self.requestline = "", "", "HTTP/1.1", ""
        try:  # the next request's first byte, or the end of an idle connection
            self.reader.deadline = time.monotonic() + srv.idle_timeout
            started = self.rfile.peek(1)
        except (RequestTimeout, OSError, ValueError):
            started = b""
        if not started:
            self.close_connection = True
            return
        try:
            self.reader.deadline = time.monotonic() + srv.request_timeout
            head = read_head(self.rfile)
        except RequestTimeout:
            self._refuse(ApiError(408, f"the request head did not arrive within {srv.request_timeout:g} s",
                                  code="request_timeout"))
            return
        except WireError as err:
            self._refuse(self._closing_reason() or ApiError(err.status, err.message, code=err.code))
            return
        except (OSError, ValueError):
            self.close_connection = True
            return
        if head is None:
            self.close_connection = True
            return
        self.command, self.path, self.request_version = head.method, head.target, head.version
        self.requestline, self.headers = head.raw_line, head.headers
        if not srv.enter_request(self.conn):  # evicted for a newer connection, or shutting down
            self._refuse(self._closing_reason() or busy("too many open connections; retry later"))
            return
        try:
            self._dispatch()
        finally:
            srv.leave_request(self.conn)

    def _hold(self) -> None:
        """The request is all in: from now on its connection is not closed to make room."""
        if not self.server.hold(self.conn):
            self.close_connection = True
            raise self._closing_reason() or busy("too many open connections; retry later")

    def _closing_reason(self) -> ApiError | None:
        if self.server.stopping.is_set():
            return shutting_down()
        if self.conn.evicted:
            return busy("too many open connections; this one was closed for a newer one")
        return None

    def _refuse(self, err: ApiError) -> None:
        """Answer an error and close: what the client sends next is not read as a request."""
        self.close_connection = self._linger = True
        self._send_error(err)

    def _dispatch(self) -> None:
        srv = self.server
        try:
            connection = self.headers.get("Connection", "").lower()
            if "close" in connection or (self.request_version == "HTTP/1.0" and "keep-alive" not in connection):
                self.close_connection = True
            self._body_left = body_length(self.headers) or 0
            if srv.stopping.is_set():
                raise shutting_down()
            srv.hosts.check(self.headers)
            path = urlsplit(self.path).path.rstrip("/") or "/"
            route = srv.routes.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint: {self.command} {printable(path)}", code="unknown_url")
            if self.command != route[0]:
                raise ApiError(405, f"{path} takes {route[0]}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": route[0]})
            if path != "/health":
                self._check_key()
            if route[0] == "GET":  # the whole request is in (a body, if any, is left unread)
                self._hold()
            route[1](self)
        except (ClientGone, ConnectionError, TimeoutError):  # hung up, or stopped reading its answer
            self.close_connection = True
        except WireError as err:
            self._refuse(ApiError(err.status, err.message, code=err.code))
        except RequestTimeout:
            self._refuse(ApiError(408, f"the request body did not arrive within {srv.request_timeout:g} s",
                                  code="request_timeout"))
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
        if not key:
            return
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        # header values are latin-1 text of the bytes sent; the key is UTF-8 on the wire
        sent = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def read_json(self):
        """The request body as JSON (a POST needs Content-Length and Content-Type: application/json)."""
        if self.headers.get("Content-Length") is None:
            raise ApiError(411, "a POST needs a Content-Length header", code="length_required")
        n, limit = self._body_left, self.server.max_body_bytes
        if n > limit:
            raise ApiError(413, f"the request body is {n} bytes; this server takes at most {limit} "
                           "(pg-edge serve --max-body-mb)", code="request_too_large")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":  # also keeps web pages from posting "simple" requests
            raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got "
                           f"{printable(ctype) or 'none'!r}", code="unsupported_media_type")
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = self.rfile.read(n)
        if len(raw) < n:
            self._body_left = n - len(raw)
            raise self._closing_reason() or ApiError(400, f"the request body ended after {len(raw)} of {n} bytes",
                                                     code="incomplete_request")
        self._body_left = 0
        self._hold()
        try:
            return json.loads(raw)
        except RecursionError:
            raise bad("the request body's JSON is nested too deeply", code="invalid_json") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers past 4300 digits
            why = "a number in it has too many digits" if "digits" in str(err) else str(err)
            raise bad(f"the request body is not valid JSON: {why}", code="invalid_json") from None

    # -- answers -------------------------------------------------------------------------
    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        if self._body_left:  # part of the request is unread: this connection ends here
            self.close_connection = self._linger = True
        try:
            self.connection.settimeout(self.server.write_timeout)
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_error(self, err: ApiError) -> None:
        if self.streaming:  # headers went out already: end the stream with the error
            try:
                self.event(err.body())
            except ClientGone:
                pass
            self.close_connection = True
            return
        self.send_json(err.status, err.body(), err.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors, in OpenAI's JSON too."""
        self.close_connection = True
        self.send_json(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())

    def start_stream(self) -> None:
        """The headers of an event stream (200, text/event-stream, closed at the end)."""
        try:
            self.connection.settimeout(self.server.write_timeout)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
        except OSError:
            self._gone = True
            raise ClientGone() from None
        self.close_connection = self.streaming = True

    def event(self, obj) -> None:
        """One server-sent event `data: ...` (ClientGone when the client cannot take it)."""
        data = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
        except OSError:
            self._gone = True
            raise ClientGone() from None

    def gone(self) -> bool:
        """Has the client gone away? (See the module docstring: a probe tells a half-closed
        client, which still waits, from a closed one.)"""
        if self._gone:
            return True
        try:
            self.connection.getpeername()  # fails (ENOTCONN) once the connection was reset
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable or self.connection.recv(1, socket.MSG_PEEK):
                return False  # nothing, or the client's next request: it is there
            if self.request_version != "HTTP/1.1":
                self._gone = True
            elif not self._probed and not self.streaming:
                self._probed = True
                self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except (OSError, ValueError):  # reset (the probe's answer), or closed here
            self._gone = True
        return self._gone

    # -- the end of a connection ---------------------------------------------------------
    def finish(self):
        if self._linger:
            try:  # our answer is complete (FIN after it); read away what the client still sends
                self.connection.shutdown(socket.SHUT_WR)
                self.reader.deadline = time.monotonic() + LINGER_S
                left = DRAIN_LIMIT
                while left > 0:
                    data = self.rfile.read1(min(2**16, left))
                    if not data:
                        break
                    left -= len(data)
            except (OSError, ValueError, RequestTimeout):
                pass
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        if self.server.verbose:
            sys.stderr.write(printable(f"{self.address_string()} - {format % args}") + "\n")

