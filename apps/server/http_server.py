"""The server of `pg-edge serve`: the standard library's ThreadingHTTPServer (as mlx-lm's server),
its connections bounded, and a shutdown that answers everyone.

Each connection gets a thread running apps/server/handler.py (the HTTP side) and
apps/server/endpoints.py (the routes); the model runs one generation at a time behind a Gate
(apps/server/gate.py: a bounded line and a budget of decoded pixels).

Connections: at most `max_connections` at once. When a new one arrives and all are taken, the
connection that has waited longest for its next request (an idle keep-alive one) or for the
rest of its request (one still sending its head or body: a slow client) is closed to make room;
only when every connection holds a whole request does the newcomer get 503 + Retry-After. With each request's head and body due within
`request_timeout` of its first byte, slow clients cannot keep the rest (or /health) out.

Shutdown (`stop()`, also run by server_close(); call shutdown() first when serve_forever runs in
another thread): stop accepting, close idle connections, answer every waiting request with 503
"server shutting down", cut the running generation (its client gets that error too, never a
"complete" answer), then wait until every request has been answered.

Why not an ASGI framework: the model serialises the work anyway, so async buys nothing here,
and the standard library keeps the runtime's dependency list as it is.
"""
from __future__ import annotations

import collections
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from .endpoints import ROUTES
from .gate import Gate, busy, shutting_down
from .handler import Handler
from .hosts import HostPolicy
from .images import ImagePolicy

STOP_WAIT_S = 10.0  # how long stop() waits for running requests to be answered


class Connection:
    """One open connection: `busy` from the moment its request has fully arrived (head and
    body) to its answer; `since` when it last became idle or started a request; `evicted` once
    closed to make room (or for shutdown)."""

    __slots__ = ("sock", "busy", "since", "evicted")

    def __init__(self, sock: socket.socket):
        self.sock, self.busy, self.since, self.evicted = sock, False, time.monotonic(), False


class PgEdgeServer(ThreadingHTTPServer):
    """A loaded PaliGemma behind HTTP. `history` keeps the last generations (finish reason,
    start and end on time.monotonic()) for /health and the tests."""

    daemon_threads = True
    block_on_close = False  # stop() waits for the requests; idle connections are closed
    allow_reuse_address = True
    # listen() backlog: socketserver's default of 5 drops a burst of simultaneous connects (16
    # clients at once in tests/server/test_server_load.py); the Gate, not the backlog, bounds the work.
    request_queue_size = 128

    def __init__(self, pg, address: tuple[str, int], *, model_id: str, api_key: str | None = None,
                 max_body_bytes: int = 20 * 2**20, max_tokens: int = 512, queue_size: int = 8,
                 queue_timeout: float = 120.0, image_policy: ImagePolicy | None = None,
                 vae=None, verbose: bool = False, max_connections: int = 64,
                 pixel_budget: int = 100_000_000, allowed_hosts=(), request_timeout: float = 30.0,
                 idle_timeout: float = 30.0, write_timeout: float = 30.0):
        self.pg, self.model_id, self.api_key, self.vae = pg, model_id, api_key, vae
        self.max_body_bytes, self.max_tokens, self.verbose = max_body_bytes, max_tokens, verbose
        self.request_timeout, self.idle_timeout, self.write_timeout = request_timeout, idle_timeout, write_timeout
        self.image_policy = image_policy or ImagePolicy(max_bytes=max_body_bytes)
        self.gate = Gate(queue_size, queue_timeout, pixel_budget)
        self.hosts = HostPolicy(address[0], allowed_hosts)
        self.routes = ROUTES
        self.history: collections.deque = collections.deque(maxlen=64)
        self.created = int(time.time())
        self.stopping = threading.Event()
        self.max_connections = max_connections
        self._conns: dict[socket.socket, Connection] = {}
        self._conn_lock = threading.Lock()
        self._decoder, self._vae_lock = None, threading.Lock()
        super().__init__(address, Handler)

    # -- connections ---------------------------------------------------------------------
    def process_request(self, request, client_address):
        """A thread per connection; past max_connections the longest-idle one makes room."""
        refusal = None
        with self._conn_lock:
            if self.stopping.is_set():
                refusal = shutting_down()
            else:  # evicted ones count until their threads end (at most max_connections more)
                live = [c for c in self._conns.values() if not c.evicted]
                idle = [c for c in live if not c.busy]
                if len(live) >= self.max_connections and idle:
                    self._evict(min(idle, key=lambda c: c.since))
                elif len(live) >= self.max_connections or len(self._conns) >= 2 * self.max_connections:
                    refusal = busy("too many open connections; retry later")
            if refusal is None:
                self._conns[request] = Connection(request)
        if refusal is not None:
            self._refuse_at_once(request, refusal)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def _refuse_at_once(self, request, err) -> None:
        body = json.dumps(err.body()).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
        try:
            request.settimeout(1.0)
            request.sendall(f"HTTP/1.1 {err.status} Service Unavailable\r\n{extra}Content-Type: "
                            f"application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
                            .encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._conn_lock:
            self._conns.pop(request, None)

    def connection_of(self, request) -> Connection:
        with self._conn_lock:
            return self._conns.get(request) or Connection(request)

    def enter_request(self, conn: Connection) -> bool:
        """A request's head arrived (False if the connection was evicted meanwhile, or the
        server is stopping). Until its body is in too, it may still be evicted."""
        with self._conn_lock:
            conn.since = time.monotonic()
            return not conn.evicted and not self.stopping.is_set()

    def hold(self, conn: Connection) -> bool:
        """The whole request arrived: the connection is busy, never evicted (False if it was)."""
        with self._conn_lock:
            conn.busy = not conn.evicted
            return conn.busy

    def leave_request(self, conn: Connection) -> None:
        with self._conn_lock:
            conn.busy, conn.since = False, time.monotonic()

    @staticmethod
    def _evict(conn: Connection) -> None:
        """Close a connection's reading side: its thread sees the end of input and leaves."""
        conn.evicted = True
        try:
            conn.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # -- shutdown ------------------------------------------------------------------------
    def stop(self, timeout: float = STOP_WAIT_S) -> int:
        """Shut down cleanly (serve_forever must have returned); -> the requests still running
        when `timeout` passed (0: every client was answered)."""
        self.stopping.set()
        self.gate.close()  # waiting requests get 503 "shutting down" at their next poll
        try:
            self.socket.close()  # stop accepting: new connections are refused by the system
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            with self._conn_lock:
                for c in self._conns.values():
                    if not c.busy and not c.evicted:
                        self._evict(c)
                running = sum(c.busy for c in self._conns.values())
                left = len(self._conns)
            if not left or time.monotonic() > deadline:
                return running
            if running:
                self.pg.cancel()  # the generation stops at its next token; its client is told
            time.sleep(0.02)

    def server_close(self):
        if not self.stopping.is_set():
            self.stop()
        super().server_close()

    # -- the model's extras ----------------------------------------------------------------
    def mask_decoder(self):
        """The VAE for /v1/segment, loaded on first use (PgEdgeError when there is none)."""
        from pg_edge.tasks.calls import find_vae

        with self._vae_lock:
            if self._decoder is None:
                self._decoder = find_vae(self.pg, self.vae)
            return self._decoder

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
