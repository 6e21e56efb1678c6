"""Generation behaviour: batching, the vision cache, streaming, vocabulary limit, sampling."""
import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge.errors import PgEdgeError
from pg_edge.model.gemma import LanguageModel
from pg_edge.generate import Detokenizer, Sampling


@pytest.fixture(scope="module")
def pg(converted):
    return pg_edge.load(converted(version=2, dtype="float32"))


def test_batch_of_two_with_different_prompt_lengths_equals_each_alone(pg, sample_images):
    images = [sample_images[0], sample_images[3]]
    prompts = ["caption en", "answer en how many cups are on the table in this picture?"]
    alone = [pg.generate(im, p, max_tokens=12).tokens for im, p in zip(images, prompts)]
    batch = pg.generate_batch(images, prompts, max_tokens=12)
    assert [r.tokens for r in batch] == alone
    assert len(set(len(pg.tokenizer.encode(p)) for p in prompts)) == 2


def test_second_prompt_on_same_image_skips_the_vision_encoder(pg, sample_images):
    before = pg.vision_calls
    pg.generate(sample_images[1], "caption en", max_tokens=2)
    assert pg.vision_calls == before + 1
    pg.generate(sample_images[1], "ocr", max_tokens=2)
    assert pg.vision_calls == before + 1
    pg.generate(sample_images[2], "ocr", max_tokens=2)
    assert pg.vision_calls == before + 2


def test_stream_pieces_concatenate_to_the_final_text(pg, sample_images):
    chunks = list(pg.stream(sample_images[0], "caption en", max_tokens=25))
    result = chunks[-1].result
    assert "".join(c.text for c in chunks) == result.text == pg.tokenizer.decode(result.tokens)


def test_detokenizer_holds_back_a_split_multibyte_character(tokenizer_dir):
    """Stopping inside a character made of byte-fallback tokens, and on <loc>/<seg> tokens."""
    from pg_edge.inputs.processor import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    text = "box <loc0012><loc0034><seg007> café 日本"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(tok.piece(i).startswith("<0x") for i in ids), "the test string must need byte-fallback tokens"
    held_back = 0
    for stop in range(1, len(ids) + 1):
        dec = Detokenizer(tok)
        streamed = "".join(dec.add_token(t) for t in ids[:stop])
        final = tok.decode(ids[:stop])
        # nothing streamed is ever a replacement character: a partial character waits
        assert "\ufffd" not in streamed and final.startswith(streamed)
        if final.endswith("\ufffd"):  # stopped inside a character: finalize() releases the bytes
            held_back += 1
            assert streamed == final.rstrip("\ufffd")
        assert streamed + dec.finalize() == final == dec.text
    assert held_back >= 2  # 日 and 本 are three byte tokens each: stops inside them were seen


def test_ids_past_the_real_vocabulary_are_never_produced(converted, sample_images):
    """HF pads the embedding to 257216 rows with junk; make those rows win every argmax."""
    pg = pg_edge.load(converted(version=1, dtype="float32"))
    emb = pg.model.language_model.model.embed_tokens
    top = int(np.argmax(pg.logits(sample_images[0], "caption en")))
    w = np.array(emb.weight)
    w[pg.config.real_vocab_size:] = 10.0 * w[top]  # 10x the best real logit (PG1: no softcap)
    emb.weight = mx.array(w)
    logits = pg.logits(sample_images[0], "caption en")
    assert logits[pg.config.real_vocab_size:].max() > logits[: pg.config.real_vocab_size].max()
    out = pg.generate(sample_images[0], "caption en", max_tokens=8)
    assert out.tokens and max(out.tokens) < 257152
    out = pg.generate(sample_images[0], "caption en", max_tokens=8, temperature=1.0, seed=0)
    assert max(out.tokens) < 257152


def test_sampling_is_reproducible_with_a_seed(pg, sample_images):
    hot = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=3)
    a = pg.generate(sample_images[0], "caption en", max_tokens=10, sampling=hot)
    b = pg.generate(sample_images[0], "caption en", max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    c = pg.generate(sample_images[0], "caption en", max_tokens=10, temperature=1.5, seed=4)
    greedy = pg.generate(sample_images[0], "caption en", max_tokens=10)
    assert a.tokens == b.tokens  # the same settings, as one Sampling or as keywords
    assert a.tokens != greedy.tokens and c.tokens != greedy.tokens and a.tokens != c.tokens


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(max_tokens=0), dict(temp=1.0)])
def test_bad_sampling_settings_are_refused(pg, sample_images, kwargs):
    with pytest.raises(PgEdgeError):
        pg.generate(sample_images[0], "caption en", **kwargs)


def test_prefill_computes_only_the_last_position(pg, monkeypatch):
    """The LM head (V columns, the biggest matmul) sees one position per row, not all T."""
    ids = mx.array(pg.prepare([np.zeros((8, 8, 3), np.uint8)], ["ocr"]).input_ids)
    pixels = mx.zeros((1, pg.config.vision.image_size, pg.config.vision.image_size, 3))
    full = pg.model(ids, pixels)
    seen = []
    head = LanguageModel.logits
    monkeypatch.setattr(LanguageModel, "logits", lambda self, h, capped=True: seen.append(h.shape) or head(self, h, capped))
    last = pg.model(ids, pixels, last_only=True)
    assert seen == [(1, 1, pg.config.text.hidden_size)]
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(np.array(last[0, 0]), np.array(full[0, -1]), rtol=1e-5, atol=1e-5)
    pg.generate(np.zeros((8, 8, 3), np.uint8), "ocr", max_tokens=3)  # prefill, then 2 steps
    assert [s[1] for s in seen[1:]] == [1, 1, 1]


def test_sliding_window_decode_with_rotating_cache_is_exact(converted, sample_images):
    """A window shorter than the prompt: unpadded rows decode over a RotatingKVCache (the last
    `window` keys, no mask), padded batches over a full KVCache with the window mask; both
    must give the tokens of the uncached full forward pass."""
    from mlx_lm.models.cache import RotatingKVCache

    pg = pg_edge.load(converted(version=2, dtype="float32", sliding_window=6))
    assert any(isinstance(c, RotatingKVCache) for c in pg.model.make_cache(padded=False))
    assert not any(isinstance(c, RotatingKVCache) for c in pg.model.make_cache(padded=True))
    prompts = ["caption en", "answer en how many cups are on the table in this picture?"]
    images = [sample_images[0], sample_images[3]]
    alone = [pg.generate(im, p, max_tokens=6).tokens for im, p in zip(images, prompts)]
    assert [r.tokens for r in pg.generate_batch(images, prompts, max_tokens=6)] == alone
    inp = pg.prepare(images[:1], prompts[:1])
    ids = [int(i) for i in inp.input_ids[0]]
    n_prompt = len(ids)
    assert n_prompt > 6
    feats = pg.image_features(inp.pixel_values)
    for want in alone[0]:  # greedy by full recomputation (generated tokens causal): no cache
        mask_ar = mx.array([[0] * n_prompt + [1] * (len(ids) - n_prompt)])
        logits = pg.model(mx.array([ids]), image_features=feats, mask_ar=mask_ar)
        assert int(mx.argmax(logits[0, -1, : pg.config.real_vocab_size])) == want
        ids.append(want)
