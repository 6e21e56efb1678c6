"""pg_edge's int8 decode matvec (pg_edge/cpu/qmv/qmv_int8.cpp): 4-bit weights of 2^20+ elements,
x rounded to int8 per group of the weights' group size and summed in int32, on AVX512-VNNI or
AVX2 (the AVX2 kernel is also run here under PG_EDGE_QMV_SIMD=avx2). On a CPU with neither these
products take the float32 kernels of tests/cpu/test_qmv.py, and these tests say so in their skip."""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cpu import qmv

BIG = 1 << 20  # qmv_int8.h kInt8MinElements: the smallest weight (N * K) that takes the kernel


@pytest.fixture(scope="module")
def vnni(ext):
    """The module, where this CPU runs the int8 kernel (AVX512-VNNI, else AVX2)."""
    if ext.decode_kernel() == "float32":
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2 (or PG_EDGE_DECODE=float32): 4-bit decode "
                    "takes the float32 kernels, tested in test_qmv.py")
    return ext


def quantized(N: int, K: int, gs: int, bits: int, sdt, seed: int):
    """A random [N, K] weight quantized by mx.quantize, its scales and biases in `sdt`."""
    w = mx.array(np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.02)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return w, wq, s.astype(sdt), b.astype(sdt)


def exact(x: np.ndarray, wq, s, b, gs: int, bits: int) -> np.ndarray:
    """x @ dequantize(w).T in float64."""
    wd = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits),
                  dtype=np.float64)
    return x.astype(np.float64) @ wd.T


