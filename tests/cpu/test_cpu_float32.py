"""16-bit models on the CPU compute their many-row products, their vision tower and their decoder
in float32 (pg_edge.cpu: products.float32_product, layers.CpuPaliGemmaModel), where MLX's float32
products run on the BLAS and its bf16 ones do not."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import layers, products, qmv
from pg_edge.benchmark import bench_image


@pytest.mark.parametrize("streams", ["1", "2"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_float32_product_is_the_float32_product_in_the_input_dtype(monkeypatch, streams, dtype):
    monkeypatch.setenv("PG_EDGE_CPU_STREAMS", streams)
    monkeypatch.setattr(qmv, "bf16_prefill", lambda *a, **k: False)  # the float32 GEMM (AMX: test_bf16_gemm.py)
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_PIECE_ELEMENTS", 40 * 128)  # 3 pieces of the 96 rows
    lin = nn.Linear(128, 96)
    lin.set_dtype(dtype)
    x = mx.random.normal((1, products.DENSE_ROWS + 5, 128)).astype(dtype)
    want = (x.astype(mx.float32) @ lin.weight.astype(mx.float32).T + lin.bias.astype(mx.float32))
    native = np.array(lin(x).astype(mx.float32))
    cpu.apply(lin, "cpu")
    got = lin(x)
    assert got.dtype == dtype  # as on Metal: the output in the input's dtype
    got = np.array(got.astype(mx.float32))
    # two roundings to the 16-bit type (the product, then the bias added in it), as MLX's own
    tol = 2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10
    np.testing.assert_allclose(got, np.array(want), rtol=tol, atol=tol)
    np.testing.assert_allclose(native, np.array(want), rtol=tol, atol=tol)
    lin.train()  # training: MLX's own product (no eval inside, gradients through the plain ops)
    calls = []
    monkeypatch.setattr(products, "float32_product", lambda *a: calls.append(a))
    np.testing.assert_array_equal(np.array(lin(x).astype(mx.float32)), np.array((x @ lin.weight.T + lin.bias).astype(mx.float32)))
    assert calls == []


def test_decode_rows_stay_16_bit(monkeypatch):
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    lin = nn.Linear(64, 48)
    lin.set_dtype(mx.bfloat16)
    cpu.apply(lin, "cpu")
    calls = []
    monkeypatch.setattr(products, "float32_product", lambda *a: calls.append(a) or None)
    lin(mx.random.normal((1, 1, 64)).astype(mx.bfloat16))
    assert calls == []  # one token: the 16-bit product (a float32 copy of the weight per token costs more)


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_model_vision_and_decoder_in_float32_closer_to_float32_truth(converted, sample_images, version,
                                                                         monkeypatch):
    folder = converted(version=version, dtype="bfloat16")
    pg = pg_edge.load(folder)
    if cpu.policy() != "cpu":
        pytest.skip("the CPU variants are swapped in on the CPU backend only")
    assert type(pg.model) is layers.CpuPaliGemmaModel
    image = sample_images[0]
    inp = pg.prepare([image], ["caption en"])
    assert pg.model.encode_image(mx.array(inp.pixel_values)).dtype == mx.float32
    assert pg.model.embed(mx.array(inp.input_ids), None).dtype == mx.float32  # the decoder too
    ours = pg.logits(image, "caption en")
    truth = pg_edge.load(folder, dtype=mx.float32).logits(image, "caption en")
    monkeypatch.setenv("PG_EDGE_QMM", "native")
    native = pg_edge.load(folder).logits(image, "caption en")
    err_ours, err_native = np.abs(ours - truth).max(), np.abs(native - truth).max()
    assert err_ours <= err_native
    assert err_ours <= 0.02 * np.abs(truth).max()
    assert len(pg.generate(bench_image(64), "caption en", max_tokens=4).tokens) >= 1
