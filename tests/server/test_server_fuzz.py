"""Raw-socket fuzzing of `pg-edge serve` (issue 23): 300 seeded mutations of valid requests
(request lines, headers, lengths, bodies, bytes), each sent to a real server with the `demo`
model on 127.0.0.1. Every case must be answered or closed within its time, every answer must
be HTTP/1.1 with an OpenAI JSON error or a real result (never a 500, never a traceback), and
/health must still answer at the end."""
import base64
import io
import json
import random
import socket
import threading
import time

import pytest
from PIL import Image

import pg_edge
from pg_edge.server import make_server

CASES, SEED, BUDGET_S = 300, 23, 60


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bodies() -> dict:
    url = _png()
    messages = [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    return {"/v1/chat/completions": {"max_tokens": 1, "messages": messages},
            "/v1/detect": {"image": url, "objects": "circle", "max_tokens": 1}}


def _request(method, target, headers, body) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
            + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body)


def mutate(rng: random.Random, bodies: dict) -> tuple[bytes, bool]:
    """One hostile request: (bytes, whether to half-close after sending)."""
    path = rng.choice(["/health", "/v1/models", *bodies])
    method = "GET" if path in ("/health", "/v1/models") else "POST"
    obj = json.loads(json.dumps(bodies.get(path, {})))
    headers = [(b"Host", b"127.0.0.1:8080")]
    body = b""
    if method == "POST":
        if rng.random() < 0.4:  # JSON-level mutations
            key = rng.choice(["max_tokens", "stream", "n", "model", "messages", "stream_options", "seed",
                              "temperature", "stop", "objects", "image"])
            obj[key] = rng.choice([None, True, -1, 0, 10**30, 1e308, "x" * rng.randint(0, 50), [], {},
                                   [[[]]], {"include_usage": "yes"}, float("inf") if rng.random() < .1 else 2])
        body = json.dumps(obj).encode() if rng.random() < 0.9 else json.dumps(obj).encode()[:rng.randint(0, 50)]
        headers += [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
    kind = rng.randrange(12)
    if kind == 0:  # request line
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "G\x00T", "", "get",
                             "X" * 300])
        path = rng.choice([path, "", "*", "http://evil/" + path, path + "?" + "a" * 9000, path + "#x",
                           "/%00", "/..%2f..%2fetc/passwd", path + " HTTP/1.1", "/\x1b[2J", "//" + path])
    elif kind == 1:  # Content-Length values
        headers = [h for h in headers if h[0] != b"Content-Length"]
        value = rng.choice([b"+5", b"-1", b"1_0", b"0x10", b" ", b"", b"99999999999999999999", b"5, 5",
                            str(len(body) + rng.randint(-20, 20)).encode(), b"\xff", b"1e3", b"00" + str(len(body)).encode()])
        headers.append((b"Content-Length", value))
        if rng.random() < 0.3:
            headers.append((b"Content-Length", str(len(body)).encode()))
    elif kind == 2:  # framing: Transfer-Encoding, Expect, Connection
        headers.append(rng.choice([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity"),
                                   (b"Expect", b"100-continue"), (b"Connection", b"close"),
                                   (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"h2c")]))
    elif kind == 3:  # header syntax
        headers.append(rng.choice([(b"X Bad", b"1"), (b"X-Bad ", b"1"), (b" X-Fold", b"1"), (b"", b"1"),
                                   (b"X-Nul", b"a\x00b"), (b"X-Cr", b"a\rb"), (b"X-Long", b"a" * 10000),
                                   (b"X-Utf8", "\u00e9\u2603".encode()), (b"X-Ctl", b"\x1b[31m")]))
    elif kind == 4:  # many headers
        headers += [(f"X-{i}".encode(), b"1") for i in range(rng.choice([10, 63, 64, 200]))]
    elif kind == 5:  # Host and Origin
        headers = [h for h in headers if h[0] != b"Host"] if rng.random() < 0.5 else headers
        headers.append(rng.choice([(b"Host", b"evil.example"), (b"Host", b"[::1]:1"), (b"Host", b"a b"),
                                   (b"Host", b"127.0.0.1"), (b"Origin", b"null"),
                                   (b"Origin", b"http://evil.example"), (b"Origin", b"http://localhost:1"),
                                   (b"Origin", b"\xff\xfe"), (b"Host", b"localhost:99999999")]))
    elif kind == 6:  # a smuggled second request in or after the body
        extra = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        body = body + extra if rng.random() < 0.5 else extra
    elif kind == 7:  # JSON bytes
        body = rng.choice([b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"{}" * 1000,
                           b'{"messages": "' + b"\\ud800" * 10 + b'"}', bytes(rng.randrange(256) for _ in range(200))])
        headers = [h for h in headers if h[0] != b"Content-Length"] + [(b"Content-Length", str(len(body)).encode())]
    data = _request(method, path, headers, body)
    if kind == 8:  # truncated anywhere
        data = data[:rng.randrange(len(data) + 1)]
    elif kind == 9:  # bytes flipped
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    elif kind == 10:  # CR / LF / NUL inserted
        at = rng.randrange(len(data) + 1)
        data = data[:at] + rng.choice([b"\r", b"\n", b"\x00", b"\r\n\r\n", b" "]) + data[at:]
    elif kind == 11:  # pipelined copies
        data = data * rng.randint(2, 4)
    return data, rng.random() < 0.93


