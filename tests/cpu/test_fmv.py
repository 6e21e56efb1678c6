"""pg_edge.cpu.qmv's compiled 16-bit float matvec (fmv.cpp): x @ w.T for bfloat16 / float16
weights equals the float32 product of the same numbers, at each SIMD level; the CPU backend takes
it for decode-sized products of 16-bit weights (Linear and the tied LM head) and a bf16 model
decodes the same tokens with it and without it. The `ext` fixture (tests/cpu/conftest.py) builds
the module when it is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import products, qmv, streams


def truth(x, w):
    """The product of x's and w's values (as stored) in float64."""
    return np.array(x.astype(mx.float32), dtype=np.float64) @ np.array(w.astype(mx.float32), dtype=np.float64).T


def rel_err(y, ref):
    return float(np.abs(np.array(y.astype(mx.float32)) - ref).max() / np.abs(ref).max())


def promoted(xdt, wdt):
    return xdt if xdt == wdt else mx.float32  # bf16 with fp16 promotes to float32 too


@pytest.mark.parametrize("wdt", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16, mx.float16])
def test_equals_the_float32_product(ext, wdt, xdt):
    # every row count up to qmv.MAX_ROWS; K below, at and past the vector widths (8, 16) with
    # tails of every kind; N not a multiple of the kernel's 4-row tiles
    for rows in range(1, qmv.MAX_ROWS + 1):
        for k in (1, 7, 16, 23, 40, 264):
            n = 37 + rows
            w = (mx.random.normal((n, k), key=mx.random.key(rows * 1000 + k)) * 0.1).astype(wdt)
            x = mx.random.normal((rows, k), key=mx.random.key(k)).astype(xdt)
            y = ext.float_matvec(x, w)
            assert y.shape == (rows, n) and y.dtype == promoted(xdt, wdt)
            tol = 1e-5 if y.dtype == mx.float32 else 1e-2  # 16-bit outputs: their own rounding
            assert rel_err(y, truth(x, w)) < tol, (rows, k, xdt, wdt)


def test_big_product_over_threads_strided_x_and_w_views(ext):
    # 4099 x 2304: split over the thread pool; x a transposed (strided) view with leading dims
    w = (mx.random.normal((4099, 2304), key=mx.random.key(1)) * 0.02).astype(mx.bfloat16)
    xt = mx.random.normal((2304, 3), key=mx.random.key(2))
    x = xt.T.reshape(3, 1, 2304)
    y = ext.float_matvec(x, w)
    assert y.shape == (3, 1, 4099) and rel_err(y.reshape(3, 4099), truth(xt.T, w)) < 1e-5
    # each output is one dot product, whichever thread and tile computed it
    assert mx.array_equal(y[:1, 0], ext.float_matvec(xt.T[:1], w))
    # a weight view that is not row-contiguous (every other column) is read through its strides
    wv = w[:300, ::2]
    xv = mx.random.normal((2, 1152), key=mx.random.key(3)).astype(mx.bfloat16)
    assert rel_err(ext.float_matvec(xv, wv), truth(xv, wv)) < 1e-2


@pytest.mark.parametrize("simd", ["avx2", "portable"])
def test_lower_kernels_and_one_thread(ext, simd):
    """The AVX2 kernel and the plain C++ one (PG_EDGE_QMV_SIMD caps the choice; on a CPU without
    AVX2 the "avx2" run is the portable kernel again) on one thread, in a fresh process (both are
    read once): the same products as the float32 truth, tails included."""
    code = """
import mlx.core as mx, numpy as np
from pg_edge.cpu import qmv
m = qmv.module()
print(m.simd(), m.threads())
for wdt in (mx.bfloat16, mx.float16):
    for rows, k in [(1, 2304), (3, 23), (5, 100), (8, 7)]:
        w = (mx.random.normal((41, k), key=mx.random.key(k)) * 0.1).astype(wdt)
        x = mx.random.normal((rows, k), key=mx.random.key(rows))
        ref = np.array(x, dtype=np.float64) @ np.array(w.astype(mx.float32), dtype=np.float64).T
        print(float(np.abs(np.array(m.float_matvec(x, w)) - ref).max() / np.abs(ref).max()))
