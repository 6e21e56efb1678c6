"""pg_edge.checkpoint.weights.sanitize: every HF layout -> the converted layout, and sanitize twice == once."""
import numpy as np
import pytest

from pg_edge.checkpoint.folder import iter_shards
from pg_edge.checkpoint.weights import sanitize
from fixtures.checkpoints import LAYOUTS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sanitize_twice_equals_once_and_every_layout_agrees(hf_checkpoint, layout):
    """The output is in the converted layout (classic keys, OHWI patch conv): sanitizing it
    again as such changes nothing, and every HF layout of one checkpoint gives the same tensors."""
    def read(folder):
        out = {}
        for _, tensors, meta in iter_shards(folder):
            out.update(sanitize({k: np.array(v) for k, v in tensors.items()}, mlx_layout=meta.get("format") == "mlx"))
        return out

    once = read(hf_checkpoint(version=2, layout=layout))
    twice = sanitize(once, mlx_layout=True)
    assert list(twice) == list(once) and all(twice[k] is once[k] for k in once)
    conv = once["vision_tower.vision_model.embeddings.patch_embedding.weight"]
    assert conv.shape[1] == conv.shape[2] and conv.shape[-1] == 3  # OHWI: (out, kH, kW, 3)
    classic = read(hf_checkpoint(version=2, layout="classic"))
    assert set(once) == set(classic)
    for k in once:
        np.testing.assert_array_equal(np.asarray(once[k]), np.asarray(classic[k]), err_msg=k)
