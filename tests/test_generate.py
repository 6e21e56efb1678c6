"""Generation behaviour: batching, the vision cache, streaming, vocabulary limit, sampling."""
import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge.errors import PgEdgeError
from pg_edge.generate import StreamDecoder


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


def test_stream_decoder_holds_back_a_split_multibyte_character(tokenizer_dir):
    """Stopping inside a character made of byte-fallback tokens, and on <loc>/<seg> tokens."""
    from pg_edge.processor import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    text = "box <loc0012><loc0034><seg007> café 日本"
    ids = tok.encode(text)
    for stop in range(1, len(ids) + 1):
        dec = StreamDecoder(tok)
        pieces = [dec.add(t) for t in ids[:stop]]
        pieces.append(dec.finish())
        assert "".join(pieces) == tok.decode(ids[:stop])
    assert tok.decode(ids) == text
    # a character split over byte tokens is really held back until complete
    byte_ids = [i for i in ids if tok.piece(i).startswith("<0x")]
    assert byte_ids, "the test string must need byte-fallback tokens"


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
    a = pg.generate(sample_images[0], "caption en", max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    b = pg.generate(sample_images[0], "caption en", max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    c = pg.generate(sample_images[0], "caption en", max_tokens=10, temperature=1.5, seed=4)
    greedy = pg.generate(sample_images[0], "caption en", max_tokens=10)
    assert a.tokens == b.tokens
    assert a.tokens != greedy.tokens or c.tokens != greedy.tokens


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(max_tokens=0)])
def test_bad_sampling_settings_are_refused(pg, sample_images, kwargs):
    with pytest.raises(PgEdgeError):
        pg.generate(sample_images[0], "caption en", **kwargs)


def test_prefill_computes_only_the_last_position(pg):
    ids = mx.array(pg.prepare([np.zeros((8, 8, 3), np.uint8)], ["ocr"]).input_ids)
    pixels = mx.zeros((1, pg.config.vision.image_size, pg.config.vision.image_size, 3))
    full = pg.model(ids, pixels)
    last = pg.model(ids, pixels, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(np.array(last[0, 0]), np.array(full[0, -1]), rtol=1e-5, atol=1e-5)
