"""pg_edge's bf16 products (pg_edge/cpu/qmv/bf16_gemm.cpp): many-row products of bf16 / fp16 and
4/8-bit weights with x rounded to bfloat16 and sums in float32, on Intel AMX tiles (amx.cpp) or,
without AMX, by AVX512-BF16's VDPBF16PS (qmm_bf16dot.cpp: AMD Zen 4/5). The same numbers either
way: the tests below run on whichever this CPU has, and the AVX512-BF16 kernel also in a child
process (PG_EDGE_PREFILL=avx512bf16) on an AMX CPU. Without either the products take the int16 GEMM
(tests/cpu/test_qmm_int16.py) or the float32 one (test_cpu_float32.py, test_dequantize.py), and
these tests say so in their skip."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from pg_edge.cpu import products, qmv, streams


KERNEL_NAMES = {"amx": "AMX", "avx512bf16": "AVX512-BF16"}


@pytest.fixture(scope="module")
def amx(ext):
    """The module, where its bf16 products round x to bfloat16 (AMX or AVX512-BF16)."""
    if ext.bf16_kernel() not in KERNEL_NAMES:
        pytest.skip(f"this CPU or OS has neither AMX-BF16 nor AVX512-BF16 (prefill kernel: "
                    f"{ext.bf16_kernel()}): tested in test_qmm_int16.py / test_cpu_float32.py")
    return ext


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


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
    bits = 4 if amx.bf16_kernel() == "amx" else 8  # 4-bit: the int8 GEMM there (test_qmv_int8.py)
    calls = []
    for name in ("bf16_float_product", "bf16_quantized_product"):
        real = getattr(qmv, name)
        monkeypatch.setattr(qmv, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    lin = nn.Linear(256, 128, bias=True)
    lin.set_dtype(mx.bfloat16)
    lin.eval()
    lin.__class__ = products.CpuLinear
    q = nn.QuantizedLinear(256, 128, bias=False, group_size=64, bits=bits)
    q.eval()
    q.__class__ = products.CpuQuantizedLinear
    x = mx.random.normal((1, products.DENSE_ROWS + 1, 256), key=mx.random.key(0))
    want = x @ lin.weight.astype(mx.float32).T + lin.bias.astype(mx.float32)
    y = lin(x)
    assert y.dtype == mx.float32 and mx.allclose(y, want, rtol=2e-2, atol=2e-2)
    wd = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=64, bits=bits).astype(mx.float32)
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
    assert out.split()[0] == "True" and KERNEL_NAMES[amx.bf16_kernel()] in out


CHILD = """
import json
import numpy as np, mlx.core as mx
from pg_edge.cpu import qmv
m = qmv.module()
print(m.bf16_kernel(), qmv.bf16_prefill(), "|", qmv.prefill_kernel())

def bf16_round(a):
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)

def rel(got, want):
    return float(np.abs(np.array(got, dtype=np.float64) - want).max() / np.abs(want).max())

rng = np.random.default_rng(0)
errs = []
for M, N, K, kind in [(1, 16, 32, "bf16"), (13, 48, 48, "fp16"), (259, 200, 2304, "bf16"),
                      (40, 538, 4304, "fp16"), (27, 1003, 2176, "q8"), (12, 77, 1280, "q4")]:
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32))
    if kind in ("q8", "q4"):
        wq, s, b = mx.quantize(w, group_size=64, bits=int(kind[1]))
        got = m.bf16_quantized_matmul(mx.array(x), wq, s, b, 64, int(kind[1]))
        wd = np.array(m.dequantize(wq, s, b, 64, int(kind[1])))
    else:
        w = w.astype(mx.bfloat16 if kind == "bf16" else mx.float16)
        got = m.bf16_matmul(mx.array(x), w)
        wd = np.array(w.astype(mx.float32))
    want = bf16_round(x) @ bf16_round(wd).T
    exact = x.astype(np.float64) @ wd.astype(np.float64).T
    errs.append((rel(got, want), rel(got, exact)))
x = np.ones((3, 64), np.float32)
x[1, 5], x[2, 7] = np.inf, np.nan
ends = np.array(m.bf16_matmul(mx.array(x), mx.ones((32, 64)).astype(mx.bfloat16)))[:, 0].tolist()
print(json.dumps({"errs": errs, "ends": ends}))
"""


def test_avx512_bf16_kernel_in_a_child_process(ext):
    """PG_EDGE_PREFILL=avx512bf16 (AMX off): VDPBF16PS, x rounded to bfloat16, tails of M (tiles of
    12 rows), N (panels of 32), K (chunks of 1024), fp16 and 4/8-bit weights; inf / NaN pass."""
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16")
    env = {**os.environ, "PG_EDGE_PREFILL": "avx512bf16"}
    env.pop("PG_EDGE_QMV_SIMD", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    head, data = out.splitlines()[0], json.loads(out.splitlines()[1])
    assert head.startswith("avx512bf16 True |") and "bfloat16 on AVX512-BF16" in head
    for to_bf16, to_exact in data["errs"]:
        assert to_bf16 < 1e-5  # the product of x rounded to bf16: AMX's numbers
        assert to_exact > 1e-4  # and not the float32 one
    assert data["ends"][:2] == [64.0, float("inf")] and np.isnan(data["ends"][2])
    env["PG_EDGE_PREFILL"] = "int16"  # the integer kernels instead
    out = subprocess.run([sys.executable, "-c", "from pg_edge.cpu import qmv; print(qmv.module().bf16_kernel())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "int16"
