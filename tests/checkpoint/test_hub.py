"""Hub ids go through huggingface_hub for real: here against a local cache in HF's own layout,
offline (HF_HUB_OFFLINE=1 is set for the whole test session), never the network."""
import shutil

import numpy as np
import pytest

import pg_edge
from pg_edge.cli import main


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, hf_checkpoint):
    """models--pg-edge-test--tiny-pg1 in the cache layout huggingface_hub reads offline."""
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--pg-edge-test--tiny-pg1"
    shutil.copytree(hf_checkpoint(version=1), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return repo


def test_convert_and_load_a_hub_id(hub_cache, hf_checkpoint, tmp_path, sample_images, capsys):
    assert main(["convert", "pg-edge-test/tiny-pg1", "-o", str(tmp_path / "out"), "--dtype", "float32", "--quiet"]) == 0
    direct = pg_edge.load("pg-edge-test/tiny-pg1")  # an HF hub id straight into the runtime
    conv = pg_edge.load(tmp_path / "out")
    np.testing.assert_allclose(direct.logits(sample_images[0], "ocr"), conv.logits(sample_images[0], "ocr"),
                               rtol=1e-6, atol=1e-6)


def test_unknown_hub_id_offline_is_a_clear_error(hub_cache, tmp_path, capsys):
    code = main(["convert", "pg-edge-test/not-there", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "pg-edge-test/not-there" in err[0]
    assert not (tmp_path / "out").exists()


def test_load_resolves_a_hub_id_once(hub_cache, monkeypatch):
    """pg_edge.load finds the folder once (the tokenizer and the weights are read from it)."""
    import pg_edge.checkpoint.folder as folder
    import pg_edge.checkpoint.loader as loader
    import pg_edge.pipeline as pipeline

    seen, real = [], folder.resolve

    def counting(path_or_id, *args, **kwargs):
        seen.append(str(path_or_id))
        return real(path_or_id, *args, **kwargs)

    for module in (folder, loader, pipeline):
        monkeypatch.setattr(module, "resolve", counting)
    pg_edge.load("pg-edge-test/tiny-pg1").close()
    assert seen == ["pg-edge-test/tiny-pg1"]
