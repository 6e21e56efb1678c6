"""896 px geometry: 4096 image tokens + the prompt exceed Gemma2's 4096-token sliding window.

The narrow PaliGemma 2 fixture at 448 px with patch 7 has 64 x 64 = 4096 image tokens, like the
real 896 px model (patch 14), and keeps the real window (4096), so the sliding layers really cut
(the global layers and the prefix block do not). `attention="window"` must match transformers
(which applies the window), `attention="global"` the NumPy reference with every layer global
(what big_vision, which trained the checkpoints, computes), and the query-chunked prefill must
give the same logits as one unchunked pass under both.
"""
import copy

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
import pg_edge.model.gemma as gemma
from fixtures.checkpoints import load_hf_model
from hf_helpers import hf_greedy, rel_diff
from pg_edge.generate import generate_step
from pg_edge.reference import ReferenceModel
from pg_edge.reference.safetensors_np import read_folder

TOL = 1e-4
SIZE = 448  # 4096 image tokens with the fixture's patch 7


STEPS = 3  # the window bites at decode: suffix tokens past 4096 lose the first image tokens


@pytest.fixture(scope="module")
def case(hf_checkpoint, converted, _sample_images_cache):
    folder = converted(version=2, image_size=SIZE, dtype="float32")
    pg = pg_edge.load(folder)
    inp = pg.prepare([_sample_images_cache["astronaut"]], ["caption en"])
    assert inp.input_ids.shape[1] > 4096 and pg.config.text.sliding_window == 4096
    return hf_checkpoint(version=2, image_size=SIZE), folder, pg, inp


_STEPS: dict = {}


def pg_steps(pg, inp, mode: str) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and log-probabilities float32[STEPS, 257152] under attention `mode` at the
    current PREFILL_CHUNK (each combination computed once per module: these runs are the cost)."""
    key = (id(pg), mode, gemma.PREFILL_CHUNK)
    if key not in _STEPS:
        _STEPS[key] = _pg_steps(pg, inp, mode)
    return _STEPS[key]


def _pg_steps(pg, inp, mode: str) -> tuple[list[int], np.ndarray]:
    pg.model.set_attention(mode)
    try:
        feats = pg.image_features(inp.pixel_values)
        steps = list(generate_step(pg.model, mx.array(inp.input_ids), feats, max_tokens=STEPS))
    finally:
        pg.model.set_attention("window")
    V = pg.config.real_vocab_size
    return [int(t[0]) for t, _ in steps], np.stack([np.array(lp[0, :V]) for _, lp in steps])


def test_window_matches_transformers_and_global_differs(case):
    hf_dir, _, pg, inp = case
    want, want_lp = hf_greedy(load_hf_model(hf_dir), inp.input_ids, inp.pixel_values, STEPS)
    got, got_lp = pg_steps(pg, inp, "window")
    assert got == want
    assert max(rel_diff(g, w) for g, w in zip(got_lp, want_lp)) <= TOL
    _, global_lp = pg_steps(pg, inp, "global")
    # Prefill: every query is in the prefix, which sees the whole prefix in both modes.
    assert rel_diff(global_lp[0], got_lp[0]) <= 1e-5
    # Decode: the geometry really exercises the window; dropping it moves the log-probabilities.
    assert rel_diff(global_lp[-1], got_lp[-1]) > 3 * TOL  # 6e-4 here: a parity test would see it


def reference_steps(ref, inp, tokens: list[int]) -> np.ndarray:
    """The reference's teacher-forced log-probabilities at the prefill and each given token."""
    from pg_edge.reference import gemma as ref_gemma

    cache = ref_gemma.KVCache()
    rows = [ref._run(inp.input_ids, inp.pixel_values, None, None, cache, last_only=True)[0, -1]]
    for t in tokens[:-1]:
        rows.append(ref._run([[t]], None, [[1]], None, cache, last_only=True)[0, -1])
    lg = np.stack(rows)[:, :257152].astype(np.float64)
    return lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)


def test_global_matches_the_reference_with_every_layer_global(case):
    _, folder, pg, inp = case
    got, got_lp = pg_steps(pg, inp, "global")
    config, weights = read_folder(folder)
    config = copy.deepcopy(config)
    config["text_config"]["layer_types"] = ["full_attention"] * pg.config.text.num_hidden_layers
    want_lp = reference_steps(ReferenceModel(config, weights), inp, got)
    assert max(rel_diff(g, w) for g, w in zip(got_lp, want_lp)) <= TOL


@pytest.mark.parametrize("mode", ["window", "global"])
def test_chunked_prefill_is_exact(case, mode, monkeypatch):
    _, _, pg, inp = case
    assert inp.input_ids.shape[1] % gemma.PREFILL_CHUNK  # default chunks: 5, the last partial
    chunked, chunked_lp = pg_steps(pg, inp, mode)
    monkeypatch.setattr(gemma, "PREFILL_CHUNK", 10**6)  # one pass
    whole, whole_lp = pg_steps(pg, inp, mode)
    assert chunked == whole
    assert max(rel_diff(c, w) for c, w in zip(chunked_lp, whole_lp)) <= 1e-5


def test_attention_mode_is_checked(case):
    with pytest.raises(pg_edge.errors.PgEdgeError, match="attention must be one of"):
        case[2].model.set_attention("local")
