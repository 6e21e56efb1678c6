"""`pg-edge serve MODEL --adapter NAME=DIR --max-batch N` (issue 22, item 3): a request's `model`
picks the base or an adapter, concurrent requests decode in one batch and each answer equals
its run alone, a client hanging up leaves the other rows alone, unknown names are 404s."""
import json
import socket
import threading
import time

import pytest

import pg_edge
from pg_edge.tasks.calls import to_json
from pg_edge.server import make_server
from tests.helpers.adapter_helpers import DEMO, make_adapter
from tests.server.test_server import data_url, raw, user

SHAPES = [f"pg_edge/demo/samples/shapes_{i}.png" for i in (1, 2, 3)]
LONG = "pg_edge/assets/astronaut.jpg"
JOBS = [(i % 3, ("caption en", "detect circle ; square", "detect triangle")[i % 3 - 1], ("demo", "a", "b")[i % 3])
        for i in range(6)]


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in SHAPES] + [Image.open(LONG).convert("RGB").resize((224, 224))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    adapters = {"a": make_adapter(d / "a", seed=1), "b": make_adapter(d / "b", seed=2, rank=2)}
    pg = pg_edge.load(DEMO, adapters=adapters)
    srv = make_server(pg, "127.0.0.1", 0, model_id="demo", max_tokens=400, queue_size=8, max_batch=4)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    pg.close()


def chat(server, model, prompt, img, max_tokens=12):
    body = {"model": model, "messages": user(prompt, data_url(img)), "max_tokens": max_tokens}
    return raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())


def alone_text(server, img, prompt, model, max_tokens=12):
    adapter = None if model == "demo" else model
    return server.pg.generate(img, prompt, adapter=adapter, max_tokens=max_tokens).text


def test_models_lists_the_base_and_every_adapter(server):
    status, _, body = raw(server, "GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m.get("parent")) for m in body["data"]] == [("demo", None), ("a", "demo"), ("b", "demo")]


def test_concurrent_requests_with_mixed_adapters_equal_their_runs_alone(server, images):
    expected = [alone_text(server, images[i], p, m) for i, p, m in JOBS]
    assert len(set(expected)) > 2  # the adapters answer differently
    out = [None] * len(JOBS)
    go = threading.Barrier(len(JOBS))

    def run(k):
        i, p, m = JOBS[k]
        go.wait()
        out[k] = chat(server, m, p, images[i])

    server.pg._scheduler.most_rows = 0
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(JOBS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [o[0] for o in out] == [200] * len(JOBS)
    assert [o[2]["choices"][0]["message"]["content"] for o in out] == expected
    assert [o[2]["model"] for o in out] == [m for _, _, m in JOBS]
    assert server.pg._scheduler.most_rows > 1


def test_unknown_model_names_are_404_in_openai_format(server, images):
    status, _, body = chat(server, "c", "caption en", images[0])
    assert status == 404
    err = body["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "'c' does not exist" in err["message"]
    assert "'demo', 'a', 'b'" in err["message"]
    for path in ("/v1/detect", "/v1/segment"):
        body = {"model": "c", "image": data_url(images[0]), "objects": "circle"}
        status, _, answer = raw(server, "POST", path, json.dumps(body).encode())
        assert status == 404 and answer["error"]["code"] == "model_not_found", path


@pytest.mark.parametrize("path", ["/v1/detect", "/v1/segment"])
def test_detect_and_segment_take_model(server, images, path):
    task = path.rsplit("/", 1)[1]
    for model in ("demo", "a"):
        body = {"model": model, "image": data_url(images[1]), "objects": "circle ; square", "max_tokens": 12}
        status, _, answer = raw(server, "POST", path, json.dumps(body).encode())
        assert status == 200
        call = getattr(server.pg, task)
        direct = to_json(call(images[1], "circle ; square", adapter=None if model == "demo" else model,
                              max_tokens=12))
        assert answer["text"] == direct["text"] and answer["objects"] == direct["objects"], model


def test_a_client_hanging_up_leaves_the_other_rows_alone(server, images):
    """A streamed request with adapter a is dropped mid-answer while others decode beside it."""
    expected = [alone_text(server, images[i], p, m) for i, p, m in JOBS[:4]]
    sock = socket.create_connection(server.server_address[:2])
    body = json.dumps({"model": "a", "messages": user("caption en", data_url(images[3])), "max_tokens": 400,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data:") < 2:  # the role chunk, then its first text: it is generating
        piece = sock.recv(65536)
        assert piece, got
        got += piece
    out = [None] * 4

    def run(k):
        i, p, m = JOBS[k]
        out[k] = chat(server, m, p, images[i])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    sock.close()  # hang up
    for t in threads:
        t.join(timeout=120)
    assert [o[2]["choices"][0]["message"]["content"] for o in out] == expected
    deadline = time.monotonic() + 30
    while not any(e.get("finish") == "client_gone" for e in server.history) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [e for e in server.history if e.get("finish") == "client_gone"]
    assert gone and server.gate.running == 0
