"""`pg-edge explain` / pg_edge.tasks.explain on the demo model and on PG1 and PG2 fixtures: the shapes it
prints are the model's, its mask pictures read back to the mask builder's output, the top candidate
at every step is the generated token, and bad input gets `pg-edge run`'s one-line errors."""

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge.cli import main
from pg_edge import demo
from pg_edge.tasks.explain import explain
from pg_edge.tasks.explain_draw import PREFIX_ATTEND, SUFFIX_ATTEND, WINDOW_CUT, read_mask_picture
from pg_edge.model.masks import prefix_lm_mask  # the mask builder the model uses

SHAPES = demo.SAMPLES[2]


def builder_mask(tokens, window=None) -> np.ndarray:
    """The mask builder called directly on the sequence explain laid out."""
    mask_ar = mx.array([[0 if t.block == "prefix" else 1 for t in tokens]], dtype=mx.int32)
    return np.array(prefix_lm_mask(mask_ar, mx.ones(mask_ar.shape, dtype=mx.bool_), window)[0, 0])


def check_model_shapes(pg, ex, image):
    """The recorded shapes equal those the model gives when its stages are called directly."""
    px = mx.array(pg.prepare([image], [ex.prompt]).pixel_values)
    vt = pg.model.vision_tower
    conv = vt.vision_model.embeddings.patch_embedding(px)
    siglip = vt(px)
    feats = pg.model.encode_image(px)
    assert ex.vision["patch_conv"]["shape"] == list(conv.shape)
    assert ex.vision["siglip"]["shape"] == list(siglip.shape)
    assert ex.vision["connector"]["shape"] == list(feats.shape)
    cfg = pg.config
    g = cfg.vision.image_size // cfg.vision.patch_size
    assert list(siglip.shape) == [1, g * g, cfg.vision.hidden_size] and g * g == cfg.num_image_tokens
    assert list(feats.shape) == [1, cfg.num_image_tokens, cfg.text.hidden_size]
    assert np.allclose(ex.pixel_values, np.array(px))
    return conv, siglip, feats


def check_steps(ex, pg, image):
    """Top candidate == generated token; the text is what pg.generate gives."""
    assert ex.steps, "nothing generated"
    for s in ex.steps:
        assert s.top[0][0] == s.id
        assert s.top[0][2] == pytest.approx(s.prob)
        assert all(a[2] >= b[2] for a, b in zip(s.top, s.top[1:]))
    gen = pg.generate(image, ex.prompt, max_tokens=len(ex.steps) if ex.finish_reason == "length" else 64)
    assert ex.text == gen.text
    assert [s.id for s in ex.steps if s.id != pg.tokenizer.eos_id] == gen.tokens
    assert ex.teacher_forced["same_choice"] and ex.teacher_forced["max_abs_logprob_diff"] < 1e-3


def test_explain_demo_detection(tmp_path):
    pg = pg_edge.load("demo")
    prompt = "detect circle ; square ; triangle"
    ex = explain(pg, SHAPES, prompt, top_k=3)
    conv, siglip, feats = check_model_shapes(pg, ex, SHAPES)
    check_steps(ex, pg, SHAPES)
    n = pg.config.num_image_tokens
    prompt_ids = pg.tokenizer.prompt_ids(prompt, n)
    assert [t.id for t in ex.tokens[:len(prompt_ids)]] == prompt_ids
    assert [t.kind for t in ex.tokens[n - 1:n + 2]] == ["image", "bos", "prompt"]
    assert ex.tokens[len(prompt_ids) - 1].kind == "separator" and ex.prefix_length == len(prompt_ids)
    assert ex.tokens[-1].kind == "eos" and ex.finish_reason == "stop"
    assert [o.label for o in ex.objects] == ["circle", "square", "triangle"]
    again = explain(pg, SHAPES, prompt, top_k=3)  # SigLIP's features now come from the cache
    assert again.vision == ex.vision and again.text == ex.text and pg.vision_calls == 1

    text = ex.to_text()
    assert f"float32[{', '.join(map(str, siglip.shape))}]" in text
    assert f"image features float32[{', '.join(map(str, feats.shape))}]" in text
    assert f"patch conv -> float32[{', '.join(map(str, conv.shape))}]" in text
    assert f"{ex.prefix_length} prefix tokens ({n} image" in text
    generation = text.split("7. generation")[1].split("8. answer")[0].splitlines()[2:-1]
    assert len(generation) == len(ex.steps)  # one line per generated token, its probability printed
    for s, line in zip(ex.steps, generation):
        assert line.split()[0] == str(s.position) and f"{s.prob:.3f}" in line

    paths = {p.name for p in ex.save(tmp_path)}
    assert paths == {"input.png", "layout.png", "mask.png", "answer.png"}  # window 512 > sequence
    drawn = read_mask_picture(tmp_path / "mask.png")
    want = builder_mask(ex.tokens)
    assert np.array_equal(drawn, want) and np.array_equal(drawn, ex.masks[None])
    P, T = ex.prefix_length, len(ex.tokens)
    assert drawn[:P, :P].all() and not drawn[:P, P:].any()  # prefix both ways, never the answer
    assert np.array_equal(drawn[P:, P:], np.tril(np.ones((T - P, T - P), bool)))  # suffix causal
    assert ex.masks[512] is not None and np.array_equal(ex.masks[512], want)


