"""`pg-edge serve` driven by the official `openai` client and by raw HTTP: completions equal the
Python API, streamed == plain, OpenAI error bodies for bad requests, /v1/detect == the CLI's JSON."""
import base64
import http.client
import io
import json
import socket
import threading
import time

import openai
import pytest

import pg_edge
from pg_edge.cli import main
from pg_edge.server import make_server

MAX_TOKENS = 6


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, url):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def pg(converted):
    return pg_edge.load(converted(version=1))


@pytest.fixture(scope="module")
def cat(_sample_images_cache):
    return _sample_images_cache["chelsea"].resize((90, 60))


@pytest.fixture(scope="module")
def server(pg, tmp_path_factory):
    from pg_edge.convert.vae import convert_vae
    from fixtures.vae import write_fake_vae

    d = tmp_path_factory.mktemp("vae")
    vae = convert_vae(write_fake_vae(d / "vae-oid.npz", seed=3), d / "vae.safetensors")
    srv = make_server(pg, "127.0.0.1", 0, model_id="tiny", max_body_bytes=200_000,
                      max_tokens=64, queue_size=4, queue_timeout=30, vae=vae)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def raw(server, method, path, body=b"", headers=None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data)


def test_plain_and_streamed_completions_equal_the_python_api(client, pg, cat):
    messages = user("caption en", data_url(cat))
    direct = pg.generate(cat, "caption en", max_tokens=MAX_TOKENS)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    assert choice.finish_reason == ("length" if direct.finish_reason == "length" else "stop")
    assert plain.usage.prompt_tokens == direct.prompt_tokens
    assert plain.usage.completion_tokens == len(direct.tokens)
    assert plain.usage.total_tokens == direct.prompt_tokens + len(direct.tokens)

    events = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == plain.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == choice.finish_reason
    assert events[-1].usage.model_dump() == plain.usage.model_dump()

    # Sampling settings reach the sampler: same seed, same text; max_completion_tokens counts.
    kw = dict(model="tiny", messages=messages, temperature=1.5, top_p=0.9, seed=7, max_completion_tokens=4)
    sampled = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(e.choices[0].delta.content or "" for e in client.chat.completions.create(stream=True, **kw)
                       if e.choices)
    assert sampled == streamed == pg.generate(cat, "caption en", max_tokens=4, temperature=1.5, top_p=0.9,
                                              seed=7).text


def test_stop_strings_cut_plain_and_streamed_alike(client, pg, cat):
    full = pg.generate(cat, "caption en", max_tokens=12).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    messages = user("caption en", data_url(cat))
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop])
    assert plain.choices[0].message.content == full[:full.find(stop)]
    assert plain.choices[0].finish_reason == "stop"
    events = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=stop, stream=True)
    assert "".join(e.choices[0].delta.content or "" for e in events) == full[:full.find(stop)]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny"


def _chat(**fields):
    return json.dumps({"model": "tiny", "max_tokens": 2, **fields}).encode()


