"""The decode step on the Metal path (backend policy "native") and the 8-bit KV cache option."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge.cli import main
from pg_edge.demo import SAMPLES
from pg_edge.errors import PgEdgeError
from pg_edge._mlx_lm import KVCache, QuantizedKVCache
from pg_edge.model.gemma import RMSNorm, float32_softcap, softcap

ROOT = Path(__file__).resolve().parents[2]


def test_rms_norm_offset_weight_is_made_once_and_follows_the_weight():
    norm = RMSNorm(8, 1e-6)
    norm.weight = mx.random.normal((8,))
    norm.eval()
    x = mx.random.normal((2, 3, 8))
    first = norm.offset_weight()
    assert norm.offset_weight() is first  # cached: no kernel per call
    assert mx.array_equal(norm(x), mx.fast.rms_norm(x, 1.0 + norm.weight, 1e-6))
    norm.weight = mx.random.normal((8,))  # new weights (a reload): a new offset
    assert norm.offset_weight() is not first
    assert mx.array_equal(norm(x), mx.fast.rms_norm(x, 1.0 + norm.weight, 1e-6))


def test_fused_float32_softcap_equals_the_unfused_one():
    x = (mx.random.normal((2, 4, 1, 300)) * 80).astype(mx.bfloat16)
    got = float32_softcap(x, 50.0)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(softcap(x.astype(mx.float32), 50.0)), rtol=1e-6, atol=1e-5)


def _features(pg, image):
    inp = pg.prepare([image], ["caption en"])
    return mx.array(inp.input_ids), pg.image_features(inp.pixel_values)


def _teacher_forced(model, ids, feats, tokens):
    cache = model.make_cache(padded=False)
    out = [model(ids, image_features=feats, cache=cache, last_only=True)[:, -1]]
    for n, t in enumerate(tokens):
        out.append(model.step(mx.array([[t]]), None, ids.shape[1] + n, cache)[:, -1])
    return np.array(mx.concatenate(out).astype(mx.float32)), cache


def test_native_policy_decode_matches_the_cpu_variants(monkeypatch):
    """The Metal path's decode (fused softcap, cached norm offsets, plain decode embedding)
    gives the logits the CPU variants give, step by step."""
    from PIL import Image

    image = Image.open(SAMPLES[0]).convert("RGB")
    cpu = pg_edge.load("demo")
    ids, feats = _features(cpu, image)
    tokens = [int(t) for t in mx.random.randint(4, cpu.config.real_vocab_size, (24,), key=mx.random.key(0)).tolist()]
    ref, _ = _teacher_forced(cpu.model, ids, feats, tokens)
    monkeypatch.setenv("PG_EDGE_QMM", "native")
    native = pg_edge.load("demo")
    got, _ = _teacher_forced(native.model, ids, feats, tokens)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-3 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_kv_bits_8_agrees_with_the_float_cache_on_the_demo_samples():
    from PIL import Image

    float_pg, q_pg = pg_edge.load("demo"), pg_edge.load("demo", kv_bits=8)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in q_pg.model.make_cache(padded=False))
    assert all(not isinstance(c, QuantizedKVCache) for c in float_pg.model.make_cache(padded=False))
    for path in SAMPLES:
        image = Image.open(path).convert("RGB")
        a = float_pg.generate(image, "caption en", max_tokens=24)
        b = q_pg.generate(image, "caption en", max_tokens=24)
        assert a.tokens and a.tokens == b.tokens  # greedy output unchanged
        ids, feats = _features(float_pg, image)
        tokens = (a.tokens * 8)[:60]  # a longer context than the answer: every step compares
        ref, _ = _teacher_forced(float_pg.model, ids, feats, tokens)
        got, cache = _teacher_forced(q_pg.model, ids, feats, tokens)
        assert isinstance(cache[0], QuantizedKVCache) and cache[0].offset == ids.shape[1] + len(tokens)
        rng = (ref.max(-1) - ref.min(-1))[:, None]
        assert (np.abs(got - ref) / rng).max() < 0.05  # measured: under 2% (docs/performance.md)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_quantized_attention_matches_float_attention_on_the_same_keys():
    from pg_edge.model.config import TextConfig
    from pg_edge.model.gemma import Attention

    cfg = TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     intermediate_size=128, vocab_size=100, attn_logit_softcapping=50.0,
                     query_pre_attn_scalar=64, sandwich_norms=True)
    att = Attention(cfg)
    att.eval()
    x = mx.random.normal((1, 40, 64))
    out = {}
    for name, cache in (("float", KVCache()), ("q8", QuantizedKVCache(group_size=64, bits=8))):
        att(x, None, 0, cache)  # prefill
        out[name] = att(mx.random.normal((1, 1, 64), key=mx.random.key(1)), None, 40, cache)
    np.testing.assert_allclose(np.array(out["q8"]), np.array(out["float"]), atol=0.02 * float(mx.abs(out["float"]).max()))


def test_kv_bits_other_than_8_is_one_clear_error():
    with pytest.raises(PgEdgeError, match="kv_bits must be 8 or None"):
        pg_edge.load("demo", kv_bits=4)


def test_run_kv_bits_8_from_the_command_line(tmp_path, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(Path(SAMPLES[1]).read_bytes())
    args = ["run", "demo", "--image", str(img), "--prompt", "caption en", "--max-tokens", "12", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--kv-bits", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == plain["tokens"]
    with pytest.raises(SystemExit):  # argparse: only 8 is offered
        main(args + ["--kv-bits", "4"])


def test_decode_step_kernels_and_reads_within_the_targets():
    """bench/decode_traffic.py on a 2-layer cut at 224 px: pg_edge's decode step launches no
    more kernels than mlx-lm's on the same decoder and reads at most 1.1x the minimum."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_traffic.py"), "--layers", "2", "--px", "224",
                           "--tools", "pg_edge", "mlx_lm"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\| 224 \| \d+ \| (\w+) \| (\d+) \|.*\| ([\d.]+) \|$", line)
        if m:
            rows[m[1]] = (int(m[2]), float(m[3]))
    assert set(rows) == {"pg_edge", "mlx_lm"}, proc.stdout
    assert rows["pg_edge"][0] <= rows["mlx_lm"][0]
    assert rows["pg_edge"][1] <= 1.1


def test_windowed_quantized_cache_decodes_as_the_window_mask_does():
    """A sliding layer's 8-bit cache hands a decode step its last `window` keys: the same
    attention as every key under the decode mask's window."""
    from pg_edge.model.config import TextConfig
    from pg_edge.model.gemma import Attention
    from pg_edge.model.masks import WindowedQuantizedKVCache, decode_mask

    cfg = TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                     intermediate_size=128, vocab_size=100, attn_logit_softcapping=50.0,
                     query_pre_attn_scalar=64, sandwich_norms=True)
    att = Attention(cfg)
    att.eval()
    window, prefix = 8, 12
    x = mx.random.normal((1, prefix, 64), key=mx.random.key(2))
    windowed = WindowedQuantizedKVCache(window, group_size=64, bits=8)
    full = QuantizedKVCache(group_size=64, bits=8)
    for cache in (windowed, full):
        att(x, None, 0, cache)
    for n in range(3):
        t = mx.random.normal((1, 1, 64), key=mx.random.key(10 + n))
        a = att(t, None, prefix + n, windowed)
        T_k = full.offset + 1
        b = att(t, decode_mask(mx.ones((1, T_k), dtype=mx.bool_), 1, window), prefix + n, full)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
    assert windowed.offset == full.offset == prefix + 3