def test_explain_demo_segment_draws_masks(tmp_path, capsys):
    assert main(["explain", "demo", "--image", str(SHAPES), "--prompt", "segment circle ; square ; triangle", "-o",
                 str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "mask " in out and "circle: bins (y1, x1, y2, x2)" in out
    assert main(["explain", "demo", "--image", str(SHAPES), "--prompt", "caption en", "--no-check"]) == 0
    quick = capsys.readouterr().out
    assert "7. generation" in quick and "one pass over all" not in quick
    assert (tmp_path / "answer.png").is_file()


@pytest.mark.parametrize("version,window", [(1, None), (2, 8)])
def test_explain_cli_on_fixtures(version, window, hf_checkpoint, sample_images, tmp_path, capsys):
    folder = hf_checkpoint(version=version, sliding_window=window)
    image = tmp_path / "cat.png"
    sample_images[0].save(image)
    out_dir = tmp_path / "out"
    assert main(["explain", str(folder), "--image", str(image), "--prompt", "caption en", "-o", str(out_dir),
                 "--max-tokens", "12", "--top", "4"]) == 0
    out = capsys.readouterr().out
    pg = pg_edge.load(folder)
    ex = explain(pg, image, "caption en", max_tokens=12, top_k=4)
    ex.model = str(folder)
    assert out == ex.to_text() + "\n"  # the same run, printed
    from PIL import Image

    conv, siglip, feats = check_model_shapes(pg, ex, Image.open(image))
    assert f"final LayerNorm -> float32[{', '.join(map(str, siglip.shape))}]" in out
    assert f"decoder input [1, {ex.prefix_length}, {pg.config.text.hidden_size}]" in out
    check_steps(ex, pg, image)
    generation = out.split("7. generation")[1].split("8. answer")[0].splitlines()[2:-1]
    assert len(generation) == len(ex.steps) > 0
    for s, line in zip(ex.steps, generation):
        assert line.split()[0] == str(s.position) and f"{s.prob:.3f}" in line
    drawn = read_mask_picture(out_dir / "mask.png")
    assert np.array_equal(drawn, builder_mask(ex.tokens))
    if window:
        assert "sliding window 8 on layers 0, 2" in out
        cut = read_mask_picture(out_dir / f"mask_window{window}.png")
        want = builder_mask(ex.tokens, window)
        assert np.array_equal(cut, want) and not np.array_equal(cut, drawn)
        P = ex.prefix_length
        assert cut[:P, :P].all()  # the window never cuts the prefix block
        assert not cut[-1, :len(ex.tokens) - window].any()  # the last answer token: last 8 keys only
        px = np.asarray(Image.open(out_dir / f"mask_window{window}.png").convert("RGB"))
        assert (px == WINDOW_CUT).all(-1).any()  # what the window removes is drawn
    else:
        assert not (out_dir / "mask_window8.png").exists() and "every layer global" in out
    px = np.asarray(Image.open(out_dir / "mask.png").convert("RGB"))
    assert (px == PREFIX_ATTEND).all(-1).any() and (px == SUFFIX_ATTEND).all(-1).any()


def _error(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return rc, err


def test_explain_bad_input_errors_like_run(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    long_prompt = "caption " + " ".join(["circle"] * 600)
    cases = [
        ["demo", "--image", str(tmp_path / "missing.png"), "--prompt", "caption en"],
        ["demo", "--image", str(tmp_path / "bad.png"), "--prompt", "caption en"],
        [str(tmp_path / "no-model"), "--image", str(SHAPES), "--prompt", "caption en"],
        ["demo", "--image", str(SHAPES), "--prompt", long_prompt],
        ["demo", "--image", str(SHAPES), "--prompt", "caption en", "--max-tokens", "0"],
    ]
    for argv in cases:
        rc_run, err_run = _error(capsys, ["run", *argv])
        rc, err = _error(capsys, ["explain", *argv])
        assert rc == rc_run == 2, (argv, err)
        assert err == err_run.replace("pg-edge run:", "pg-edge explain:"), (err, err_run)
    rc, err = _error(capsys, ["explain", "demo", "--image", str(SHAPES), "--prompt", "caption en", "--top", "0"])
    assert rc == 2 and err == "pg-edge explain: error: --top must be from 1 to 20, got 0"
    with pytest.raises(pg_edge.errors.PgEdgeError, match="top_k"):
        explain(pg_edge.load("demo"), SHAPES, "caption en", top_k=50)


def test_explain_output_folder_never_overwrites_inputs_or_foreign_pictures(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    image = photos / "shapes.png"
    image.write_bytes(SHAPES.read_bytes())
    argv = ["explain", "demo", "--image", str(image), "--prompt", "caption en", "--max-tokens", "4", "-o"]
    rc, err = _error(capsys, argv + [str(photos)])  # the folder holding the image
    assert rc == 2 and "contains the input" in err
    rc, err = _error(capsys, argv + [str(demo.MODEL_DIR / "pictures")])  # inside the model
    assert rc == 2 and "lies inside the input" in err
    rc, err = _error(capsys, argv + [str(image)])
    assert rc == 2 and "is the input" in err
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = _error(capsys, argv + [str(tmp_path / "notes.txt")])
    assert rc == 2 and "is not a folder" in err and (tmp_path / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "mask.png")  # someone else's picture
    before = (out / "mask.png").read_bytes()
    rc, err = _error(capsys, argv + [str(out)])
    assert rc == 2 and "not an image pg-edge drew" in err and (out / "mask.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["mask.png"]
    (out / "mask.png").unlink()
    assert main(argv + [str(out)]) == 0 and main(argv + [str(out)]) == 0  # its own pictures: replaced
    assert {p.name for p in out.iterdir()} == {"input.png", "layout.png", "mask.png"}
    assert not (demo.MODEL_DIR / "pictures").exists()
