"""pg_edge.cpu.products: the CPU way of computing quantized products gives MLX's own result, in
the input dtype, and is what a quantized folder gets when loaded on the CPU (pg_edge.cpu.apply);
`pg-edge bench`."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import products, streams


def quantized_linear(bits: int, bias: bool = True) -> nn.QuantizedLinear:
    mx.random.seed(0)
    lin = nn.Linear(128, 96, bias=bias)
    lin.set_dtype(mx.bfloat16)  # as loaded from a bf16 folder: bf16 scales, biases and bias
    return nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, products.DENSE_ROWS + 3])  # the matvec and the dense path
def test_cpu_product_equals_mlx_quantized_matmul(bits, rows):
    layer = quantized_linear(bits)
    x = mx.random.normal((1, rows, 128))
    want = np.array(layer(x))
    cpu.apply(layer, "cpu")
    assert type(layer) is products.CpuQuantizedLinear
    np.testing.assert_allclose(np.array(layer(x)), want, rtol=1e-4, atol=1e-4)
    out = layer(x.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16  # as on Metal: the output keeps the activation dtype
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, atol=0.1 * np.abs(want).max())


def test_native_mode_leaves_layers_alone():
    layer = quantized_linear(4)
    assert cpu.apply(layer, "native") == "native"
    assert type(layer) is nn.QuantizedLinear


def test_tied_head_uses_the_cpu_product():
    table = nn.Embedding(300, 64)
    table.set_dtype(mx.bfloat16)
    emb = nn.QuantizedEmbedding.from_embedding(table, group_size=64, bits=4)
    h = mx.random.normal((1, 1, 64))
    want = np.array(emb.as_linear(h))
    cpu.apply(emb, "cpu")
    assert type(emb) is products.CpuQuantizedEmbedding
    np.testing.assert_allclose(np.array(emb.as_linear(h).astype(mx.float32)), want, rtol=1e-4, atol=1e-4)


def test_env_override(monkeypatch):
    monkeypatch.setenv("PG_EDGE_QMM", "native")
    assert cpu.policy() == "native"
    monkeypatch.setenv("PG_EDGE_QMM", "cpu")
    assert cpu.policy() == "cpu"


def test_pg_edge_bench_json(converted, capsys):
    from pg_edge.cli import main

    assert main(["bench", str(converted(version=2)), "--tokens", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decode_tokens"] == 3 and r["decode_tps"] > 0 and r["ttft_s"] >= r["vision_s"] > 0
    assert r["peak_memory_gb"] > 0 and r["max_rss_gb"] > 0 and r["folder_gb"] > 0
    assert r["prompt_tokens"] == pg_edge.load(converted(version=2)).config.num_image_tokens + 4
    from pg_edge.cpu import qmv
    assert r["quantized_matvec"] == qmv.kernel()  # which quantized matvec ran: built or MLX's


def test_pg_edge_bench_table(converted, capsys):
    from pg_edge.cli import main

    assert main(["bench", str(converted(version=1)), "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out and "tok/s" in out and "peak memory (MLX)" in out
    assert "decode matvec (quantized, bf16/fp16): " in out


def test_pg_edge_bench_without_warmup_generates_only_the_timed_runs(converted, capsys, monkeypatch):
    from pg_edge.cli import main
    from pg_edge import benchmark

    calls = []
    real = benchmark.decode_tokens
    monkeypatch.setattr(benchmark, "decode_tokens", lambda *a: calls.append(a[-1]) or real(*a))
    assert main(["bench", str(converted(version=2)), "--tokens", "2", "--json"]) == 0
    assert calls == [2, 2]  # warm-up, then the timed run
    calls.clear()
    assert main(["bench", str(converted(version=2)), "--tokens", "3", "--repeat", "2", "--no-warmup", "--json"]) == 0
    assert calls == [3, 3] and json.loads(capsys.readouterr().out.splitlines()[-1])["decode_tokens"] == 3


@pytest.mark.parametrize("args", [["--tokens", "0"], ["--tokens", "-3", "--no-warmup"]])
def test_pg_edge_bench_bad_tokens_is_a_clear_error(converted, capsys, args):
    from pg_edge.cli import main

    assert main(["bench", str(converted(version=2)), *args]) != 0
    err = capsys.readouterr().err
    assert "tokens must be >= 1" in err and "Traceback" not in err


def test_row_pieces_cover_the_rows_once(monkeypatch):
    monkeypatch.setenv("PG_EDGE_CPU_STREAMS", "3")
    for rows, width, dense, split in [(257216, 64, False, True), (9216, 2304, True, True),
                                      (9216, 2304, True, False), (5, 64, False, True), (96, 128, False, False)]:
        pieces = products.row_pieces(rows, width, dense, split)
        assert pieces[0][0] == 0 and pieces[-1][1] == rows
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(pieces, pieces[1:]))
        if dense:
            assert max(hi - lo for lo, hi in pieces) * width <= products.DENSE_PIECE_ELEMENTS
        if split and rows >= 3:
            assert len(pieces) % 3 == 0  # every stream gets its share
    assert products.row_pieces(96, 128, False, False) == [(0, 96)]


@pytest.mark.parametrize("streams", ["1", "2", "3"])
@pytest.mark.parametrize("rows", [1, products.DENSE_ROWS + 3])
def test_split_product_equals_the_whole(monkeypatch, streams, rows):
    """Split over CPU streams (and dense pieces): the same numbers as one MLX product."""
    monkeypatch.setenv("PG_EDGE_CPU_STREAMS", streams)
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_PIECE_ELEMENTS", 40 * 128)  # 3 pieces of the 96 rows
    splits = []
    row_pieces = products.row_pieces
    def spy(out_rows, in_size, dense, split):
        splits.append(split)
        return row_pieces(out_rows, in_size, dense, split)

    monkeypatch.setattr(products, "row_pieces", spy)
    layer = quantized_linear(4)
    x = mx.random.normal((1, rows, 128))
    want = np.array(layer(x))
    cpu.apply(layer, "cpu")
    np.testing.assert_allclose(np.array(layer(x)), want, rtol=1e-4, atol=1e-4)
    lin = nn.Linear(128, 96)  # float32: a float32 model's prefill is split too (inference)
    want = np.array(lin(x))
    cpu.apply(lin, "cpu")
    lin.eval()
    assert type(lin) is products.CpuLinear
    np.testing.assert_allclose(np.array(lin(x)), want, rtol=1e-5, atol=1e-5)
    if streams != "1" and rows >= products.DENSE_ROWS:  # both prefill products were split
        assert splits.count(True) == 2, splits


def test_split_runs_inside_the_worker_thread(monkeypatch, converted):
    """A model whose products are all split generates the same tokens as one left whole, from
    pg_edge's worker thread (each thread has its own streams)."""
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    folder = converted(version=2)
    whole = pg_edge.load(folder).generate(image, "caption en", max_tokens=6).tokens
    monkeypatch.setenv("PG_EDGE_CPU_STREAMS", "2")
    monkeypatch.setattr(products, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(products, "DENSE_SPLIT_MIN_ELEMENTS", 1)
    pg = pg_edge.load(folder)
    assert any(type(m) is products.CpuLinear for _, m in pg.model.named_modules())
    assert pg.generate(image, "caption en", max_tokens=6).tokens == whole


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_bad_stream_count_is_a_clear_error(monkeypatch, value):
    from pg_edge.errors import PgEdgeError

    monkeypatch.setenv("PG_EDGE_CPU_STREAMS", value)
    with pytest.raises(PgEdgeError, match="PG_EDGE_CPU_STREAMS must be a whole number"):
        streams.stream_count()