def test_invalid_requests_get_4xx_openai_errors_and_the_server_keeps_serving(server, client, cat, tmp_path):
    good = data_url(cat)
    cat.save(tmp_path / "cat.png")
    cases = {
        "bad JSON": (b'{"model": "tiny", "messages": [', 400),
        "JSON nested too deeply": (b"[" * 50_000 + b"]" * 50_000, 400),
        "missing messages": (_chat(), 400),
        "empty messages": (_chat(messages=[]), 400),
        "non-image data URL": (_chat(messages=user("caption en", "data:text/plain;base64,aGVsbG8=")), 400),
        "bad base64": (_chat(messages=user("caption en", "data:image/png;base64,@@@")), 400),
        "not an image": (_chat(messages=user("caption en", "data:image/png;base64,"
                                             + base64.b64encode(b"hello").decode())), 400),
        "oversized body": (_chat(messages=user("caption en", good), pad="x" * 300_000), 413),
        "unknown model": (_chat(messages=user("caption en", good), model="gpt-4o"), 404),
        "negative max_tokens": (_chat(messages=user("caption en", good), max_tokens=-1), 400),
        "max_tokens over the limit": (_chat(messages=user("caption en", good), max_tokens=10_000), 400),
        "temperature": (_chat(messages=user("caption en", good), temperature="hot"), 400),
        "remote URL": (_chat(messages=user("caption en", "https://example.com/cat.png")), 400),
        "file path": (_chat(messages=user("caption en", str(tmp_path / "cat.png"))), 400),
        "file URL": (_chat(messages=user("caption en", (tmp_path / "cat.png").as_uri())), 400),
        "no image": (_chat(messages=[{"role": "user", "content": "caption en"}]), 400),
        "two images": (_chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "caption en"}, {"type": "image_url", "image_url": {"url": good}},
            {"type": "image_url", "image_url": {"url": good}}]}]), 400),
        "stream not a bool": (_chat(messages=user("caption en", good), stream="yes"), 400),
    }
    for name, (body, want) in cases.items():
        status, _, reply = raw(server, "POST", "/v1/chat/completions", body)
        assert status == want, (name, reply)
        err = reply["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
    assert "--allow-remote-images" in raw(server, "POST", "/v1/chat/completions", cases["remote URL"][0])[2]["error"]["message"]
    status, _, reply = raw(server, "POST", "/v1/chat/completions", _chat(messages=user("caption en", good)),
                           {"Content-Type": "text/plain"})
    assert status == 415 and reply["error"]["code"] == "unsupported_media_type"
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    # The real client sees the same errors as exceptions of its own types.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user("caption en", good))
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=user("caption en", good), max_tokens=-5)
    # And it still serves.
    ok = client.chat.completions.create(model="tiny", messages=user("caption en", good), max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_api_key(pg, cat):
    srv = make_server(pg, "127.0.0.1", 0, model_id="tiny", api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        messages = user("caption en", data_url(cat))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].message
        assert raw(srv, "GET", "/health")[0] == 200  # a health check needs no key
    finally:
        srv.shutdown()
        srv.server_close()


def test_detect_and_segment_endpoints_match_the_cli_json(server, converted, cat, tmp_path, capsys):
    cat.save(tmp_path / "cat.png")
    model = str(converted(version=1))
    for task in ("detect", "segment"):
        body = json.dumps({"image": data_url(cat), "objects": "cat ; dog", "max_tokens": 8}).encode()
        status, _, got = raw(server, "POST", f"/v1/{task}", body)
        assert status == 200, got
        extra = ["--vae", str(server.vae)] if task == "segment" else []
        assert main([task, model, "--image", str(tmp_path / "cat.png"), "cat ; dog", "--json",
                     "--max-tokens", "8", *extra]) == 0
        cli = json.loads(capsys.readouterr().out.splitlines()[-1])
        for d in (got, cli):
            del d["generation"]["timings"], d["generation"]["peak_memory_gb"]
        assert got == cli
    status, _, err = raw(server, "POST", "/v1/detect", json.dumps({"image": data_url(cat)}).encode())
    assert status == 400 and err["error"]["param"] == "objects"


def test_files_and_remote_urls_when_the_server_allows_them(pg, cat, tmp_path):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "pics").mkdir()
    cat.save(tmp_path / "pics" / "cat.png")
    cat.save(tmp_path / "outside.png")
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler,
                                                                    directory=str(tmp_path / "pics")))
    srv = make_server(pg, "127.0.0.1", 0, model_id="tiny", allow_remote_images=True,
                      files_root=tmp_path / "pics", max_connections=2)
    for s in (files, srv):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        direct = pg.generate(cat, "caption en", max_tokens=2).text
        for url in [str(tmp_path / "pics" / "cat.png"), "cat.png", (tmp_path / "pics" / "cat.png").as_uri(),
                    f"http://127.0.0.1:{files.server_address[1]}/cat.png"]:
            status, _, reply = raw(srv, "POST", "/v1/chat/completions", _chat(messages=user("caption en", url)))
            assert status == 200 and reply["choices"][0]["message"]["content"] == direct, (url, reply)
        for url in [str(tmp_path / "outside.png"), "../outside.png"]:
            status, _, reply = raw(srv, "POST", "/v1/chat/completions", _chat(messages=user("caption en", url)))
            assert status == 400 and reply["error"]["code"] == "file_path_refused", url
        # Past max_connections the longest-idle connection makes room for a new one...
        idle = [http.client.HTTPConnection(*srv.server_address[:2], timeout=5) for _ in range(2)]
        for c in idle:
            c.connect()
        assert raw(srv, "GET", "/health")[0] == 200
        assert idle[0].sock.recv(1) == b""  # the oldest was closed for it
        for c in idle:
            c.close()
        # ...and when every connection holds a whole request (one generating, one waiting for
        # the model), a new one gets a 503 at once.
        body = _chat(messages=user("caption en", data_url(cat)), max_tokens=512)
        inside = [socket.create_connection(srv.server_address[:2], timeout=5) for _ in range(2)]
        for s in inside:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while sum(c.busy for c in srv._conns.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, reply = raw(srv, "GET", "/health")
        assert status == 503 and headers["Retry-After"] == "1" and reply["error"]["code"] == "server_busy"
        for s in inside:
            s.close()
    finally:
        for s in (files, srv):
            s.shutdown()
            s.server_close()
