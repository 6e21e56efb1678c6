"""pg_edge's int16 GEMM (pg_edge/cpu/qmv/qmm_int16.cpp): the many-row (prefill) products of
bf16 / fp16 and 8-bit weights on CPUs without AMX, weight and x rounded to integers per block,
sums in int32, by VPDPWSSD (AVX512-VNNI) or VPMADDWD (AVX2). Both run here in child processes:
PG_EDGE_PREFILL=int8 turns AMX and AVX512-BF16 off, PG_EDGE_QMV_SIMD=avx2 caps the CPU to AVX2;
without AVX2 these tests say so in their skip."""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cpu import qmv

# (kind, M, N, K, gs): M past whole tiles of 6 rows, N past whole panels of 16, K of 9 to 68 blocks
# (4304: SigLIP's MLP width, a last block of 16)
CASES = [("bf16", 9, 1000, 2304, 64), ("bf16", 13, 1003, 4304, 64), ("fp16", 40, 520, 4352, 64),
         ("q8", 9, 1000, 2304, 32), ("q8", 14, 1003, 1152, 64), ("q8", 40, 520, 4352, 128)]


def case(kind: str, M: int, N: int, K: int, gs: int):
    """x float32 [M, K] (one block 30x larger), and the weight's arrays as the primitive takes them."""
    rng = np.random.default_rng(M * N + gs)
    w = mx.array((rng.standard_normal((N, K)) * 0.02).astype(np.float32))
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 64:128] *= 30
    if kind == "q8":
        wq, s, b = mx.quantize(w, group_size=gs, bits=8)
        return x, (wq, s.astype(mx.bfloat16), b.astype(mx.bfloat16))
    return x, (w.astype(mx.bfloat16 if kind == "bf16" else mx.float16),)


def run_case(mod, kind: str, x: np.ndarray, weight: tuple, gs: int) -> np.ndarray:
    if kind == "q8":
        return np.array(mod.bf16_quantized_matmul(mx.array(x), *weight, gs, 8))
    return np.array(mod.bf16_matmul(mx.array(x), weight[0]))


def dense(kind: str, weight: tuple, gs: int) -> np.ndarray:
    """The weight as float64 [N, K], as stored."""
    if kind == "q8":
        wq, s, b = weight
        return np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=8),
                        dtype=np.float64)
    return np.array(weight[0].astype(mx.float32), dtype=np.float64)


