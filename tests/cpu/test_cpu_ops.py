"""pg_edge.cpu.ops (the CPU backend's leaner RMSNorm / RoPE / softcap graphs) and the attention
split by heads over the CPU streams (pg_edge.cpu.attention) compute exactly what mx.fast and the
plain ops compute; a model with the CPU variants swapped in (pg_edge.cpu.apply) gives the same
logits and tokens as its model classes, and runs their code while tracing or training; greedy
decoding's lazy logprobs equal the sampled path's."""
import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge import cpu
from pg_edge.cpu import attention, layers, ops, streams
from pg_edge.model import gemma, paligemma, siglip
from pg_edge.generate import generate_step


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_rms_norm_is_bit_identical_across_widths_and_lengths(dtype):
    # Several widths and lengths in one process: a compiled graph reused for another width
    # would bake in the wrong 1 / width.
    for shape in [(1, 1, 64), (1, 7, 64), (2, 5, 32), (1, 1, 32), (1, 3, 2304), (1, 1, 64)]:
        x = (mx.random.normal(shape) * 3).astype(dtype)
        w = mx.random.normal(shape[-1:]).astype(dtype)
        np.testing.assert_array_equal(bits(ops.rms_norm(x, w, 1e-6)),
                                      bits(mx.fast.rms_norm(x, 1.0 + w, 1e-6)))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("T,offset", [(1, 0), (1, 260), (1, 261), (9, 0), (300, 17)])
def test_rope_is_bit_identical_to_mx_fast_rope(dtype, T, offset):
    for heads, dims in ((8, 256), (4, 256), (2, 16)):
        x = mx.random.normal((1, heads, T, dims)).astype(dtype)
        want = mx.fast.rope(x, dims, traditional=False, base=10000.0, scale=1.0, offset=offset)
        got = ops.rope(x, offset, 10000.0)
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_array_equal(bits(got), bits(want))


def test_rope_tables_are_reused_within_a_step_and_renewed_after():
    a = ops.rope_tables(5, 1, 16, 10000.0)
    assert ops.rope_tables(5, 1, 16, 10000.0) is a  # the next layer of the same step
    b = ops.rope_tables(6, 1, 16, 10000.0)
    assert b is not a and not np.array_equal(np.array(a[0]), np.array(b[0]))


def test_softcap_equals_the_plain_ops():
    x = mx.random.normal((1, 4, 2, 1, 37)) * 80
    np.testing.assert_array_equal(np.array(ops.softcap(x, 50.0)), np.array(mx.tanh(x / 50.0) * 50.0))


# The CPU variants of the model's own classes (products: pg_edge.cpu.products, tested apart).
VARIANTS = {ops.CpuRMSNorm: gemma.RMSNorm, attention.CpuAttention: gemma.Attention,
            attention.CpuSiglipAttention: siglip.SiglipAttention, layers.CpuGemmaModel: gemma.GemmaModel,
            layers.CpuSiglipEncoder: siglip.SiglipEncoder, layers.CpuPaliGemmaModel: paligemma.PaliGemmaModel}


def variant_modules(model):
    return [m for _, m in model.named_modules() if type(m) in VARIANTS]


def unswap(model) -> None:
    """Back to the model classes (what pg_edge.cpu.apply changed, but the products)."""
    for m in variant_modules(model):
        m.__class__ = VARIANTS[type(m)]


