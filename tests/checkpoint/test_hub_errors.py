"""Hub failures, simulated without network: a local HTTP endpoint on 127.0.0.1 answering as the
hub does (X-Error-Code headers), a closed port, offline mode. Each ends in one CheckpointError
sentence that says what to do."""
import http.server
import threading

import pytest

from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.loader import resolve


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Gated repos answer 401 GatedRepo, unknown ones 404 RepoNotFound, anything else 500."""

    def answer(self):
        if "/gated-org/" in self.path:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this model is restricted.")
        elif "/api/models/" in self.path:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        else:
            self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hc
    server.shutdown()


def refusal(name: str) -> str:
    with pytest.raises(CheckpointError) as err:
        resolve(name)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_gated_repo_without_token(hub):
    msg = refusal("gated-org/paligemma")
    assert "gated" in msg and "HF_TOKEN" in msg and "licence" in msg


def test_wrong_id(hub):
    msg = refusal("nobody/paligemma-typo")
    assert "no model nobody/paligemma-typo on the Hugging Face hub" in msg and "HF_TOKEN" in msg


def test_hub_unreachable_without_cache(hub, monkeypatch):
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    assert "cannot reach the Hugging Face hub" in refusal("google/paligemma2-3b-pt-224")


def test_offline_without_cache(hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    msg = refusal("google/paligemma2-3b-pt-224")
    assert "HF_HUB_OFFLINE" in msg and "not in the local Hugging Face cache" in msg


def test_missing_local_path_is_not_taken_for_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A").mkdir()
    msg = refusal("A/missing")  # the fake hub would answer 404: it must not even be asked
    assert msg == "model folder not found: A/missing (A is a local folder, so this is a path, not a hub id)"
    for local in ("./x/y", "x/y/z", "../m", "a--b/c", "~/nothing-here"):
        assert refusal(local).startswith("model folder not found")
