"""pg_edge.cpu.qmv's compiled tanh GELU equals MLX's nn.gelu_approx within float32 rounding, and
the MLP variants (pg_edge/cpu/mlp.py) take it for every input size of 16-bit and quantized
models in inference only. `ext`: tests/cpu/conftest.py."""
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
from pg_edge.cpu import mlp, qmv, streams


def test_equals_mlx_gelu_approx(ext):
    # every lane width's tail (odd sizes), wide and extreme values
    for n, scale in [(1, 1.0), (37, 3.0), (70001, 4.0), (4096 * 3 + 5, 30.0)]:
        x = mx.random.normal((n,), key=mx.random.key(n)) * scale
        got, ref = ext.gelu_tanh(x), nn.gelu_approx(x)
        assert got.dtype == mx.float32 and got.shape == x.shape
        assert mx.allclose(got, ref, rtol=1e-5, atol=1e-6), n
    edges = mx.array([-1e4, -100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 100.0, 1e4])
    assert mx.allclose(ext.gelu_tanh(edges), nn.gelu_approx(edges), rtol=1e-5, atol=1e-6)
    xb = (mx.random.normal((3, 1000)) * 3).astype(mx.bfloat16)
    got = ext.gelu_tanh(xb)
    assert got.dtype == mx.bfloat16
    # float32 maths, one rounding to bf16 at the end: within one bf16 step of MLX's
    ref = nn.gelu_approx(xb.astype(mx.float32))
    assert mx.allclose(got.astype(mx.float32), ref, rtol=2 ** -7, atol=1e-6)


def test_every_kernel_gives_the_same_values(ext):
    code = """
import mlx.core as mx, mlx.nn as nn
from pg_edge.cpu import qmv
x = mx.random.normal((5, 4099), key=mx.random.key(3)) * 5
print(qmv.module().simd(), float(mx.max(mx.abs(qmv.module().gelu_tanh(x) - nn.gelu_approx(x)))))
"""
    for simd in ("avx2", "portable"):
        env = dict(os.environ, PG_EDGE_QMV_SIMD=simd)
        env.pop("PG_EDGE_QMV", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        level, err = out.stdout.split()
        assert level in (simd, "portable") and float(err) < 1e-5, out.stdout


def test_bad_input_is_a_clear_error(ext):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ext.gelu_tanh(mx.ones((4,), dtype=mx.float16))


def test_mlp_variants_take_it_in_inference(ext, monkeypatch):
    calls = []
    real = ext.gelu_tanh
    monkeypatch.setattr(qmv, "module", lambda: type("M", (), {"gelu_tanh": staticmethod(
        lambda x: calls.append(x.shape) or real(x))})())
    layer = mlp.CpuSiglipMLP.__new__(mlp.CpuSiglipMLP)
    nn.Module.__init__(layer)
    layer.act = nn.gelu_approx
    layer.fc1, layer.fc2 = nn.Linear(64, 1024), nn.Linear(1024, 64)
    layer.eval()
    x = mx.random.normal((1, 80, 64))  # prefill-sized: 80 x 1024 hidden units
    y = layer(x)
    one = layer(x[:, :1])  # decode-sized: one row, the kernel too
    assert calls == [(1, 80, 1024), (1, 1, 1024)]
    ref = layer.fc2(nn.gelu_approx(layer.fc1(x)))
    assert mx.allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert mx.allclose(one, ref[:, :1], rtol=1e-4, atol=1e-5)
    calls.clear()
    with streams.tracing_on():
        layer(x)
    layer.train()
    layer(x)
    layer.eval()
    layer.act = nn.gelu  # the exact GELU is not this kernel's
    layer(x)
    assert calls == []


def test_bf16_model_uses_it_with_the_same_tokens(ext, converted, sample_images, monkeypatch):
    folder = converted(version=2, dtype="bfloat16")
    pg = pg_edge.load(folder)
    if cpu.policy() != "cpu":
        pytest.skip("the CPU variants are swapped in on the CPU backend only")
    kinds = {type(m) for _, m in pg.model.named_modules()}
    assert {mlp.CpuMLP, mlp.CpuSiglipMLP} <= kinds
    image = sample_images[0]
    ours = pg.logits(image, "caption en")
    tokens = pg.generate(image, "caption en", max_tokens=6).tokens
    monkeypatch.setenv("PG_EDGE_QMV", "off")
    qmv.reset()
    try:
        plain = pg_edge.load(folder)
        np.testing.assert_allclose(ours, plain.logits(image, "caption en"), rtol=1e-3, atol=1e-3)
        assert plain.generate(image, "caption en", max_tokens=6).tokens == tokens
    finally:
        monkeypatch.undo()
        qmv.reset()


def test_float32_model_keeps_the_model_classes(converted):
    pg = pg_edge.load(converted(version=2, dtype="float32"))
    kinds = {type(m) for _, m in pg.model.named_modules()}
    assert not kinds & {mlp.CpuMLP, mlp.CpuSiglipMLP}
