"""pg_edge's bf16 products on AMX (pg_edge/cpu/qmv/bf16_gemm.cpp, amx.cpp): many-row products of
bf16 / fp16 and 4/8-bit weights on Intel AMX tiles, x rounded to bfloat16 and sums in float32. The kernels run only on a
CPU with AMX-BF16 (and an OS that grants the tile state): elsewhere the products take the float32
GEMM (tests/cpu/test_cpu_float32.py, test_dequantize.py) and these tests say so in their skip."""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from pg_edge.cpu import products, qmv, streams


@pytest.fixture(scope="module")
def amx(ext):
    if ext.bf16_kernel() != "amx":
        pytest.skip("this CPU or OS has no AMX-BF16: prefill takes the float32 GEMM, tested elsewhere")
    return ext


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float64."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def rel_err(got: mx.array, want: np.ndarray) -> float:
    return float(np.abs(np.array(got, dtype=np.float64) - want).max() / np.abs(want).max())


# (M, N, K): tails in every dimension (M % 16, N % 16 and N % 32, K % 32, K past one 1024-chunk)
SHAPES = [(1, 16, 32), (17, 48, 40), (33, 200, 1152), (40, 4304 // 8, 4304), (70, 352, 2176)]


@pytest.mark.parametrize("wdt", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float_weights(amx, wdt, M, N, K):
    rng = np.random.default_rng(M * N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(wdt)
    got = amx.bf16_matmul(mx.array(x), w)
    assert got.dtype == mx.float32 and got.shape == (M, N)
    # fp16 weights are widened exactly and rounded to bf16 like x
    want = bf16_round(x) @ bf16_round(np.array(w.astype(mx.float32))).T
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdt", [mx.bfloat16, mx.float32])
def test_quantized_weights(amx, bits, gs, sdt):
    M, N, K = 37, 80, 1280  # two K chunks, the second partial
    rng = np.random.default_rng(bits * gs)
    x = rng.standard_normal((2, M, K)).astype(np.float32)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    s, b = s.astype(sdt), b.astype(sdt)
    got = amx.bf16_quantized_matmul(mx.array(x), wq, s, b, gs, bits)
    assert got.shape == (2, M, N)
    # the weights as the kernel dequantizes them (dq.cpp's float32, equal to MLX's within rounding:
    # test_dequantize.py), then rounded to bf16
    wd = np.array(amx.dequantize(wq, s, b, gs, bits))
    want = bf16_round(x.reshape(-1, K)) @ bf16_round(wd).T
    assert rel_err(got.reshape(-1, N), want) < 1e-5


def test_strided_and_16_bit_x_read_as_float32(amx):
    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((64, 96)).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal((96, 40)).astype(np.float32)).T  # [40, 96], a transposed view
    want = bf16_round(np.array(x)) @ bf16_round(np.array(w.astype(mx.float32))).T
    assert rel_err(amx.bf16_matmul(x, w), want) < 1e-5
    xb = x.astype(mx.bfloat16)
    assert rel_err(amx.bf16_matmul(xb, w), want) < 1e-5  # bf16 x: the same values


def test_bad_input_is_refused(amx):
    w = mx.zeros((32, 64), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match="does not match"):
        amx.bf16_matmul(mx.zeros((4, 48)), w)
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        amx.bf16_matmul(mx.zeros((4, 64)), mx.zeros((32, 64)))
    wq, s, b = mx.quantize(mx.zeros((32, 64)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="bits"):
        amx.bf16_quantized_matmul(mx.zeros((4, 64)), wq, s, b, 64, 3)


def test_prefill_takes_it_decode_training_and_tracing_do_not(amx, monkeypatch):
    monkeypatch.setattr(products, "BF16_MIN_ELEMENTS", 256 * 128)
    calls = []
    for name in ("bf16_float_product", "bf16_quantized_product"):
        real = getattr(qmv, name)
        monkeypatch.setattr(qmv, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    lin = nn.Linear(256, 128, bias=True)
    lin.set_dtype(mx.bfloat16)
    lin.eval()
    lin.__class__ = products.CpuLinear
    q = nn.QuantizedLinear(256, 128, bias=False, group_size=64, bits=4)
    q.eval()
    q.__class__ = products.CpuQuantizedLinear
    x = mx.random.normal((1, products.DENSE_ROWS + 1, 256), key=mx.random.key(0))
    want = x @ lin.weight.astype(mx.float32).T + lin.bias.astype(mx.float32)
    y = lin(x)
    assert y.dtype == mx.float32 and mx.allclose(y, want, rtol=2e-2, atol=2e-2)
    wd = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=64, bits=4).astype(mx.float32)
    assert mx.allclose(q(x), x @ wd.T, rtol=2e-2, atol=2e-2)
    assert calls == ["bf16_float_product", "bf16_quantized_product"]
    calls.clear()
    lin(x[:, :1]), q(x[:, :1])  # decode rows: the matvecs
    with streams.tracing_on():  # export / compile: MLX's own ops
        lin(x), q(x)
    lin.train(), q.train()  # training: differentiable ops
    lin(x), q(x)
    lin.eval(), q.eval()
    monkeypatch.setattr(products, "BF16_MIN_ELEMENTS", 256 * 128 + 1)  # small weights: the float32 GEMM
    lin(x), q(x)
    assert calls == []


def test_turned_off_by_the_environment(amx):
    code = "from pg_edge.cpu import qmv; print(qmv.bf16_prefill(), qmv.prefill_kernel())"
    env = {**os.environ, "PG_EDGE_PREFILL": "float32"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False" and "float32 BLAS" in out
    env.pop("PG_EDGE_PREFILL")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "True" and "AMX" in out
