"""pg_edge.cpu.qmv.products: several quantized products of one x in one compiled call (a decode
step's q, k, v and gate, up) give each product's own numbers, and the CPU backend's attention and
MLP take it in decode only."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cpu import products, qmv
from pg_edge.cpu.attention import CpuAttention
from pg_edge.cpu.mlp import CpuMLP, cpu_activation
from pg_edge.model.config import TextConfig

from test_qmv import cpu_layer, quantized


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 3, 12])
def test_each_output_is_its_own_calls(ext, bits, M):
    # 2^20+ element 4-bit weights take the int8 kernel, the 64-row one the float32 kernel: a call
    # mixing both splits each kind apart, and every output equals the single call bit for bit
    K = 1024
    ws = [quantized(n, K, 64, bits, mx.bfloat16, seed=n) for n in (1024, 2048, 64, 1030)]
    for xdt in (mx.float32, mx.bfloat16):
        x = mx.random.normal((M, K), key=mx.random.key(M)).astype(xdt)
        one = [ext.quantized_matvec(x, *w, 64, bits) for w in ws]
        many = ext.quantized_matvecs(x, [a for w in ws for a in w], 64, bits)
        assert len(many) == 4
        for a, b in zip(one, many):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert mx.array_equal(a, b).item()


def test_inf_in_x_and_bad_input(ext):
    K = 1024
    ws = [quantized(n, K, 64, 4, mx.bfloat16, seed=n) for n in (1024, 2048)]
    x = mx.random.normal((2, K), key=mx.random.key(1))
    x = mx.where(mx.arange(K) == 5, mx.inf, x) * mx.array([[0.0], [1.0]]) + mx.array([[1.0], [0.0]])
    one = [ext.quantized_matvec(x, *w, 64, 4) for w in ws]
    many = ext.quantized_matvecs(x, [a for w in ws for a in w], 64, 4)
    for a, b in zip(one, many):  # the float32 kernel for all (x holds inf): inf / NaN as MLX's
        assert np.array_equal(np.array(a), np.array(b), equal_nan=True)
    with pytest.raises(ValueError, match="one after another"):
        ext.quantized_matvecs(x, list(ws[0][:2]), 64, 4)
    with pytest.raises(ValueError, match="shapes"):
        ext.quantized_matvecs(mx.ones((1, 512)), list(ws[0]), 64, 4)


def text_config() -> TextConfig:
    return TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=300)


def test_attention_and_mlp_fuse_in_decode_only(ext, monkeypatch):
    calls = []
    real = qmv.products
    monkeypatch.setattr(qmv, "products", lambda layers, x: calls.append(len(layers)) or real(layers, x))
    cfg = text_config()
    attn = CpuAttention(cfg)
    for name, n in (("q_proj", 256), ("k_proj", 128), ("v_proj", 128), ("o_proj", 256)):
        setattr(attn, name, cpu_layer(n, 256))
    attn.eval()
    x = mx.random.normal((2, 1, 256), key=mx.random.key(4))
    fused = attn.project(x)
    assert calls == [3]
    for y, layer in zip(fused, (attn.q_proj, attn.k_proj, attn.v_proj)):
        assert mx.array_equal(y, layer(x)).item()
    calls.clear()
    attn.project(mx.random.normal((1, qmv.MAX_ROWS + 1, 256)))  # prefill: each its own product
    attn.train()
    attn.project(x)  # training: MLX's differentiable kernels
    assert calls == []

    mlp = CpuMLP(cfg)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = cpu_layer(512, 256), cpu_layer(512, 256), cpu_layer(256, 512)
    mlp.eval()
    y = mlp(x)
    assert calls == [2]
    expect = mlp.down_proj(cpu_activation(mlp, mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mx.array_equal(y, expect).item()
    # a float layer among them (as LoRA wrappers or unquantized parts are): no fusion
    calls.clear()
    assert products.cpu_quantized_products((mlp.gate_proj, mlp.up_proj), x) is not None
    mlp.gate_proj.__class__ = products.nn.QuantizedLinear
    assert products.cpu_quantized_products((mlp.gate_proj, mlp.up_proj), x) is None
