"""Interchange with mlx-vlm, the ecosystem's MLX PaliGemma: folders go both ways.

PaliGemma 2 fixture: mlx-vlm's Gemma 1 path assumes head_dim = hidden/heads, which the real
PG1 checkpoints satisfy but the deliberately non-square fixtures do not.
"""
import numpy as np
import pytest

import pg_edge


@pytest.fixture(scope="module")
def vlm_converted(hf_checkpoint, tmp_path_factory):
    """A folder written by mlx-vlm's own converter (it writes tokenizer.json, no .model)."""
    from mlx_vlm.convert import convert

    out = tmp_path_factory.mktemp("vlm") / "pg2"
    convert(hf_path=str(hf_checkpoint(version=2, layout="classic")), mlx_path=str(out), dtype="float32")
    return out


def test_mlx_vlm_folder_loads_in_pg_edge_with_the_same_logits(vlm_converted, converted, sample_images):
    assert not (vlm_converted / "tokenizer.model").exists()
    theirs = pg_edge.load(vlm_converted)
    ours = pg_edge.load(converted(version=2))
    for image, prompt in zip(sample_images[:2], ["caption en", "detect cat"]):
        np.testing.assert_array_equal(theirs.logits(image, prompt), ours.logits(image, prompt))
    assert theirs.generate(sample_images[0], "ocr", max_tokens=8).tokens == \
        ours.generate(sample_images[0], "ocr", max_tokens=8).tokens


def test_pg_edge_folder_loads_in_mlx_vlm(converted, sample_images):
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    folder = converted(version=2)
    theirs = load_model(folder)
    ours = pg_edge.load(folder)
    inp = ours.prepare([sample_images[0]], ["caption en"])
    out = theirs(mx.array(inp.input_ids), mx.array(inp.pixel_values.transpose(0, 3, 1, 2)),
                 mask=mx.ones(inp.input_ids.shape))
    got = np.array(out.logits[0, -1])
    want = ours.logits(sample_images[0], "caption en")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