def rounding_bound(x: np.ndarray, wq, s, b, gs: int) -> np.ndarray:
    """The most that rounding x to int8 per group (step max|x_g| / 127, error <= half a step per
    element) can move each output, times the centred weights the kernel multiplies it by:
    sum_k |scale_g (q_k - 8)| * step_g / 2, [M, N]."""
    N, K = wq.shape[0], x.shape[1]
    q = np.array(mx.dequantize(wq, mx.ones(s.shape), mx.zeros(s.shape), group_size=gs, bits=4), dtype=np.float64)
    centred = np.abs((q - 8).reshape(N, K // gs, gs) * np.array(s.astype(mx.float32))[:, :, None])
    step = np.abs(x.astype(np.float64)).reshape(x.shape[0], K // gs, gs).max(-1) / 127  # [M, G]
    return np.einsum("ng,mg->mn", centred.sum(-1), step / 2)


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdt", [mx.bfloat16, mx.float32, mx.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
def test_within_the_rounding_of_x(vnni, gs, sdt, M):
    N, K = 512, 2304  # 2^20 + 128K elements; K = 18 blocks of 128
    w, wq, s, b = quantized(N, K, gs, 4, sdt, seed=gs + M)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    x[:, :gs] *= 40  # one group far larger than the rest: its own step, the others unaffected
    got = np.array(vnni.quantized_matvec(mx.array(x), wq, s, b, gs, 4), dtype=np.float64)
    want = exact(x, wq, s, b, gs, 4)
    err = np.abs(got - want)
    assert (err <= rounding_bound(x, wq, s, b, gs) * 1.001 + 1e-4 * np.abs(want).max()).all()
    # the kernel did round x (the float32 kernel agrees to ~1e-6): the int8 path ran
    assert err.max() > 1e-5 * np.abs(want).max()
    # and the rounding is far below the 4-bit weights' own: against the unquantized weight
    # the outputs' RMS error grows by under 2%
    full = x.astype(np.float64) @ np.array(w, dtype=np.float64).T
    rms = lambda a: float(np.sqrt((a ** 2).mean()))  # noqa: E731
    assert rms(got - full) < 1.02 * rms(want - full)
    assert rms(got - want) < 0.01 * rms(want)


def test_layout_of_x_and_groups(vnni):
    """One x element at a time: each lands on its own weight column (the even/odd nibble order and
    the lanes' groups), exact because one nonzero per group rounds to +-127 steps exactly."""
    N, K, gs = 1024, 1024, 32
    _, wq, s, b = quantized(N, K, gs, 4, mx.float32, seed=7)
    wd = np.array(mx.dequantize(wq, s, b, group_size=gs, bits=4), dtype=np.float64)
    for k in (0, 1, 2, 7, 8, 63, 64, 65, 127, 128, 129, 1000, 1023):
        x = np.zeros((1, K), np.float32)
        x[0, k] = -1.5
        got = np.array(vnni.quantized_matvec(mx.array(x), wq, s, b, gs, 4), dtype=np.float64)[0]
        np.testing.assert_allclose(got, -1.5 * wd[:, k], rtol=1e-5, atol=1e-6)


def test_zero_rows_and_groups(vnni):
    N, K, gs = 1024, 1024, 64
    _, wq, s, b = quantized(N, K, gs, 4, mx.bfloat16, seed=3)
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    x[0] = 0
    x[1, 128:512] = 0  # whole groups of zeros: step 0, no division by it
    got = np.array(vnni.quantized_matvec(mx.array(x), wq, s, b, gs, 4), dtype=np.float64)
    assert np.isfinite(got).all() and (got[0] == 0).all()
    want = exact(x, wq, s, b, gs, 4)
    assert np.abs(got[1:] - want[1:]).max() < 0.01 * np.abs(want[1:]).max()


@pytest.mark.parametrize("K,gs", [(64, 64), (64, 32), (192, 64), (320, 32)])
def test_k_a_multiple_of_64_not_of_128(vnni, K, gs):
    """K a multiple of 64 but not of 128 (the narrow-deep bench's width 64): the AVX2 kernel's
    blocks of 64, on an AVX512-VNNI CPU too, within the bound of x's rounding."""
    N = -(-BIG // K)  # at least 2^20 elements
    _, wq, s, b = quantized(N, K, gs, 4, mx.bfloat16, seed=K + gs)
    x = np.random.default_rng(K).standard_normal((2, K)).astype(np.float32)
    got = np.array(vnni.quantized_matvec(mx.array(x), wq, s, b, gs, 4), dtype=np.float64)
    want = exact(x, wq, s, b, gs, 4)
    err = np.abs(got - want)
    assert (err <= rounding_bound(x, wq, s, b, gs) * 1.001 + 1e-4 * np.abs(want).max()).all()
    assert err.max() > 1e-5 * np.abs(want).max()  # x was rounded: the int8 path ran


def test_what_keeps_the_float32_kernel(vnni):
    """Small weights (the demo model's), 8-bit weights, K not a multiple of 64, and an x holding
    inf or NaN take the float32 kernel: they agree with MLX's product to float32 rounding."""
    rng = np.random.default_rng(5)
    cases = [(1024, 1024 - 128, 64, 4),  # one block short of 2^20 elements
             (1024, 2304, 64, 8),         # 8 bits
             (1024, 1056, 32, 4)]         # K = 33 groups of 32: a part block on AVX-512 and AVX2
    for N, K, gs, bits in cases:
        _, wq, s, b = quantized(N, K, gs, bits, mx.float32, seed=N + K + bits)
        x = mx.array(rng.standard_normal((2, K)).astype(np.float32))
        got = vnni.quantized_matvec(x, wq, s, b, gs, bits)
        want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
        assert float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max()), (N, K, bits)
    _, wq, s, b = quantized(1024, 2304, 64, 4, mx.float32, seed=9)
    x = rng.standard_normal((2, 2304)).astype(np.float32)
    x[1, 5] = np.inf
    got = np.array(vnni.quantized_matvec(mx.array(x), wq, s, b, 64, 4))
    want = np.array(mx.quantized_matmul(mx.array(x), wq, s, b, transpose=True, group_size=64, bits=4))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)  # row 0 too: one kernel per call


def test_kernel_named_and_turned_off_by_the_environment(vnni):
    code = "from pg_edge.cpu import qmv; print(qmv.int8_decode(), qmv.kernel())"
    env = {**os.environ, "PG_EDGE_DECODE": "float32"}
    env.pop("PG_EDGE_QMV", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False" and "int8" not in out
    env.pop("PG_EDGE_DECODE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "True" and "int8 4-bit decode" in out
    assert qmv.int8_decode() and vnni.decode_kernel() in ("int8 on AVX512-VNNI", "int8 on AVX2")


AVX2_CODE = """
import sys
import mlx.core as mx, numpy as np
from pg_edge.cpu import qmv
m = qmv.module()
print(m.decode_kernel())
for gs, M in [(32, 1), (64, 3), (128, 5), (64, 8)]:
    w = mx.array(np.random.default_rng(gs + M).standard_normal((640, 2304)).astype(np.float32) * 0.02)
    wq, s, b = mx.quantize(w, group_size=gs, bits=4)
    x = mx.array(np.random.default_rng(M).standard_normal((M, 2304)).astype(np.float32))
    np.save(sys.argv[1] + f"/{gs}_{M}.npy", np.array(m.quantized_matvec(x, wq, s.astype(mx.bfloat16), b.astype(mx.bfloat16), gs, 4)))
"""


def test_avx2_kernel_agrees(vnni, tmp_path):
    """The AVX2 kernel (CPUs without AVX512-VNNI: PG_EDGE_QMV_SIMD=avx2 caps this one to it) rounds x
    the same way and sums the same integers: the same outputs to float32 rounding."""
    env = dict(os.environ, PG_EDGE_QMV_SIMD="avx2")
    env.pop("PG_EDGE_QMV", None)
    (tmp_path / "avx2").mkdir()
    out = subprocess.run([sys.executable, "-c", AVX2_CODE, str(tmp_path / "avx2")], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split("\n")[0] == "int8 on AVX2"
    (tmp_path / "here").mkdir()
    env.pop("PG_EDGE_QMV_SIMD")
    subprocess.run([sys.executable, "-c", AVX2_CODE, str(tmp_path / "here")], env=env, check=True)
    for f in sorted((tmp_path / "avx2").iterdir()):
        a, b = np.load(f), np.load(tmp_path / "here" / f.name)
        gs, M = map(int, f.stem.split("_"))
        w = mx.array(np.random.default_rng(gs + M).standard_normal((640, 2304)).astype(np.float32) * 0.02)
        wq, s, bb = mx.quantize(w, group_size=gs, bits=4)
        x = mx.array(np.random.default_rng(M).standard_normal((M, 2304)).astype(np.float32))
        want = np.array(mx.quantized_matmul(x, wq, s.astype(mx.bfloat16).astype(mx.float32),
                                            bb.astype(mx.bfloat16).astype(mx.float32), transpose=True, group_size=gs, bits=4))
        assert np.abs(a - b).max() <= 2e-6 * np.abs(b).max(), f.name  # the same int8 sums, other float order
        assert 1e-5 < np.abs(a - want).max() / np.abs(want).max() < 0.01, f.name  # x rounded, by little


# ------------------------------------------------------------------ prefill: the int8 GEMMs
# qmm_int8.cpp (AVX512-VNNI) and qmm_int8_avx2.cpp (AVX2; run here under PG_EDGE_QMV_SIMD=avx2 too)

@pytest.fixture(scope="module")
def gemm(vnni):
    """The module, where this CPU runs an int8 GEMM for many rows (AVX512-VNNI or AVX2)."""
    return vnni


MANY_ROWS = [(9, 1024), (10, 1007), (17, 1000), (40, 520), (64, 2304)]


def check_many_rows(got: np.ndarray, x: np.ndarray, wq, s, b, gs: int, one: np.ndarray) -> None:
    """got [M, N]: within the bound of x's rounding, rounded at all, and rows 0-2 the same
    numbers as the matvec's (`one`: the same rounding and integer sums)."""
    want = exact(x, wq, s, b, gs, 4)
    err = np.abs(got - want)
    assert (err <= rounding_bound(x, wq, s, b, gs) * 1.001 + 1e-4 * np.abs(want).max()).all()
    assert err.max() > 1e-5 * np.abs(want).max()  # rounded: the int8 GEMM ran
    np.testing.assert_allclose(got[:3], one, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def many_rows_case(gs: int, M: int, N: int):
    K = 2304
    _, wq, s, b = quantized(N, K, gs, 4, mx.bfloat16, seed=gs * M + N)
    x = np.random.default_rng(N).standard_normal((M, K)).astype(np.float32)
    x[:, gs:2 * gs] *= 30
    return x, wq, s, b


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("M,N", MANY_ROWS)
def test_many_rows_within_the_rounding_of_x(gemm, gs, M, N):
    """Prefill-sized x (more rows than the matvec's 8): panels of 32 (VNNI) or 16 (AVX2) weight
    rows, with N's tails; tiles of 6 or 3 x rows, with M's tails; each output within the bound
    of x's rounding."""
    x, wq, s, b = many_rows_case(gs, M, N)
    got = np.array(gemm.quantized_matvec(mx.array(x), wq, s, b, gs, 4), dtype=np.float64)
    one = np.array(gemm.quantized_matvec(mx.array(x[:3]), wq, s, b, gs, 4), dtype=np.float64)
    check_many_rows(got, x, wq, s, b, gs, one)


MANY_CODE = """
import sys
import mlx.core as mx, numpy as np
sys.path.insert(0, sys.argv[2])
from test_qmv_int8 import MANY_ROWS, many_rows_case
from pg_edge.cpu import qmv
m = qmv.module()
print(m.decode_kernel())
for gs in (32, 64, 128):
    for M, N in MANY_ROWS:
        x, wq, s, b = many_rows_case(gs, M, N)
        np.save(sys.argv[1] + f"/{gs}_{M}_{N}.npy", np.array(m.quantized_matvec(mx.array(x), wq, s, b, gs, 4)))
        np.save(sys.argv[1] + f"/{gs}_{M}_{N}_one.npy", np.array(m.quantized_matvec(mx.array(x[:3]), wq, s, b, gs, 4)))
"""


def test_avx2_gemm_within_the_rounding_of_x(gemm, tmp_path):
    """The AVX2 GEMM (int16 runs of eight quads, tiles of 3 rows) on a CPU that would take the
    VNNI one: capped by PG_EDGE_QMV_SIMD=avx2 in a child process."""
    if gemm.decode_kernel() == "int8 on AVX2":
        pytest.skip("this CPU runs the AVX2 GEMM itself: test_many_rows_within_the_rounding_of_x covers it")
    env = dict(os.environ, PG_EDGE_QMV_SIMD="avx2")
    env.pop("PG_EDGE_QMV", None)
    out = subprocess.run([sys.executable, "-c", MANY_CODE, str(tmp_path), os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "int8 on AVX2"
    for gs in (32, 64, 128):
        for M, N in MANY_ROWS:
            x, wq, s, b = many_rows_case(gs, M, N)
            got = np.load(tmp_path / f"{gs}_{M}_{N}.npy").astype(np.float64)
            check_many_rows(got, x, wq, s, b, gs, np.load(tmp_path / f"{gs}_{M}_{N}_one.npy").astype(np.float64))


def test_prefill_takes_it_without_amx(gemm, monkeypatch):
    """A 4-bit layer's many-row product goes to the int8 GEMM when the CPU has no AMX (here:
    bf16_prefill off); 8-bit layers, decode, training and tracing do not."""
    from pg_edge.cpu import products, streams
    import mlx.nn as nn

    monkeypatch.setattr(qmv, "bf16_prefill", lambda *a, **k: False)
    monkeypatch.setattr(qmv, "amx_prefill", lambda: False)
    monkeypatch.setitem(qmv._state, "int8_prefill", gemm.decode_kernel().removeprefix("int8 on "))
    calls = []
    real = qmv.product
    monkeypatch.setattr(qmv, "product", lambda layer, x: calls.append(x.shape[-2]) or real(layer, x))
    layers = {}
    for bits in (4, 8):
        q = nn.QuantizedLinear(1024, 1024, bias=False, group_size=64, bits=bits)
        q.eval()
        q.__class__ = products.CpuQuantizedLinear
        layers[bits] = q
    x = mx.random.normal((1, products.DENSE_ROWS + 3, 1024), key=mx.random.key(0))
    q4 = layers[4]
    wd = mx.dequantize(q4["weight"], q4["scales"], q4["biases"], group_size=64, bits=4)
    y = q4(x)
    assert mx.allclose(y, x @ wd.T, rtol=0.05, atol=0.02 * float(mx.abs(x @ wd.T).max()))
    assert calls == [products.DENSE_ROWS + 3]
    calls.clear()
    layers[8](x)  # 8 bits: the float32 GEMM
    with streams.tracing_on():
        q4(x)
    q4.train()
    q4(x)
    assert calls == []


def test_many_rows_with_inf_take_the_float32_kernel(gemm):
    _, wq, s, b = quantized(1024, 1024, 64, 4, mx.float32, seed=11)
    x = np.random.default_rng(3).standard_normal((12, 1024)).astype(np.float32)
    x[7, 100] = -np.inf
    got = np.array(gemm.quantized_matvec(mx.array(x), wq, s, b, 64, 4))
    want = np.array(mx.quantized_matmul(mx.array(x), wq, s, b, transpose=True, group_size=64, bits=4))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)
