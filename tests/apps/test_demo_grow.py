"""apps/demo_model/grow.py: deepening the demo model keeps its logits, and it refuses an output
that is or holds its input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from apps.demo_model import arch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def grow(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.demo_model.grow", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = arch.hf_config(96, 1, 2, 0, vision=dict(SMALL, patch_size=32),
                         text=dict(SMALL, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32))
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
    out = tmp_path_factory.mktemp("grow") / "small"
    model.save_pretrained(out)
    return out


def logits(folder: Path) -> np.ndarray:
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[model.config.image_token_index] * 49 + [1, 10, 20, 30, 4]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=torch.ones(1, 3, 224, 224) * 0.3).logits.numpy()


def test_grown_model_has_the_layers_and_the_same_logits(small, tmp_path):
    run = grow(small, "-o", tmp_path / "grown", "--text-layers", 4, "--vision-layers", 3)
    assert run.returncode == 0, run.stderr
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "grown")
    assert cfg.text_config.num_hidden_layers == 4 and cfg.vision_config.num_hidden_layers == 3
    np.testing.assert_allclose(logits(tmp_path / "grown"), logits(small), rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_output_that_is_or_holds_the_input_is_refused(small, tmp_path, where):
    out = {"same": small, "inside": small / "grown", "holds": small.parent}[where]
    before = sorted(p.name for p in small.iterdir())
    run = grow(small, "-o", out, "--text-layers", 4, "--vision-layers", 3)
    assert run.returncode != 0 and "must lie outside the input" in run.stderr
    assert sorted(p.name for p in small.iterdir()) == before


def test_fewer_layers_is_refused(small, tmp_path):
    run = grow(small, "-o", tmp_path / "g", "--text-layers", 1, "--vision-layers", 2)
    assert run.returncode != 0 and "never removes" in run.stderr and not (tmp_path / "g").exists()
