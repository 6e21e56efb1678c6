"""User text: special tokens typed in a prompt stay text with either tokenizer file; prompts past
the context are refused before any compute; invalid UTF-8, control characters and odd sampling
flags get one clear line, through the Python API and the CLI."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pg_edge
from pg_edge import pipeline
from pg_edge.errors import PgEdgeError
from pg_edge.inputs.tokenizer import Tokenizer

SPECIALS = "caption <image><image> <bos>x<eos> <pad><image>" + "<image>" * 40


@pytest.fixture(scope="module")
def two_folders(converted, tmp_path_factory):
    """The same converted model twice: with only tokenizer.model, with only tokenizer.json."""
    root = tmp_path_factory.mktemp("tok")
    sp, tj = root / "sp", root / "json"
    shutil.copytree(converted(version=1), sp)
    shutil.copytree(converted(version=1), tj)
    (sp / "tokenizer.json").unlink()
    (tj / "tokenizer.model").unlink()
    return sp, tj


def test_typed_special_tokens_stay_text_with_both_tokenizer_files(two_folders):
    sp, tj = (Tokenizer(f) for f in two_folders)
    assert type(sp.backend).__name__ == "_SentencePiece" and type(tj.backend).__name__ == "_TokenizerJson"
    for tok in (sp, tj):
        ids = tok.encode(SPECIALS)
        assert not set(ids) & {tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id}, ids
        prompt = tok.prompt_ids(SPECIALS, 16)
        assert prompt.count(tok.image_id) == 16 and prompt.count(tok.bos_id) == 1
    assert sp.encode(SPECIALS) == tj.encode(SPECIALS)  # both render them as the same text pieces
    # Documented: typed <locNNNN>/<segNNN> ARE the location/segmentation tokens (as in big_vision).
    assert sp.encode("<loc0012><seg003>") == tj.encode("<loc0012><seg003>") == [256012, 257027]


def test_special_tokens_in_a_prompt_cannot_change_the_image_slots(two_folders, sample_images):
    """The issue's case: 40 typed <image> with tokenizer.json gave 76 slots for 16 features and
    logits that changed between identical calls. Now the output equals the tokenizer.model one."""
    sp, tj = (pg_edge.load(f) for f in two_folders)
    img = sample_images[0]
    a, b = sp.logits(img, SPECIALS), tj.logits(img, SPECIALS)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, tj.logits(img, SPECIALS))
    assert np.isfinite(a).all()
    assert sp.generate(img, SPECIALS, max_tokens=4).tokens == tj.generate(img, SPECIALS, max_tokens=4).tokens


def test_prompt_past_the_context_is_refused_before_any_compute(converted, sample_images, monkeypatch):
    pg = pg_edge.load(converted(version=1))

    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(pg, "image_features", boom)
    for layer in ("generate", "stream_generate", "generate_batch"):
        monkeypatch.setattr(pipeline, layer, boom)
    long = "cat, " * 4500  # 9,000 tokens (plus 16 image tokens) > 8192
    with pytest.raises(PgEdgeError, match=r"the prompt is \d+ tokens \(16 of them image tokens\), past the "
                                          r"model's context of 8192 tokens"):
        pg.generate(sample_images[0], long)
    with pytest.raises(PgEdgeError, match=r"max_tokens is 8180: \d+ is past the model's context of 8192"):
        pg.generate(sample_images[0], "caption en", max_tokens=8180)
    with pytest.raises(PgEdgeError, match="context"):
        pg.logits(sample_images[0], long)
    assert pg.vision_calls == 0


@pytest.mark.parametrize("text, words", [
    ("caption \udcff\udcfe", ["not valid UTF-8", "0xff", "character 8"]),
    (b"caption en", ["must be text"]),
    (None, ["must be text"]),
])
def test_invalid_text_is_refused(converted, sample_images, text, words):
    pg = pg_edge.load(converted(version=1))
    with pytest.raises(PgEdgeError) as err:
        pg.generate(sample_images[0], text, max_tokens=2)
    for w in words:
        assert w in str(err.value)


def test_control_characters_are_ordinary_text(two_folders):
    sp, tj = (Tokenizer(f) for f in two_folders)
    text = "caption\x00 a\x07b\x1b[31m\tc\r\n"
    assert sp.encode(text) == tj.encode(text) and len(sp.encode(text)) > 5


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=-1), ["seed", "-1"]),
    (dict(seed=2**64), ["seed"]),
    (dict(temperature=float("inf")), ["temperature", "finite"]),
    (dict(temperature=float("nan")), ["temperature"]),
    (dict(max_tokens=2.5), ["max_tokens"]),
])
def test_bad_generation_settings_are_refused(converted, sample_images, kwargs, words):
    pg = pg_edge.load(converted(version=1))
    with pytest.raises(PgEdgeError) as err:
        pg.generate(sample_images[0], "caption en", **{"max_tokens": 2, **kwargs})
    for w in words:
        assert w in str(err.value)


def test_huge_top_k_and_tiny_temperature_never_emit_ids_past_the_vocabulary(converted, sample_images):
    pg = pg_edge.load(converted(version=1))
    for kw in (dict(top_k=10**12, temperature=1.0), dict(temperature=1e-320), dict(temperature=1e30)):
        r = pg.generate(sample_images[0], "caption en", max_tokens=6, seed=0, **kw)
        assert max(r.tokens, default=0) < pg.config.real_vocab_size, (kw, r.tokens)


def test_cli_bad_text_and_flags_are_one_line_each(converted, tmp_path, capsys):
    from PIL import Image

    from pg_edge.cli import main

    img = tmp_path / "i.png"
    Image.new("RGB", (16, 16)).save(img)
    model = str(converted(version=1))
    base = ["run", model, "--image", str(img), "--max-tokens", "2"]
    # "\udcff\udcfe": what Python makes of the argv bytes ff fe (checked for real below).
    for extra, word in ((["--prompt", "caption \udcff\udcfe"], "UTF-8"), (["--prompt", "x", "--seed", "-1"], "seed"),
                        (["--prompt", "x", "--temp", "inf"], "temperature"),
                        (["--prompt", "cat, " * 4500], "context of 8192")):
        code = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and word in err[0], err
    with pytest.raises(PgEdgeError, match="seed"):  # --debug: the exception itself, with its traceback
        main(["--debug"] + base + ["--prompt", "x", "--seed", "-1"])


def test_cli_invalid_utf8_argv_bytes(converted, tmp_path):
    """The real entry point in a subprocess, handed argv bytes that are not UTF-8."""
    from PIL import Image

    img = tmp_path / "i.png"
    Image.new("RGB", (16, 16)).save(img)
    cmd = [sys.executable, "-m", "pg_edge.cli", "run", str(converted(version=1)), "--image", str(img),
           "--prompt", b"caption \xff\xfe", "--max-tokens", "2"]
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}
    p = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    err = p.stderr.decode("utf-8", "replace").strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "not valid UTF-8 text (byte 0xff)" in err[0], err
