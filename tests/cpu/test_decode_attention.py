"""pg_edge.cpu.qmv.decode_attention (attn.cpp): one query token against the KV cache in one
kernel, as MLX's ops compute it (scale, dot, softcap, mask, softmax, values), and the CPU
backend's decode attention of 16-bit and quantized models taking it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cpu import attention, ops, qmv


@pytest.fixture(scope="module")
def kernel(ext):
    if not ext.decode_attention_supported():
        pytest.skip("decode_attention runs on AVX2 or AVX-512 x86 CPUs; elsewhere MLX's ops run (tested as the model's)")
    return ext


def reference(q, k, v, mask, scale, cap):
    """The model's own graph (pg_edge.model.gemma.Attention.attend, with the CPU softcap)."""
    B, H, T, E = q.shape
    K = k.shape[1]
    s = (q * scale).reshape(B, K, H // K, T, E) @ k[:, :, None].swapaxes(-1, -2)
    if cap:
        s = ops.softcap(s, cap)
    if mask is not None:
        s = mx.where(mask[:, :, None], s, mx.finfo(mx.float32).min)
    return (mx.softmax(s, axis=-1) @ v[:, :, None]).reshape(B, H, T, E)


@pytest.mark.parametrize("B,H,K,S,E,cap,mask", [
    (1, 8, 4, 260, 256, 50.0, None),      # PaliGemma 2 3B, one row
    (2, 8, 4, 37, 256, 50.0, "rows"),     # a batch with left padding
    (3, 8, 4, 19, 256, 50.0, "shared"),   # one mask for every row (broadcast)
    (1, 8, 1, 300, 256, 0.0, None),       # PaliGemma 1: one kv head, no softcap
    (2, 4, 2, 5, 32, 30.0, "rows"),       # small heads, fewer keys than a vector
])
def test_matches_the_models_ops_on_cache_slices(kernel, B, H, K, S, E, cap, mask):
    key = mx.random.key(S)
    kb, vb = (mx.random.normal((B, K, S + 40, E), key=mx.random.key(S + i)) for i in (1, 2))
    k, v = kb[:, :, :S], vb[:, :, :S]  # what mlx-lm's KVCache returns: strided slices of its buffer
    q = mx.random.normal((B, H, 1, E), key=key) * 3
    m = None
    if mask == "rows":
        m = mx.random.uniform(shape=(B, 1, 1, S), key=mx.random.key(7)) > 0.3
        m[:, :, :, -1] = True  # each row sees its own token
    elif mask == "shared":
        m = mx.arange(S).reshape(1, 1, 1, S) >= 4
    got = kernel.decode_attention(q, k, v, m, 1 / 16, cap)
    want = reference(q, k, v, m, 1 / 16, cap)
    assert got.shape == (B, H, 1, E) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-5)


def test_the_avx2_kernel_too(kernel):
    """The AVX2 + FMA kernel (8 lanes) in a fresh process capped to AVX2 (the level is read once),
    on the shapes above, with and without a mask (one row fully masked)."""
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import mlx.core as mx
from pg_edge.cpu import qmv
from test_decode_attention import reference
worst = 0.0
for B, H, K, S, E, cap in [(1, 8, 4, 260, 256, 50.0), (2, 8, 4, 37, 256, 50.0), (1, 8, 1, 300, 256, 0.0), (2, 4, 2, 5, 32, 30.0)]:
    kb, vb = mx.random.normal((B, K, S + 40, E)), mx.random.normal((B, K, S + 40, E))
    k, v, q = kb[:, :, :S], vb[:, :, :S], mx.random.normal((B, H, 1, E)) * 3
    m = mx.random.uniform(shape=(B, 1, 1, S)) > 0.3
    m[0] = False
    for mask in (None, m):
        got = qmv.module().decode_attention(q, k, v, mask, 1 / 16, cap)
        worst = max(worst, float(mx.abs(got - reference(q, k, v, mask, 1 / 16, cap)).max()))
print(qmv.module().simd(), worst)
"""
    env = dict(os.environ, PG_EDGE_QMV_SIMD="avx2")
    env.pop("PG_EDGE_QMV", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    level, worst = out.stdout.split()
    assert level == "avx2" and float(worst) < 2e-5, out.stdout


def test_a_row_with_every_key_masked_averages_as_mlx_does(kernel):
    q = mx.random.normal((2, 8, 1, 64))
    k, v = mx.random.normal((2, 4, 9, 64)), mx.random.normal((2, 4, 9, 64))
    m = mx.array([[[[False] * 9]], [[[True] * 9]]])
    np.testing.assert_allclose(np.array(kernel.decode_attention(q, k, v, m, 0.125, 50.0)),
                               np.array(reference(q, k, v, m, 0.125, 50.0)), rtol=1e-5, atol=2e-5)


def test_bad_input_is_refused(kernel):
    q, k = mx.zeros((1, 8, 1, 256)), mx.zeros((1, 4, 10, 256))
    with pytest.raises(ValueError, match="q \\[B, H, 1, E\\]"):
        kernel.decode_attention(mx.zeros((1, 8, 2, 256)), k, k, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="float32"):
        kernel.decode_attention(q.astype(mx.bfloat16), k, k, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel.decode_attention(mx.zeros((1, 8, 1, 40)), mx.zeros((1, 4, 10, 40)), mx.zeros((1, 4, 10, 40)), None, 1.0, 0.0)
    with pytest.raises(ValueError, match="mask"):
        kernel.decode_attention(q, k, k, mx.zeros((1, 1, 1, 9), dtype=mx.bool_), 1.0, 0.0)
    assert not qmv.supports_attention(q, k.astype(mx.bfloat16), k, None)
    assert not qmv.supports_attention(q, k, k, mx.zeros((1, 1, 1, 10)))  # an additive mask: MLX's ops


def test_16bit_model_decodes_with_it_and_generates_the_same_tokens(kernel, qsrc, tmp_path, sample_images, monkeypatch):
    """A bf16 model's decode steps take the kernel (prefill does not), and greedy decoding gives
    the tokens of the same model on MLX's ops."""
    import pg_edge
    from pg_edge.convert.hf import convert_hf

    folder = convert_hf(qsrc(version=2)[0], tmp_path / "bf16", dtype="bfloat16", quiet=True)
    pg = pg_edge.load(folder)
    assert any(type(m) is attention.CpuDecodeAttention for _, m in pg.model.named_modules())
    calls = []
    real = qmv.decode_attention
    monkeypatch.setattr(qmv, "decode_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    got = pg.generate(sample_images[0], "caption en", max_tokens=8)
    assert calls and all(shape[2] == 1 for shape in calls)
    monkeypatch.setattr(qmv, "supports_attention", lambda *a: False)
    assert pg.generate(sample_images[0], "caption en", max_tokens=8).tokens == got.tokens