def sdpa(q, k, v, mask, scale=0.125):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def capped(q, k, v, mask):
    """Gemma2's softcapped GQA attention, as pg_edge.model.gemma computes it (query head n -> kv
    head n // (H / K))."""
    B, H, T, hd = q.shape
    K = k.shape[1]
    s = (q * 0.125).reshape(B, K, H // K, T, hd) @ k[:, :, None].swapaxes(-1, -2)
    s = mx.where(mask[:, :, None], mx.tanh(s / 50.0) * 50.0, mx.finfo(mx.float32).min)
    return (mx.softmax(s, axis=-1) @ v[:, :, None]).reshape(B, H, T, hd)


@pytest.mark.parametrize("H,K,attend,masked", [(16, 16, sdpa, False),  # SigLIP: multi-head
                                                (8, 4, capped, True),  # Gemma2: grouped, capped
                                                (8, 1, sdpa, True)])   # Gemma: multi-query
@pytest.mark.parametrize("piece", [2**30, 3000])  # one group per stream; many, in rounds
def test_attention_on_streams_is_bit_identical(monkeypatch, H, K, attend, masked, piece):
    monkeypatch.setattr(attention, "ATTENTION_SPLIT_SCORES", 1)
    monkeypatch.setattr(attention, "ATTENTION_PIECE_SCORES", piece)
    T, S, hd = 24, 40, 16
    q, k, v = mx.random.normal((1, H, T, hd)), mx.random.normal((1, K, S, hd)), mx.random.normal((1, K, S, hd))
    mask = (mx.random.uniform(shape=(1, 1, T, S)) > 0.3) | (mx.arange(S) == 0) if masked else None
    groups = []

    def counted(q, k, v, mask):
        groups.append((q.shape[1], k.shape[1]))
        return attend(q, k, v, mask)

    got = attention.attention_on_streams(counted, q, k, v, mask)
    np.testing.assert_array_equal(np.array(got), np.array(attend(q, k, v, mask)))
    assert sum(h for h, _ in groups) == H and len(groups) >= min(streams.stream_count(), K if K > 1 else H)
    if piece < H * T * S:
        assert len(groups) > streams.stream_count()  # several rounds
    if K > 1:
        assert all(h == kv * (H // K) for h, kv in groups)  # whole kv groups, with their queries
    monkeypatch.setattr(attention, "ATTENTION_SPLIT_SCORES", H * T * S + 1)
    groups.clear()
    attention.attention_on_streams(counted, q, k, v, mask)
    assert groups == [(H, K)]  # small: one piece


@pytest.mark.parametrize("split", [False, True])  # True: every attention split by heads
@pytest.mark.parametrize("version", [1, 2])
def test_model_with_cpu_variants_gives_the_same_logits_and_tokens(converted, sample_images, version, split,
                                                                  monkeypatch):
    callers = set()
    if split:
        monkeypatch.setattr(attention, "ATTENTION_SPLIT_SCORES", 1)
        monkeypatch.setattr(attention, "ATTENTION_PIECE_SCORES", 1)
        real = attention.attention_on_streams

        def spy(attend, *args):
            callers.add(type(attend.__self__).__name__)
            return real(attend, *args)

        monkeypatch.setattr(attention, "attention_on_streams", spy)
    pg = pg_edge.load(converted(version=version, dtype="float32"))
    swapped = {type(m) for m in variant_modules(pg.model)}
    assert swapped == {ops.CpuRMSNorm, attention.CpuAttention, attention.CpuSiglipAttention}  # float: no per-layer eval
    lean_logits = pg.logits(sample_images[0], "caption en")
    lean = pg.generate(sample_images[0], "caption en", max_tokens=8).tokens
    unswap(pg.model)
    assert not variant_modules(pg.model)
    np.testing.assert_array_equal(pg.logits(sample_images[0], "caption en"), lean_logits)
    assert pg.generate(sample_images[0], "caption en", max_tokens=8).tokens == lean
    assert callers == ({"CpuSiglipAttention", "CpuAttention"} if split else set())


def spy_cpu_paths(monkeypatch) -> list:
    """Record every call of a CPU path the variants may take."""
    calls = []
    for module, name in ((ops, "rms_norm"), (ops, "rope"), (ops, "softcap"), (attention, "attention_on_streams")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(attention, "ATTENTION_SPLIT_SCORES", 1)
    return calls


@pytest.mark.parametrize("mode", ["tracing", "training"])
def test_variants_run_the_model_classes_code_while_tracing_or_training(converted, sample_images, mode,
                                                                        monkeypatch):
    pg = pg_edge.load(converted(version=2, dtype="float32"))
    inp = pg.prepare([sample_images[0]], ["caption en"])
    ids, pixels = mx.array(inp.input_ids), mx.array(inp.pixel_values)
    calls = spy_cpu_paths(monkeypatch)
    lean = pg.model(ids, pixels)  # on this thread, not pg's worker: the tracing flag is per thread
    mx.eval(lean)
    assert set(calls) == {"rms_norm", "rope", "softcap", "attention_on_streams"}
    calls.clear()
    if mode == "tracing":
        with cpu.for_tracing():
            assert streams.tracing()
            plain = pg.model(ids, pixels)
        assert not streams.tracing()
    else:
        pg.model.train()
        plain = pg.model(ids, pixels)
        pg.model.eval()
    mx.eval(plain)
    assert calls == []
    np.testing.assert_array_equal(np.array(plain), np.array(lean))


@pytest.mark.parametrize("version", [1, 2])  # PG2: the final logit softcap
def test_greedy_takes_the_raw_argmax_and_its_lazy_logprobs_are_the_full_ones(converted, sample_images, version):
    pg = pg_edge.load(converted(version=version, dtype="float32"))
    inp = pg.prepare([sample_images[1]], ["caption en"])
    ids, feats = mx.array(inp.input_ids), pg.image_features(inp.pixel_values)
    argmax = lambda lp: mx.argmax(lp, axis=-1)  # not generate.greedy: the capped, eager path
    lazy = list(generate_step(pg.model, ids, feats, max_tokens=6))
    full = list(generate_step(pg.model, ids, feats, max_tokens=6, sampler=argmax))
    assert [int(t[0]) for t, _ in lazy] == [int(t[0]) for t, _ in full]
    for (_, lp_lazy), (_, lp_full) in zip(lazy, full):
        np.testing.assert_allclose(np.array(lp_lazy), np.array(lp_full), rtol=1e-6, atol=1e-5)