"""
    env = dict(os.environ, PG_EDGE_QMV_SIMD=simd, PG_EDGE_QMV_THREADS="1")
    env.pop("PG_EDGE_QMV", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ((simd, "portable") if simd == "avx2" else ("portable",)) and out[1] == "1"
    assert len(out) == 10 and all(float(e) < 1e-5 for e in out[2:])


def test_bad_input_is_a_clear_error(ext):
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ext.float_matvec(mx.ones((1, 8)), mx.ones((4, 8)))
    with pytest.raises(ValueError, match="shapes"):
        ext.float_matvec(mx.ones((1, 8)), mx.ones((4, 9), dtype=mx.bfloat16))


def counted(monkeypatch):
    """Shapes of the weights qmv.float_product is called with, as they happen."""
    calls = []
    real = qmv.float_product
    monkeypatch.setattr(qmv, "float_product", lambda w, x: calls.append(w.shape) or real(w, x))
    return calls


def test_backend_takes_it_for_16_bit_decode_only(ext, monkeypatch):
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)  # cpu.apply leaves small layers plain
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    calls = counted(monkeypatch)
    lin = nn.Linear(256, 96)
    lin.set_dtype(mx.bfloat16)
    cpu.apply(lin, "cpu")
    lin.eval()
    assert type(lin) is products.CpuLinear
    x = mx.random.normal((1, 2, 256), key=mx.random.key(4)).astype(mx.bfloat16)
    y = lin(x)
    assert calls == [(96, 256)] and y.dtype == mx.bfloat16 and y.shape == (1, 2, 96)
    want = truth(x.reshape(2, 256), lin.weight) + np.array(lin.bias.astype(mx.float32))
    assert rel_err(y.reshape(2, 96), want) < 1e-2
    calls.clear()
    lin(mx.random.normal((1, qmv.MAX_ROWS + 1, 256)).astype(mx.bfloat16))  # prefill-sized
    with streams.tracing_on():
        lin(x)  # a traced graph: MLX's ops
    lin.train()
    lin(x)  # training: MLX's differentiable matmul
    assert calls == []
    # float32 weights keep MLX's product (BLAS sgemv)
    lin32 = nn.Linear(256, 96)
    cpu.apply(lin32, "cpu")
    lin32.eval()
    lin32(mx.random.normal((1, 256)))
    assert calls == []


def test_tied_head_takes_it(ext, monkeypatch):
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    calls = counted(monkeypatch)
    emb = nn.Embedding(1000, 64)
    emb.set_dtype(mx.float16)
    cpu.apply(emb, "cpu")
    emb.eval()
    h = mx.random.normal((1, 1, 64), key=mx.random.key(6))
    y = emb.as_linear(h)
    assert calls == [(1000, 64)] and y.dtype == mx.float32  # promote(float32 x, float16 w)
    assert rel_err(y.reshape(1, 1000), truth(h.reshape(1, 64), emb.weight)) < 1e-5


def test_bf16_model_greedy_decode_same_tokens_with_and_without(ext, converted, monkeypatch):
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    folder = converted(version=2, dtype="bfloat16")
    # every layer swapped for its CPU variant (at real widths all are: 2M+ weight elements)
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    pg = pg_edge.load(folder)
    if cpu.policy() != "cpu":
        pytest.skip("the CPU variants are swapped in on the CPU backend only")
    calls = counted(monkeypatch)
    on = pg.generate(image, "caption en", max_tokens=8).tokens
    vocab = pg.model.language_model.model.embed_tokens.weight.shape[0]
    assert calls and (vocab, calls[0][1]) in calls  # the decoder's layers and the tied LM head
    monkeypatch.setenv("PG_EDGE_QMV", "off")  # off: the same variants, MLX's matmul split over streams
    qmv.reset()
    try:
        assert qmv.module() is None
        calls.clear()
        off = pg_edge.load(folder).generate(image, "caption en", max_tokens=8).tokens
        assert calls == [] and len(on) >= 2
        assert on == off
    finally:
        monkeypatch.undo()
        qmv.reset()
