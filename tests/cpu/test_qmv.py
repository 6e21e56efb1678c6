"""pg_edge.cpu.qmv: the optional compiled quantized matvec equals mx.quantized_matmul, and the CPU
backend takes it for decode when built, MLX's kernel otherwise (and says which). These tests pass
int8=False: the int8 kernel of large 4-bit weights has its own tests (test_qmv_int8.py).

The module is built once (python -m pg_edge.cpu.qmv build: CMake, a C++ compiler, nanobind;
make setup installs them) into the user cache, keyed by MLX version and source digest (the `ext`
fixture, tests/cpu/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from pg_edge.cpu import products
from pg_edge.cpu import qmv
from pg_edge.cpu.qmv import build as qbuild


def quantized(n, k, gs, bits, dtype, seed=0):
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05).astype(dtype)
    return mx.quantize(w, group_size=gs, bits=bits)


def reference(x, wq, s, b, gs, bits):
    """MLX's own product in float32 (its fast CPU kernel), the value to match."""
    f = mx.float32
    return mx.quantized_matmul(x.astype(f), wq, s.astype(f), b.astype(f), transpose=True,
                               group_size=gs, bits=bits)


def rel_err(y, ref):
    return float(mx.max(mx.abs(y.astype(mx.float32) - ref)) / mx.max(mx.abs(ref)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_equals_mlx_quantized_matmul(ext, bits, gs):
    # odd row counts, K that leave a part block (160, 448: the tail of the vector kernels),
    # batch 1 and more, x with leading dims
    shapes = [((1, 256), 37), ((3, 384), 129), ((5, 256), 1), ((2, 1, 640), 63), ((1, 2304), 999)]
    if gs <= 64:  # K past the last whole vector block (AVX-512: 128 elements at 4 bits)
        shapes.append(((2, 448), 33))
    if gs == 32:
        shapes.append(((1, 160), 65))
    for i, (xshape, n) in enumerate(shapes):
        for xdt, sdt in [(mx.float32, mx.float32), (mx.float32, mx.bfloat16), (mx.bfloat16, mx.bfloat16),
                         (mx.float16, mx.float16)]:
            wq, s, b = quantized(n, xshape[-1], gs, bits, sdt, seed=i)
            x = mx.random.normal(xshape, key=mx.random.key(100 + i)).astype(xdt)
            y = ext.quantized_matvec(x, wq, s, b, gs, bits, int8=False)
            assert y.shape == (*xshape[:-1], n)
            assert y.dtype == (mx.float32 if mx.float32 in (xdt, sdt) else xdt)
            tol = 2e-5 if y.dtype == mx.float32 else 1e-2  # 16-bit outputs: their own rounding
            assert rel_err(y, reference(x, wq, s, b, gs, bits)) < tol, (xshape, n, xdt, sdt)


def test_big_product_over_threads_and_strided_x(ext):
    # 4099 x 2304 at 4 bits: split over the thread pool; x a transposed (strided) view
    wq, s, b = quantized(4099, 2304, 64, 4, mx.bfloat16)
    xt = mx.random.normal((2304, 2), key=mx.random.key(7))
    y = ext.quantized_matvec(xt.T, wq, s, b, 64, 4, int8=False)
    assert rel_err(y, reference(xt.T, wq, s, b, 64, 4)) < 2e-5
    # the same numbers as one call per row (each output row is one dot product, whichever thread)
    y0 = ext.quantized_matvec(xt.T[:1], wq, s, b, 64, 4, int8=False)
    assert mx.array_equal(y[:1], y0)


@pytest.mark.parametrize("simd", ["avx2", "portable"])
def test_lower_kernels_and_one_thread(ext, simd):
    """The AVX2 kernel and the plain C++ one (CPUs without AVX-512 / AVX2: PG_EDGE_QMV_SIMD caps
    the choice) and a pool of one thread give the same product, in a fresh process (both are
    read once). On a CPU without AVX2 the "avx2" run is the portable kernel again."""
    code = """
import mlx.core as mx
from pg_edge.cpu import qmv
m = qmv.module()
print(m.simd(), m.threads())
for bits, gs in [(4, 32), (4, 64), (8, 128), (8, 32)]:
    w = mx.random.normal((301, 640 + 32 * (gs == 32)), key=mx.random.key(bits + gs)) * 0.05
    wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits)
    x = mx.random.normal((3, w.shape[1]), key=mx.random.key(1))
    ref = mx.quantized_matmul(x, wq, s.astype(mx.float32), b.astype(mx.float32), transpose=True, group_size=gs, bits=bits)
    y = m.quantized_matvec(x, wq, s, b, gs, bits)
    print(float(mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref))))
"""
    env = dict(os.environ, PG_EDGE_QMV_SIMD=simd, PG_EDGE_QMV_THREADS="1")
    env.pop("PG_EDGE_QMV", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ((simd, "portable") if simd == "avx2" else ("portable",)) and out[1] == "1"
    assert all(float(e) < 2e-5 for e in out[2:]) and len(out) == 6


def test_bad_input_is_a_clear_error(ext):
    wq, s, b = quantized(8, 64, 32, 4, mx.float32)
    x = mx.ones((1, 64))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ext.quantized_matvec(x, wq, s, b, 32, 3)
    with pytest.raises(ValueError, match="shapes"):
        ext.quantized_matvec(mx.ones((1, 32)), wq, s, b, 32, 4)


def cpu_layer(n, k, bits=4, gs=64):
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=gs, bits=bits)
    wq, s, b = quantized(n, k, gs, bits, mx.bfloat16)
    layer.update({"weight": wq, "scales": s, "biases": b})
    layer.eval()
    layer.__class__ = products.CpuQuantizedLinear
    return layer


def test_backend_takes_it_for_decode_only(ext, monkeypatch):
    calls = []
    real = qmv.product
    monkeypatch.setattr(qmv, "product", lambda layer, x: calls.append(x.shape) or real(layer, x))
    layer = cpu_layer(96, 256)
    wq, s, b = layer["weight"], layer["scales"], layer["biases"]
    x = mx.random.normal((1, 2, 256), key=mx.random.key(3))
    y = layer(x)
    assert calls == [(1, 2, 256)] and y.dtype == mx.float32
    assert rel_err(y, reference(x, wq, s, b, 64, 4)) < 2e-5
    # bf16 activations come back in bf16
    assert layer(x.astype(mx.bfloat16)).dtype == mx.bfloat16
    calls.clear()
    layer(mx.random.normal((1, qmv.MAX_ROWS + 1, 256)))  # prefill-sized: MLX's paths
    layer.train()
    layer(x)  # training: MLX's differentiable kernel
    assert calls == []


def test_without_the_build_mlx_runs_and_says_so(ext, monkeypatch):
    monkeypatch.setenv("PG_EDGE_QMV", "off")
    qmv.reset()
    try:
        assert qmv.module() is None and qmv.kernel().startswith("mlx (pg_edge qmv turned off")
        layer = cpu_layer(96, 256, bits=8, gs=32)
        x = mx.random.normal((1, 256), key=mx.random.key(5))
        y = layer(x)
        assert rel_err(y, reference(x, layer["weight"], layer["scales"], layer["biases"], 32, 8)) < 2e-5
        # a cache folder with nothing built: the same fallback, with the reason
        monkeypatch.setenv("PG_EDGE_QMV", "")
        monkeypatch.setenv("PG_EDGE_QMV_DIR", str(qbuild.cache_root() / "surely-empty-test-dir"))
        qmv.reset()
        assert qmv.module() is None and "not built" in qmv.kernel()
    finally:
        monkeypatch.undo()
        qmv.reset()
    assert qmv.kernel().startswith("pg_edge qmv (")


def test_status_command(ext):
    out = subprocess.run([sys.executable, "-m", "pg_edge.cpu.qmv", "status"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PG_EDGE_QMV"})
    assert out.returncode == 0 and out.stdout.startswith("decode matvec (quantized, bf16/fp16): pg_edge qmv (")