def check(kind: str, got: np.ndarray, x: np.ndarray, weight: tuple, gs: int) -> None:
    """Each output within the bound of the kernel's roundings: x to +-4095 (16-bit weights) or
    +-32767 (8-bit) steps of its block's largest |x|, 16-bit weights to +-8191 steps of theirs
    (8-bit weights enter exact), half a step each at most; and rounded at all (the int16 GEMM
    ran, not a float32 product)."""
    w = dense(kind, weight, gs)
    want = x.astype(np.float64) @ w.T
    M, K = x.shape
    B = gs if kind == "q8" else 64
    pad = -K % B  # a shorter last block: zeros change no block's largest value or sum
    xb = np.abs(np.pad(x.astype(np.float64), ((0, 0), (0, pad)))).reshape(M, -1, B)
    wb = np.abs(np.pad(w, ((0, 0), (0, pad)))).reshape(w.shape[0], -1, B)
    if kind == "q8":
        # the kernel multiplies the rounded x by scale * q and adds bias * sum(x) from float32 sums
        q = np.array(mx.dequantize(weight[0], mx.ones(weight[1].shape), mx.zeros(weight[1].shape),
                                   group_size=gs, bits=8), dtype=np.float64)
        sq = np.abs(q.reshape(q.shape[0], K // B, B) * np.array(weight[1].astype(mx.float32))[:, :, None])
        dx = xb.max(-1) / 32767 / 2
        bound = np.einsum("mg,ng->mn", dx, sq.sum(-1))
    else:
        dx, dw = xb.max(-1) / 4095 / 2, wb.max(-1) / 8191 / 2
        bound = (np.einsum("mg,ng->mn", dx, wb.sum(-1)) + np.einsum("mg,ng->mn", xb.sum(-1), dw)
                 + B * np.einsum("mg,ng->mn", dx, dw))
    err = np.abs(got - want)
    assert (err <= bound * 1.001 + 2e-6 * np.abs(want).max()).all(), float((err - bound).max())
    assert err.max() > 1e-7 * np.abs(want).max()
    assert err.max() < 1e-3 * np.abs(want).max()  # and far below bfloat16's 2^-9 rounding of x on AMX


CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_qmm_int16 import CASES, case, run_case
from pg_edge.cpu import qmv
m = qmv.module()
print(m.bf16_kernel(), "|", qmv.prefill_kernel())
for i, (kind, M, N, K, gs) in enumerate(CASES):
    x, weight = case(kind, M, N, K, gs)
    np.save(sys.argv[1] + f"/{i}.npy", run_case(m, kind, x, weight, gs))
    if i == 0:
        x[3, 5] = np.inf
        np.save(sys.argv[1] + "/inf.npy", run_case(m, kind, x, weight, gs))
"""


@pytest.fixture(scope="module", params=["avx2", "this CPU"])
def outputs(ext, tmp_path_factory, request):
    """{case index or "inf": output} from the int16 GEMM in a child process without AMX: capped
    to AVX2 (VPMADDWD), or at this CPU's level (VPDPWSSD where it has AVX512-VNNI)."""
    if ext.simd() == "portable":
        pytest.skip("this CPU has no AVX2: prefill takes the float32 GEMM")
    d = tmp_path_factory.mktemp("int16")
    env = dict(os.environ, PG_EDGE_PREFILL="int8")
    env.pop("PG_EDGE_QMV", None)
    env.pop("PG_EDGE_QMV_SIMD", None)
    if request.param == "avx2":
        env["PG_EDGE_QMV_SIMD"] = "avx2"
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True).stdout
    kernel = "int16 on AVX2" if request.param == "avx2" else out.split(" | ")[1].split(" for ")[0]
    assert kernel in ("int16 on AVX2", "int16 on AVX512-VNNI")
    assert out.startswith(f"int16 | {kernel} for 16-bit and 8-bit weights, int8 on ")
    return {f.stem: np.load(f) for f in d.iterdir()}


@pytest.mark.parametrize("i", range(len(CASES)))
def test_within_the_rounding_of_weight_and_x(outputs, i):
    kind, M, N, K, gs = CASES[i]
    x, weight = case(kind, M, N, K, gs)
    check(kind, outputs[str(i)].astype(np.float64), x, weight, gs)


def test_inf_in_x_takes_the_exact_product(outputs):
    kind, M, N, K, gs = CASES[0]
    x, weight = case(kind, M, N, K, gs)
    x[3, 5] = np.inf
    got = outputs["inf"]
    want = x.astype(np.float64) @ dense(kind, weight, gs).T
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4 * np.abs(want[finite]).max())


def test_prefill_routes_by_weight_kind(monkeypatch):
    """With the int16 kernel as this CPU's (here: pretended), a bf16 layer's and an 8-bit layer's
    many-row products take the bf16_matmul primitives, a 4-bit layer's the int8 GEMM, and a 16-bit
    weight whose K is not a multiple of 16 the float32 GEMM."""
    from pg_edge.cpu import products
    import mlx.nn as nn

    monkeypatch.setitem(qmv._state, "bf16", "int16")
    monkeypatch.setattr(qmv, "int8_prefill", lambda layer, x: layer.bits == 4)
    calls = []
    monkeypatch.setattr(qmv, "bf16_float_product", lambda w, x: calls.append("float") or x @ w.astype(x.dtype).T)
    monkeypatch.setattr(qmv, "bf16_quantized_product", lambda layer, x: calls.append(layer.bits) or mx.zeros((1,)))
    monkeypatch.setattr(qmv, "product", lambda layer, x: calls.append(f"int8 {layer.bits}") or mx.zeros((1,)))
    monkeypatch.setattr(products, "BF16_MIN_ELEMENTS", 1)
    x = mx.random.normal((1, products.DENSE_ROWS + 1, 1024))
    lin = nn.Linear(1024, 64, bias=False)
    lin.set_dtype(mx.bfloat16)
    products.cpu_float_product(lin.weight, x, lean_ok=True)
    for bits in (8, 4):
        q = nn.QuantizedLinear(1024, 64, bias=False, group_size=64, bits=bits)
        q.eval()
        products.cpu_quantized_product(q, x)
    assert calls == ["float", 8, "int8 4"]
    calls.clear()
    odd = mx.zeros((64, 1000), dtype=mx.bfloat16)  # K = 1000: not a multiple of 16
    products.cpu_float_product(odd, mx.zeros((1, products.DENSE_ROWS + 1, 1000)), lean_ok=True)
    assert calls == []
