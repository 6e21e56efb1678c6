"""pg_edge.cpu.qmv's `log_softmax` (logits.cpp) gives the log-probabilities the model's ops give
(softcap, the mask of ids never emitted, log-softmax), and sampled generation takes it on the
CPU (pg_edge.cpu.layers.CpuPaliGemmaModel.log_probs). `ext`: tests/cpu/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import layers
from pg_edge.model.paligemma import PaliGemmaModel


def reference(x: np.ndarray, cap: float, limit: int) -> np.ndarray:
    """float64 log-softmax of the capped logits over ids < limit, -inf beyond."""
    y = cap * np.tanh(x / cap) if cap else x.astype(np.float64)
    y = np.where(np.arange(x.shape[-1]) < limit, y, -np.inf)
    top = y.max(axis=-1, keepdims=True)
    return y - (top + np.log(np.exp(y - top).sum(axis=-1, keepdims=True)))


@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize("V,limit", [(257216, 257152), (1000, 1000), (37, 20)])
def test_equals_the_log_softmax_of_the_capped_logits(ext, cap, V, limit):
    x = mx.random.normal((3, V), key=mx.random.key(V)) * 12
    got = np.array(ext.log_softmax(x, cap, limit))
    ref = reference(np.array(x, dtype=np.float64), cap, limit)
    assert got.dtype == np.float32 and got.shape == (3, V)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))  # exactly the ids past the limit
    np.testing.assert_allclose(got[:, :limit], ref[:, :limit], rtol=0, atol=1e-4)


def test_strided_rows_and_edge_rows_as_mlx_gives_them(ext):
    x = (mx.random.normal((40, 2)) * 3).T  # rows not contiguous
    np.testing.assert_allclose(np.array(ext.log_softmax(x, 0.0, 40)), reference(np.array(x, np.float64), 0.0, 40),
                               atol=1e-5)
    inf, nan = float("inf"), float("nan")
    for row in ([-inf] * 4, [1.0, inf, 2.0, -inf], [1.0, nan, 2.0, 0.0]):
        x = mx.array([row])
        ours = np.array(ext.log_softmax(x, 0.0, 4))
        theirs = np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))
        assert np.array_equal(np.isnan(ours), np.isnan(theirs)), row
        assert np.array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)]), row


def test_bad_input_is_a_clear_error(ext):
    with pytest.raises(ValueError, match="float32"):
        ext.log_softmax(mx.ones((1, 8), dtype=mx.bfloat16), 0.0, 8)
    with pytest.raises(ValueError, match="limit"):
        ext.log_softmax(mx.ones((1, 8)), 0.0, 0)
    with pytest.raises(ValueError, match="cap"):
        ext.log_softmax(mx.ones((1, 8)), -1.0, 8)


def test_every_kernel_gives_the_same_values(ext):
    code = """
import mlx.core as mx, numpy as np
from pg_edge.cpu import qmv
x = mx.random.normal((2, 5003), key=mx.random.key(3)) * 12
y = np.where(np.arange(5003) < 4999, 30 * np.tanh(np.array(x, np.float64) / 30), -np.inf)
ref = y - (y.max(-1, keepdims=True) + np.log(np.exp(y - y.max(-1, keepdims=True)).sum(-1, keepdims=True)))
got = np.array(qmv.module().log_softmax(x, 30.0, 4999))
print(qmv.module().simd(), float(np.abs(got[:, :4999] - ref[:, :4999]).max()), bool(np.isneginf(got[:, 4999:]).all()))
"""
    for simd in ("avx2", "portable"):
        env = dict(os.environ, PG_EDGE_QMV_SIMD=simd)
        env.pop("PG_EDGE_QMV", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        level, err, masked = out.stdout.split()
        assert level in (simd, "portable") and float(err) < 1e-4 and masked == "True", out.stdout


def test_sampled_generation_takes_it(count_calls, converted, sample_images, monkeypatch):
    pg = pg_edge.load(converted(version=2, dtype="bfloat16"))
    if cpu.policy() != "cpu":
        pytest.skip("the CPU variants are swapped in on the CPU backend only")
    assert type(pg.model) is layers.CpuPaliGemmaModel
    calls = count_calls("log_softmax")
    image = sample_images[0]
    ours = pg.generate(image, "caption en", max_tokens=6, temperature=0.8, seed=5)
    assert len(calls) >= 6
    logits = mx.random.normal((2, pg.model.config.text.vocab_size)) * 10
    limit = pg.model.config.real_vocab_size
    np.testing.assert_allclose(np.array(pg.model.log_probs(logits, limit)),
                               np.array(PaliGemmaModel.log_probs(pg.model, logits, limit)), atol=2e-4)
    calls.clear()
    monkeypatch.setattr(layers.CpuPaliGemmaModel, "log_probs", PaliGemmaModel.log_probs)
    plain = pg.generate(image, "caption en", max_tokens=6, temperature=0.8, seed=5)
    assert calls == [] and ours.tokens == plain.tokens
