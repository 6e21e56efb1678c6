"""`pg-edge serve` against hostile clients, over real sockets to a real server on 127.0.0.1 with
the built-in `demo` model (issue 23, items 4-8): the pixel budget and admission before decoding,
slow clients, request smuggling, DNS rebinding, and the smaller ones."""
import base64
import http.client
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import pg_edge
from pg_edge.server import endpoints, make_server

PORT_HOST = "127.0.0.1"


def png_url(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 160, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SMALL = png_url(48, 48)


def chat(url: str = SMALL, **fields) -> bytes:
    return json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "caption en"}, {"type": "image_url", "image_url": {"url": url}}]}],
        **fields}).encode()


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    hdrs = {"Host": "127.0.0.1", **({"Content-Type": "application/json", "Content-Length": str(len(body))}
                                    if method == "POST" else {}), **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
            + "\r\n").encode() + body


def exchange(srv, data: bytes, half_close: bool = True, timeout: float = 20) -> bytes:
    """Send raw bytes, read until the server closes: everything it answered."""
    s = socket.create_connection(srv.server_address[:2], timeout=timeout)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Parse a byte string of HTTP/1.1 responses (1xx skipped): [(status, headers, body)]."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ")[:2]
        assert version == "HTTP/1.1", lines[0]
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if int(status) < 200:
            raw = rest
            continue
        n = int(headers.get("content-length", len(rest)))
        out.append((int(status), headers, rest[:n]))
        raw = rest[n:]
    return out


def one(srv, data: bytes, **kw) -> tuple[int, dict, dict]:
    """The single answer to raw bytes: (status, headers, JSON body)."""
    (status, headers, body), = responses(exchange(srv, data, **kw))
    return status, headers, json.loads(body)


def get(srv, path: str = "/health", headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=20)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


@pytest.fixture(scope="module")
def demo():
    return pg_edge.load("demo")


def serving(pg, **options):
    srv = make_server(pg, PORT_HOST, 0, model_id="demo", **options)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def closing(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(demo):
    srv = serving(demo, max_tokens=8, request_timeout=1.5, idle_timeout=5, api_key=None)
    yield srv
    closing(srv)


# -- 4: admission before decoding, a pixel budget ---------------------------------------------
def test_images_are_decoded_only_once_admitted_within_a_pixel_budget(demo, monkeypatch):
    decoded = []
    real = endpoints.decode
    monkeypatch.setattr(endpoints, "decode", lambda data, param: decoded.append(len(data)) or real(data, param))
    srv = serving(demo, pixel_budget=9_000_000, queue_size=1, queue_timeout=30)
    try:
        # An image past the whole budget: 413 from its header, nothing decoded.
        status, _, body = one(srv, request("POST", "/v1/chat/completions", chat(png_url(4000, 3000))))
        assert status == 413 and body["error"]["code"] == "image_too_large" and not decoded
        # Six 2000x2000 images at once (4 M pixels each): never more than 9 M held.
        peak, stop = [0], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], srv.gate.pixels_held)
                time.sleep(0.001)

        big = request("POST", "/v1/chat/completions", chat(png_url(2000, 2000)))
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(responses(exchange(srv, big))[0][0]))
                   for _ in range(6)]
        watcher = threading.Thread(target=watch)
        watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        watcher.join()
        # queue_size 1: one runs, one waits, the rest get 503 from the line before any decoding
        assert sorted(answers)[:2] == [200, 200] and set(answers) <= {200, 503}, answers
        assert len(decoded) == answers.count(200), (decoded, answers)
        assert 4_000_000 <= peak[0] <= 9_000_000, peak
        assert srv.gate.pixels_held == 0
    finally:
        closing(srv)


