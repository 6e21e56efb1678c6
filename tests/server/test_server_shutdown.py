"""`pg-edge serve` stopping with work in flight, and clients that half-close or hang up.

The tiny converted model never emits eos, so a generation of 4000 tokens runs for many seconds:
long enough to signal the server in the middle of it (issue 23, items 2, 3 and 8)."""
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pg_edge
from pg_edge.server import make_server

ROOT = Path(__file__).resolve().parents[2]
LONG = 4000  # tokens: seconds of generation, never reached in these tests


def chat_body(stream: bool, max_tokens: int = LONG) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"max_tokens": max_tokens, "stream": stream, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "caption en"},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def post(port: int, body: bytes, out: dict, key: str, first_event: threading.Event | None = None):
    """POST /v1/chat/completions; out[key] = (status, [events] or JSON body)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.getheader("Content-Type") == "text/event-stream":
            events = []
            while line := resp.fp.readline():
                if line.startswith(b"data: "):
                    data = line[6:].strip().decode()
                    events.append(data if data == "[DONE]" else json.loads(data))
                    if first_event is not None and len(events) >= 3:
                        first_event.set()
            out[key] = (resp.status, events)
        else:
            out[key] = (resp.status, json.loads(resp.read()))
        conn.close()
    except Exception as err:  # reported by the assertions: every client must get an answer
        out[key] = ("failed", repr(err))


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def is_shutdown_error(obj) -> bool:
    return isinstance(obj, dict) and obj.get("error", {}).get("code") == "server_shutting_down"


@pytest.mark.parametrize("sig,running_streams", [(signal.SIGTERM, True), (signal.SIGINT, True),
                                                 (signal.SIGTERM, False)])
def test_a_signal_with_requests_queued_answers_everyone_and_exits_cleanly(converted, tmp_path, sig,
                                                                           running_streams):
    """1 running (streamed, or not) + 3 queued requests, then SIGTERM / Ctrl-C: every client gets
    an answer, the cut one is not reported complete, the exit is 143 / 0, never an abort."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pg_edge.cli", "serve", str(converted(version=1)), "--port", "0",
                             "--max-tokens", str(LONG)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stderr.readline()).group(1))
        out, started = {}, threading.Event()
        running = threading.Thread(target=post, args=(port, chat_body(running_streams), out, "running", started))
        running.start()
        if running_streams:
            assert started.wait(30), out
        else:
            deadline = time.monotonic() + 30
            while not health(port)["busy"] and time.monotonic() < deadline:
                time.sleep(0.05)
        queued = [threading.Thread(target=post, args=(port, chat_body(k == 0), out, f"queued{k}"))
                  for k in range(3)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 30
        while health(port)["waiting"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(port)["waiting"] == 3
        t0 = time.monotonic()
        proc.send_signal(sig)
        for t in [running, *queued]:
            t.join(timeout=30)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (143 if sig == signal.SIGTERM else 0), (code, err)
    assert "terminate called" not in err and "Traceback" not in err, err
    assert elapsed < 15, elapsed  # the cut generation ends at its next token, not after 4000
    status, answer = out["running"]
    assert status == 200 if running_streams else status == 503, out["running"]
    if running_streams:  # some text, then an error event: no finish_reason, no [DONE]
        assert any(e["choices"][0]["delta"].get("content") for e in answer[:-1] if isinstance(e, dict)
                   and e.get("choices"))
        assert is_shutdown_error(answer[-1]) and "[DONE]" not in answer, answer[-3:]
        assert all(e["choices"][0]["finish_reason"] is None for e in answer[:-1]), answer[-3:]
        assert "cut after" in answer[-1]["error"]["message"]
    else:
        assert is_shutdown_error(answer) and "cut after" in answer["error"]["message"], answer
    for k in range(3):  # waiting ones: 503 "shutting down" before any stream started
        status, answer = out[f"queued{k}"]
        assert status == 503 and is_shutdown_error(answer), out[f"queued{k}"]


@pytest.fixture(scope="module")
def long_server(converted):
    pg = pg_edge.load(converted(version=1))
    srv = make_server(pg, "127.0.0.1", 0, model_id="tiny", max_tokens=LONG, queue_size=4, queue_timeout=30)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _send(srv, body: bytes) -> socket.socket:
    s = socket.create_connection(srv.server_address[:2], timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_half_closed_client_gets_its_answer_and_a_closed_one_leaves_the_line(long_server):
    """While a long generation runs: a queued client that shuts only its sending side stays in
    line and gets its answer; a queued client that closes leaves the line at once."""
    srv = long_server
    runner = _send(srv, chat_body(True))  # holds the model
    assert b"200 OK" in runner.recv(4096)
    half = _send(srv, chat_body(False, max_tokens=3))
    half.shutdown(socket.SHUT_WR)
    closed = _send(srv, chat_body(False, max_tokens=3))
    deadline = time.monotonic() + 10
    while srv.gate.waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.gate.waiting == 2
    closed.close()
    deadline = time.monotonic() + 5
    while srv.gate.waiting > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.gate.waiting == 1  # the closed one left; the half-closed one still waits
    time.sleep(0.5)
    assert srv.gate.waiting == 1
    runner.close()  # the runner hangs up: its generation stops, the half-closed one runs
    reply = _read_all(half).split(b"\r\n\r\n")
    statuses = [p.split(b"\r\n")[0] for p in reply if p.startswith(b"HTTP/1.1")]
    assert statuses[-1] == b"HTTP/1.1 200 OK", reply  # (after 100 Continue probes, if any)
    answer = json.loads(reply[-1])
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    half.close()


def test_a_cut_generation_is_never_reported_complete(long_server, monkeypatch):
    """pg.cancel() from elsewhere (not the client, not a stop string): a 503 error, and in a
    stream an error event in place of finish_reason and [DONE]."""
    srv = long_server
    for stream in (False, True):
        out = {}
        t = threading.Thread(target=post, args=(srv.server_address[1], chat_body(stream), out, "r"))
        t.start()
        deadline = time.monotonic() + 10
        while not srv.pg._worker.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert srv.pg.cancel()
        t.join(timeout=20)
        status, answer = out["r"]
        last = answer[-1] if stream else answer
        assert status == (200 if stream else 503), out
        assert last["error"]["code"] == "generation_cancelled" and "cancelled on the server after" in \
            last["error"]["message"], last
        if stream:
            assert "[DONE]" not in answer and all(e["choices"][0]["finish_reason"] is None for e in answer[:-1])
