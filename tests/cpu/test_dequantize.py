"""pg_edge.cpu.qmv's compiled dequantization equals mx.dequantize, and a quantized layer's
prefill (the dense path of pg_edge/cpu/products.py) takes it when built, MLX's otherwise, with
the same product. `ext`: tests/cpu/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from pg_edge.cpu import products, qmv, streams


def quantized(n, k, gs, bits, dtype, seed=0):
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    return mx.quantize(w, group_size=gs, bits=bits)


def mlx_dequantized(wq, s, b, gs, bits):
    f = mx.float32
    return mx.dequantize(wq, s.astype(f), b.astype(f), group_size=gs, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdt", [mx.float32, mx.bfloat16, mx.float16])
def test_equals_mlx_dequantize(ext, bits, gs, sdt):
    for i, (n, k) in enumerate([(1, gs), (37, 640), (5, 2304)]):
        wq, s, b = quantized(n, k, gs, bits, sdt, seed=i)
        got = ext.dequantize(wq, s, b, gs, bits)
        assert got.dtype == mx.float32 and got.shape == (n, k)
        # scale * q + bias in one fused multiply-add against MLX's two roundings
        assert mx.allclose(got, mlx_dequantized(wq, s, b, gs, bits), rtol=0, atol=1e-6)


def test_row_ranges_and_every_kernel(ext):
    """A row range (what the dense path passes, one piece per CPU stream) and the AVX2 and plain
    C++ kernels (PG_EDGE_QMV_SIMD caps the choice; read once, so in fresh processes)."""
    wq, s, b = quantized(300, 512, 64, 4, mx.bfloat16)
    assert mx.array_equal(ext.dequantize(wq[100:200], s[100:200], b[100:200], 64, 4),
                          ext.dequantize(wq, s, b, 64, 4)[100:200])
    code = """
import mlx.core as mx
from pg_edge.cpu import qmv
m = qmv.module()
for bits, gs in [(4, 32), (4, 128), (8, 32), (8, 64)]:
    w = mx.random.normal((33, 640), key=mx.random.key(bits + gs)) * 0.05
    wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits)
    ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    print(float(mx.max(mx.abs(m.dequantize(wq, s, b, gs, bits) - ref))))
"""
    for simd in ("avx2", "portable"):
        env = dict(os.environ, PG_EDGE_QMV_SIMD=simd)
        env.pop("PG_EDGE_QMV", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        errs = [float(e) for e in out.stdout.split()]
        assert len(errs) == 4 and max(errs) < 1e-6, (simd, out.stdout)


def test_bad_input_is_a_clear_error(ext):
    wq, s, b = quantized(8, 64, 32, 4, mx.float32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ext.dequantize(wq, s, b, 32, 2)
    with pytest.raises(ValueError, match="shapes"):
        ext.dequantize(wq, s[:, :1], b[:, :1], 32, 4)


def dense_layer(n, k, bits, gs):
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=gs, bits=bits)
    wq, s, b = quantized(n, k, gs, bits, mx.bfloat16, seed=n)
    layer.update({"weight": wq, "scales": s, "biases": b})
    layer.eval()
    layer.__class__ = products.CpuQuantizedLinear
    return layer


@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 32)])
def test_prefill_takes_it_and_gives_the_same_product(ext, monkeypatch, bits, gs):
    monkeypatch.setattr(qmv, "bf16_prefill", lambda *a, **k: False)  # the float32 GEMM (AMX: test_bf16_gemm.py)
    monkeypatch.setattr(qmv, "int8_prefill", lambda layer, x: False)  # (the int8 GEMM: test_qmv_int8.py)
    calls = []
    real = qmv.dequantize
    monkeypatch.setattr(qmv, "dequantize", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    # 2.3M weight elements: split into row pieces over the CPU streams
    layer = dense_layer(1000, 2304, bits, gs)
    x = mx.random.normal((1, products.DENSE_ROWS + 3, 2304), key=mx.random.key(2))
    y = layer(x)
    assert len(calls) >= 2 and sum(c[0] for c in calls) == 1000
    ref = x @ mlx_dequantized(layer["weight"], layer["scales"], layer["biases"], gs, bits).T
    assert mx.allclose(y, ref, rtol=1e-4, atol=1e-4)
    calls.clear()
    layer(x.astype(mx.bfloat16))  # 16-bit activations: MLX's dequantize in their dtype
    with streams.tracing_on():  # export / compile: MLX's own ops, which they can serialize
        layer(x)
    layer.train()  # training: MLX's differentiable ops
    layer(x)
    assert calls == []