def check_answer(raw: bytes, head: bool = False) -> list[int]:
    """Statuses of the HTTP/1.1 responses in raw (1xx included); asserts their shape. head: the
    requests were HEAD (answers without bodies)."""
    statuses = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 "), raw[:300]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        statuses.append(status)
        if status < 200:
            raw = rest
            continue
        if headers.get("content-type") == "text/event-stream":
            events = [e for e in rest.split(b"\n\n") if e]
            assert all(e.startswith(b"data: ") for e in events), rest[:300]
            return statuses
        # (a HEAD answer has no body, but one to a request line too broken to read as HEAD does)
        n = 0 if head and not rest.startswith(b"{") else int(headers["content-length"])
        body = json.loads(rest[:n]) if n else {"error": dict.fromkeys(["message", "type", "param", "code"])}
        if status >= 400:
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
        raw = rest[n:]
    return statuses


@pytest.fixture(scope="module")
def server():
    srv = make_server(pg_edge.load("demo"), "127.0.0.1", 0, model_id="demo", max_tokens=4, max_body_bytes=200_000,
                      request_timeout=0.5, idle_timeout=0.5, queue_timeout=10)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_raw_socket_fuzz(server, capfd):
    rng, bodies = random.Random(SEED), _bodies()
    t0 = time.monotonic()
    seen: dict[int, int] = {}
    for case in range(CASES):
        data, half_close = mutate(rng, bodies)
        s = socket.create_connection(server.server_address[:2], timeout=15)
        try:
            try:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:  # the server may answer and close before taking everything
                pass
            raw = b""
            try:
                while chunk := s.recv(65536):  # the server must answer or close by itself
                    raw += chunk
            except ConnectionResetError:  # closed with our bytes unread: allowed, if answered first
                pass
        finally:
            s.close()
        statuses = check_answer(raw, head=data.startswith(b"HEAD "))
        assert 500 not in statuses, (case, data[:300], raw[:300])
        for st in statuses:
            seen[st] = seen.get(st, 0) + 1
    elapsed = time.monotonic() - t0
    conn = socket.create_connection(server.server_address[:2], timeout=10)
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
    conn.close()
    assert "Traceback" not in capfd.readouterr().err
    print(f"{CASES} cases in {elapsed:.1f} s: statuses {dict(sorted(seen.items()))}")
    assert elapsed < BUDGET_S
    assert len(seen) >= 8 and seen.get(200, 0) > 10  # the mutations reach many outcomes, and real work
