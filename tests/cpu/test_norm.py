"""pg_edge.cpu.qmv's `rms_norm_add` (norm.cpp) gives what the model's norm and add ops give, in
their dtypes, and the decoder layer that calls it (pg_edge.cpu.layers.CpuDecoderLayer) decodes
as the model class does. `ext`: tests/cpu/conftest.py."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import layers, ops
from pg_edge.model.gemma import DecoderLayer

EPS = 1e-6
DTYPES = [(mx.float32, mx.float32), (mx.float32, mx.bfloat16), (mx.bfloat16, mx.bfloat16),
          (mx.bfloat16, mx.float32), (mx.float16, mx.float16)]


def close(got, ref, dtype):
    """Equal but for the sum of squares' order: a float32 step, or one step of a 16-bit dtype."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = {mx.float32: 1e-5, mx.bfloat16: 2 ** -7, mx.float16: 2 ** -10}[got.dtype]
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32)),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("xd,wd", DTYPES)
def test_every_form_equals_the_models_ops(ext, xd, wd):
    key = mx.random.key(7)
    x = (mx.random.normal((2, 3, 2304), key=key) * 3).astype(xd)
    y = mx.random.normal((2, 3, 2304), key=mx.random.key(8)).astype(xd)
    wy, wn = ((mx.random.normal((2304,), key=mx.random.key(k)) * 0.3).astype(wd) for k in (9, 10))
    norm = lambda v, w: ops.rms_norm(v, w, EPS)  # noqa: E731

    (n,) = ext.rms_norm_add(x, w_n=wn, eps=EPS)
    close(n, norm(x, wn), xd)
    h, n = ext.rms_norm_add(x, y, wy, wn, eps=EPS)  # Gemma2: post-attention norm, add, pre-MLP norm
    close(h, x + norm(y, wy), xd)
    close(n, norm(x + norm(y, wy), wn), xd)
    (h,) = ext.rms_norm_add(x, y, wy, eps=EPS)  # Gemma2's layer end
    close(h, x + norm(y, wy), xd)
    h, n = ext.rms_norm_add(x, y, None, wn, eps=EPS)  # Gemma 1: add, then the pre-MLP norm
    assert mx.array_equal(h, x + y).item()
    close(n, norm(x + y, wn), xd)


def test_strided_inputs_and_many_rows(ext):
    base = mx.random.normal((300, 2, 512), key=mx.random.key(1))
    x = base.transpose(1, 0, 2)  # rows not contiguous
    y = mx.random.normal((2, 300, 512), key=mx.random.key(2))
    wy, wn = mx.random.normal((512,)) * 0.2, mx.random.normal((512,)) * 0.2
    h, n = ext.rms_norm_add(x, y, wy, wn, eps=EPS)  # 600 rows: split over the pool
    close(h, x + ops.rms_norm(y, wy, EPS), mx.float32)
    close(n, ops.rms_norm(x + ops.rms_norm(y, wy, EPS), wn, EPS), mx.float32)
    # odd widths (no whole block of 8) and a zero row (its norm is 0, not NaN)
    z = mx.concatenate([mx.zeros((1, 37)), mx.random.normal((2, 37))])
    (n,) = ext.rms_norm_add(z, w_n=mx.zeros((37,)), eps=EPS)
    close(n, ops.rms_norm(z, mx.zeros((37,)), EPS), mx.float32)
    assert not mx.any(mx.isnan(n)).item()


def test_bad_input_is_a_clear_error(ext):
    x, w = mx.ones((2, 8)), mx.ones((8,))
    with pytest.raises(ValueError, match="nothing to compute"):
        ext.rms_norm_add(x, eps=EPS)
    with pytest.raises(ValueError, match="give y"):
        ext.rms_norm_add(x, w_y=w, w_n=w, eps=EPS)
    with pytest.raises(ValueError, match="x's shape"):
        ext.rms_norm_add(x, mx.ones((2, 4)), eps=EPS)
    with pytest.raises(ValueError, match=r"weights \[D\]"):
        ext.rms_norm_add(x, w_n=mx.ones((4,)), eps=EPS)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ext.rms_norm_add(x.astype(mx.int32), w_n=w, eps=EPS)


@pytest.mark.parametrize("version", [1, 2])
def test_decoder_layer_decodes_as_the_model_class(count_calls, converted, sample_images, version, monkeypatch):
    pg = pg_edge.load(converted(version=version, dtype="bfloat16"))
    if cpu.policy() != "cpu":
        pytest.skip("the CPU variants are swapped in on the CPU backend only")
    decoder = pg.model.language_model.model
    assert all(type(layer) is layers.CpuDecoderLayer for layer in decoder.layers)
    calls = count_calls("rms_norm_add")
    image = sample_images[0]
    ours = pg.generate(image, "caption en", max_tokens=6)
    per_layer = 3 if version == 2 else 2  # Gemma 1 has no sandwich norms
    assert len(calls) >= per_layer * len(decoder.layers) * 5  # every decode step took it
    calls.clear()
    monkeypatch.setattr(layers.CpuDecoderLayer, "__call__", DecoderLayer.__call__)
    plain = pg.generate(image, "caption en", max_tokens=6)
    assert calls == []
    assert ours.tokens == plain.tokens


def test_float32_model_keeps_the_model_class(converted):
    pg = pg_edge.load(converted(version=2, dtype="float32"))
    assert not any(type(layer) is layers.CpuDecoderLayer for layer in pg.model.language_model.model.layers)