def test_six_big_images_at_once_stay_within_the_budget_in_memory():
    """The issue's case at a quarter scale: six 5000x5000 PNGs (82 KB each) sent at once to a
    `pg-edge serve demo` process with a budget of one image's pixels: its peak memory stays
    near one request's (docs/hardening.md has the numbers with and without the budget)."""
    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), (9, 99, 199)).save(buf, format="PNG")
    body = chat("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "pg_edge.cli", "serve", "demo", "--port", "0",
                             "--pixel-budget", "25000000"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stderr.readline()).group(1))

        def peak_mb() -> float:
            with open(f"/proc/{proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

        def post(out):
            conn = http.client.HTTPConnection(PORT_HOST, port, timeout=120)
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            out.append(resp.status)
            conn.close()

        statuses = []
        post(statuses)  # one image: the baseline peak
        one_image = peak_mb()
        threads = [threading.Thread(target=post, args=(statuses,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses == [200] * 7
        assert peak_mb() - one_image < 350, (one_image, peak_mb())
    finally:
        proc.terminate()
        proc.wait(30)


# -- 5: slow clients -------------------------------------------------------------------------
def dribble(srv, ends: dict, k, opened: list, body: bool = False) -> None:
    """A slowloris client: a header line every 0.2 s, never the blank line (or, body=True, a
    whole head and then a byte of its body every 0.2 s); reads the answer once there is one.
    ends[k] = (seconds until the server closed, what it sent)."""
    s = socket.create_connection(srv.server_address[:2], timeout=10)
    opened.append(s)
    t0 = time.monotonic()
    try:
        s.sendall(request("POST", "/v1/chat/completions", b"", {"Content-Length": "1000"}) if body
                  else b"GET /health HTTP/1.1\r\n")
        for i in range(40):
            if select.select([s], [], [], 0.2)[0]:
                break
            s.sendall(b"{" if body else f"X-Slow-{i}: {'a' * 10}\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    except OSError:
        data = b""
    ends[k] = (time.monotonic() - t0, data)


def test_slow_clients_get_408_and_cannot_keep_others_out(demo):
    srv = serving(demo, max_connections=8, request_timeout=1.5, idle_timeout=5)
    opened, ends = [], {}
    try:
        threads = [threading.Thread(target=dribble, args=(srv, ends, k, opened, k % 2)) for k in range(16)]
        for t in threads:  # twice as many slow clients (heads, bodies) as connection slots
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        for _ in range(10):  # /health and a real request still answer at once
            assert get(srv)[0] == 200
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=20)
        conn.request("POST", "/v1/chat/completions", body=chat(), headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()
        assert time.monotonic() - t0 < 5
        for t in threads:
            t.join(30)
        assert len(ends) == 16
        for k, (took, data) in ends.items():  # each: 408 at its deadline, or closed for a newer one
            assert took < 1.5 + 2.5, (k, took)
            if data:
                (status, _, body), = responses(data)
                assert status in (408, 503) and json.loads(body)["error"]["code"] in ("request_timeout",
                                                                                    "server_busy")
        for body in (False, True):  # with no one else around, a slow client meets its deadline: 408
            alone = {}
            dribble(srv, alone, 0, opened, body)
            took, data = alone[0]
            (status, headers, _), = responses(data)
            assert status == 408 and headers["connection"] == "close" and 1.4 < took < 1.5 + 2.5, took
    finally:
        for s in opened:
            s.close()
        closing(srv)


# -- 6: request smuggling / desync -------------------------------------------------------------
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_an_unread_body_is_never_parsed_as_the_next_request(demo):
    srv = serving(demo, api_key="k3y", request_timeout=1.5)
    try:
        cases = {401: request("POST", "/v1/chat/completions", SMUGGLED),  # no key
                 404: request("POST", "/v1/nothing", SMUGGLED, {"Authorization": "Bearer k3y"}),
                 405: request("POST", "/health", SMUGGLED),
                 415: request("POST", "/v1/chat/completions", SMUGGLED,
                              {"Authorization": "Bearer k3y", "Content-Type": "text/plain"})}
        for want, data in cases.items():
            for half_close in (True, False):  # the client may still be sending, or not
                answers = responses(exchange(srv, data, half_close=half_close))
                assert [a[0] for a in answers] == [want], (want, answers)
                assert answers[0][1]["connection"] == "close"
                assert json.loads(answers[0][2])["error"]["message"]
    finally:
        closing(srv)


@pytest.mark.parametrize("length", ["+2", "1_0", "0x10", "-1", "1 0", "2, 2", "２", "1e1"])
def test_loose_content_lengths_are_refused(server, length):
    data = request("POST", "/v1/chat/completions", b"{}", {"Content-Length": length}) + SMUGGLED
    answers = responses(exchange(server, data))
    assert [a[0] for a in answers] == [400] and answers[0][1]["connection"] == "close", answers


def test_duplicate_content_length_and_transfer_encoding_are_refused(server):
    body = chat()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for extra, want in [(f"Content-Length: {len(body)}\r\nContent-Length: {len(body)}\r\n", 400),
                        (f"Content-Length: {len(body)}\r\nContent-Length: 5\r\n", 400),
                        (f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n", 411),
                        ("Transfer-Encoding: chunked\r\n", 411)]:
        answers = responses(exchange(server, (head + extra + "\r\n").encode() + body + SMUGGLED))
        assert [a[0] for a in answers] == [want], (extra, answers)


def test_a_body_that_never_arrives_gets_408_and_close(server):
    s = socket.create_connection(server.server_address[:2], timeout=10)
    t0 = time.monotonic()
    s.sendall(request("POST", "/v1/chat/completions", b"", {"Content-Length": "100"}) + b'{"model":')
    data = b""
    while chunk := s.recv(4096):  # no half-close: the server must end it by itself
        data += chunk
    took = time.monotonic() - t0
    s.close()
    (status, headers, body), = responses(data)
    assert status == 408 and headers["connection"] == "close" and json.loads(body)["error"]["code"] == "request_timeout"
    assert 1.4 < took < 1.5 + 3, took


def test_keep_alive_still_works_for_whole_requests(server):
    data = request("GET", "/health") + request("POST", "/v1/chat/completions", chat()) + request("GET", "/v1/models")
    assert [a[0] for a in responses(exchange(server, data))] == [200, 200, 200]
    # A HEAD answer has no body, so the next answer starts right after its headers.
    raw = exchange(server, request("HEAD", "/health") + request("GET", "/health"))
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405") and rest.startswith(b"HTTP/1.1 200"), raw


# -- 7: DNS rebinding --------------------------------------------------------------------------
def test_only_loopback_hosts_and_origins_by_default(server):
    for host in ["localhost", "localhost:8080", "127.0.0.1", "127.3.4.5:1", "[::1]", "[::1]:8080", "LOCALHOST"]:
        assert one(server, request("GET", "/health", headers={"Host": host}))[0] == 200, host
    for host in ["evil.example", "evil.example:8080", "10.0.0.1", "localhost.evil.example", "127.0.0.1.nip.io"]:
        status, _, body = one(server, request("GET", "/health", headers={"Host": host}))
        assert status == 403 and body["error"]["code"] == "host_not_allowed", host
        assert "--allowed-host" in body["error"]["message"]
    assert one(server, request("GET", "/health", headers={"Host": "a b"}))[0] == 400
    for origin in ["http://localhost:3000", "http://127.0.0.1:8080", "https://[::1]"]:
        assert one(server, request("GET", "/health", headers={"Origin": origin}))[0] == 200, origin
    for origin in ["http://evil.example", "null", "https://evil.example:443", "file://", "garbage"]:
        status, _, body = one(server, request("POST", "/v1/chat/completions", chat(), {"Origin": origin}))
        assert status == 403 and body["error"]["code"] == "host_not_allowed", origin


def test_allowed_host_adds_names(demo, capsys):
    from pg_edge.cli import build_parser, main

    for bad_args in (["--allowed-host", "a b"], ["--allowed-host", "user@evil"], ["--pixel-budget", "0"],
                     ["--request-timeout", "0"]):
        assert main(["serve", "demo", *bad_args]) == 2  # refused before the model loads
        assert bad_args[0] in capsys.readouterr().err

    args = build_parser("serve").parse_args(["serve", "demo", "--allowed-host", "box.lan",
                                             "--allowed-host", "10.0.0.7"])
    assert args.allowed_host == ["box.lan", "10.0.0.7"]
    srv = serving(demo, allowed_hosts=args.allowed_host)
    try:
        for headers in [{"Host": "box.lan:8080"}, {"Host": "10.0.0.7"}, {"Host": "BOX.LAN"},
                        {"Origin": "http://box.lan:3000"}]:
            assert one(srv, request("GET", "/health", headers=headers))[0] == 200, headers
        assert one(srv, request("GET", "/health", headers={"Host": "evil.example"}))[0] == 403
    finally:
        closing(srv)


# -- 8: the smaller ones -----------------------------------------------------------------------
@pytest.mark.parametrize("data,want", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
    (b"GET /health HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /health\r\n\r\n", 400),  # HTTP/0.9
    (b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n folded: 1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1", 400),  # ends in the middle of the head
])
def test_http_layer_errors_are_openai_json(server, data, want):
    status, headers, body = one(server, data)
    assert status == want and headers["content-type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def test_verbose_logs_escape_control_bytes(demo, capfd):
    srv = serving(demo, verbose=True)
    try:
        exchange(srv, b"GET /\x1b[2J\x1b]0;pwned\x07 HTTP/1.1\r\n\r\n")
        exchange(srv, b"\x1b[31mGET / HTTP/1.1\r\n\r\n")
        exchange(srv, request("GET", "/nothing%1b[2J"))
        assert get(srv)[0] == 200
    finally:
        closing(srv)
    err = capfd.readouterr().err
    assert "GET /health" in err and not any(c in err for c in "\x1b\x07\x00")


def test_a_dribbling_remote_image_has_a_total_deadline(demo):
    class Dribble(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(200):  # a byte every 0.1 s: each read is quick, the whole is not
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    remote = ThreadingHTTPServer((PORT_HOST, 0), Dribble)
    remote.daemon_threads = True
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    srv = serving(demo, allow_remote_images=True, fetch_seconds=1.0)
    try:
        t0 = time.monotonic()
        url = f"http://127.0.0.1:{remote.server_address[1]}/x.png"
        status, _, body = one(srv, request("POST", "/v1/chat/completions", chat(url)))
        assert status == 400 and "within 1 s" in body["error"]["message"]
        assert time.monotonic() - t0 < 3
    finally:
        closing(srv)
        remote.shutdown()
        remote.server_close()


def test_bad_file_names_are_a_clean_400_that_shows_no_server_path(demo, tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    os.mkfifo(root / "fifo")
    srv = serving(demo, files_root=root)
    try:
        for name in ["loop1", "a\x00b", "x" * 5000, "d/" * 3000 + "x", "fifo", "../outside.png",
                     "/etc/passwd", "file:///etc/passwd", "missing.png"]:
            status, _, body = one(srv, request("POST", "/v1/chat/completions", chat(name)))
            message = body["error"]["message"]
            assert status == 400 and str(tmp_path) not in message and "Traceback" not in message, (name, message)
            assert len(message) < 500
        assert get(srv)[0] == 200
    finally:
        closing(srv)


def test_small_json_cases(server):
    huge = b'{"max_tokens": ' + b"9" * 5000 + b', "messages": []}'
    status, _, body = one(server, request("POST", "/v1/chat/completions", huge))
    assert status == 400 and body["error"]["code"] == "invalid_json" and "digits" in body["error"]["message"]
    for fields, param in [({"n": True}, "n"), ({"n": 2}, "n"), ({"n": "1"}, "n"),
                          ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
                          ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
                          ({"stream_options": []}, "stream_options")]:
        status, _, body = one(server, request("POST", "/v1/chat/completions", chat(**fields)))
        assert status == 400 and body["error"]["param"] == param, (fields, body)
    assert one(server, request("POST", "/v1/chat/completions", chat(n=1)))[0] == 200


def test_bearer_scheme_is_case_insensitive(demo):
    srv = serving(demo, api_key="s3cret")
    try:
        for auth, want in [("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER  s3cret ", 200),
                           ("Basic s3cret", 401), ("Bearer s3cret2", 401), ("Bearer", 401), ("s3cret", 401),
                           ("Bearer \u00e9", 401)]:
            assert get(srv, "/v1/models", {"Authorization": auth})[0] == want, auth
    finally:
        closing(srv)
