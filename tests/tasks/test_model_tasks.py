"""Task calls and commands: prompt -> generate -> parse -> masks -> JSON / drawing.

Random-weight fixtures never emit loc/seg tokens, so most tests replace `generate` with one that
returns crafted output and check boxes, masks, PNG and JSON end to end; one test runs the real
tiny model through every command.
"""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pg_edge.cli import main
from pg_edge.convert.vae import convert_vae
import pg_edge
from pg_edge.tasks import calls
from pg_edge.tasks.draw import color_for
from pg_edge.tasks.calls import rle_to_mask
from pg_edge.errors import PgEdgeError
from pg_edge.generate import GenerationResult
from pg_edge.pipeline import PaliGemma, load
from pg_edge.model.vae import load_mask_decoder
from fixtures.vae import write_fake_vae

W, H = 300, 200  # original image size: boxes must come back in these pixels


def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes):
    return "".join(f"<seg{c:03d}>" for c in codes)


DETECT_OUT = f"{loc(0, 0, 511, 1023)} cat ; {loc(512, 256, 1023, 767)} black dog ; {loc(5, 5)} junk"
SEGMENT_OUT = f"{loc(102, 51, 920, 972)}{seg(*range(3, 131, 8))} cat"


class FakePg:
    """Stands in for PaliGemma: records the prompt, returns crafted text."""

    def __init__(self, text, folder=None, finish_reason="stop"):
        self.text, self.folder, self.calls, self.finish = text, folder, [], finish_reason

    def generate(self, image, prompt, **gen):
        self.calls.append((image.size, prompt, gen))
        return GenerationResult(text=self.text, tokens=[5, 6], prompt_tokens=9, finish_reason=self.finish)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return convert_vae(write_fake_vae(d / "vae-oid.npz", seed=3), d / "vae.safetensors")


def test_text_tasks_build_the_prompt_and_clean_the_text(image):
    pg = FakePg("a cat on a mat<eos>")
    assert calls.caption(pg, image, "es", max_tokens=7).text == "a cat on a mat"
    assert calls.ocr(pg, image).task == "ocr"
    r = calls.ask(pg, image, "what is  this?")
    assert [c[1] for c in pg.calls] == ["caption es", "ocr", "answer en what is this?"]
    assert pg.calls[0][2] == {"max_tokens": 7} and pg.calls[0][0] == (W, H)
    assert r.objects == [] and r.image_size == (W, H) and r.generation.tokens == [5, 6]
    with pytest.raises(PgEdgeError):
        calls.ask(pg, image, "two\nlines")


def test_detect_boxes_in_original_pixels(image):
    pg = FakePg(DETECT_OUT)
    r = calls.detect(pg, image, ["cat", "black dog"])
    assert pg.calls[0][1] == "detect cat ; black dog"
    assert [o.label for o in r.objects] == ["cat", "black dog"]
    np.testing.assert_allclose(r.objects[0].box, (0, 0, W, 511 / 1023 * H))
    np.testing.assert_allclose(r.objects[1].box, (256 / 1023 * W, 512 / 1023 * H, 767 / 1023 * W, H))
    assert len(r.skipped) == 1 and "junk" in r.skipped[0].text
    out = json.loads(json.dumps(calls.to_json(r)))
    assert out["objects"][1]["box"] == [round(256 / 1023 * W, 2), round(512 / 1023 * H, 2), round(767 / 1023 * W, 2), H]
    assert out["objects"][0]["loc"] == [0, 0, 511, 1023] and "mask" not in out["objects"][0]
    assert out["image_size"] == [W, H] and out["skipped"][0]["reason"]
    assert out["generation"]["finish_reason"] == "stop"


def test_objects_not_asked_for_are_reported_apart(image, vae_file):
    """Only objects labelled with a name asked for are results; the rest go to `unmatched`
    (labels compared without surrounding blanks and case)."""
    r = calls.detect(FakePg(DETECT_OUT), image, "Cat")
    assert [o.label for o in r.objects] == ["cat"] and [o.label for o in r.unmatched] == ["black dog"]
    out = calls.to_json(r)
    assert [o["label"] for o in out["objects"]] == ["cat"]
    assert out["unmatched"] == [{"label": "black dog", "box": [round(256 / 1023 * W, 2), round(512 / 1023 * H, 2),
                                                             round(767 / 1023 * W, 2), H], "loc": [512, 256, 1023, 767]}]
    assert out["truncated"] is False
    r = calls.detect(FakePg(DETECT_OUT), image, "dog")
    assert r.objects == [] and len(r.unmatched) == 2
    r = calls.segment(FakePg(SEGMENT_OUT), image, "dog", vae=vae_file)
    assert r.objects == [] and [o.label for o in r.unmatched] == ["cat"]


def test_cut_off_answer_is_flagged(image):
    r = calls.detect(FakePg(DETECT_OUT, finish_reason="length"), image, "cat")
    assert r.truncated and calls.to_json(r)["truncated"] is True
    assert not calls.detect(FakePg(DETECT_OUT), image, "cat").truncated


def test_segment_masks_inside_their_box_and_rle(image, vae_file, tmp_path):
    r = calls.segment(FakePg(SEGMENT_OUT), image, "cat", vae=vae_file)
    (obj,) = r.objects
    assert obj.mask.shape == (H, W) and obj.mask.dtype == bool and obj.mask.any()
    x1, y1, x2, y2 = (int(v) for v in obj.box)
    outside = obj.mask.copy()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()
    rle = calls.to_json(r)["objects"][0]["mask"]
    assert rle["size"] == [H, W] and (rle_to_mask(rle) == obj.mask).all()
    # Same masks with the decoder given as an object, or found as vae.safetensors in the folder.
    shutil.copy(vae_file, tmp_path / "vae.safetensors")
    for pg, vae in [(FakePg(SEGMENT_OUT), load_mask_decoder(vae_file)), (FakePg(SEGMENT_OUT, tmp_path), None)]:
        assert (calls.segment(pg, image, "cat", vae=vae).objects[0].mask == obj.mask).all()


def test_segment_without_decoder_fails_before_generating(image, tmp_path):
    pg = FakePg(SEGMENT_OUT, folder=tmp_path)
    with pytest.raises(PgEdgeError, match="convert-vae"):
        calls.segment(pg, image, "cat")
    with pytest.raises(PgEdgeError, match="not found"):
        calls.segment(pg, image, "cat", vae=tmp_path / "nope.safetensors")
    assert pg.calls == []


def test_draw_marks_the_box_in_the_object_colour(image):
    r = calls.detect(FakePg(DETECT_OUT), image, "cat ; black dog")
    drawn = np.asarray(calls.draw(r, image))
    x1, y1, x2, y2 = (int(v) for v in r.objects[1].box)
    assert tuple(drawn[(y1 + y2) // 2, x1]) == color_for(1)  # left edge of the dog's box
    with pytest.raises(PgEdgeError):
        calls.draw(r, image.resize((10, 10)))


# --- the commands ----------------------------------------------------------------------------

@pytest.fixture
def model_dir(converted, tmp_path):
    """A writable copy of the tiny converted PG1 model (tests add vae.safetensors to it)."""
    return shutil.copytree(converted(version=1), tmp_path / "model")


@pytest.fixture
def image_file(image, tmp_path):
    image.save(tmp_path / "img.png")
    return str(tmp_path / "img.png")


def crafted(monkeypatch, text, finish_reason="stop"):
    def generate(self, image, prompt, **gen):
        return GenerationResult(text=text, tokens=[1], prompt_tokens=3, finish_reason=finish_reason)

    monkeypatch.setattr(PaliGemma, "generate", generate)


def test_detect_command_json_and_png(model_dir, image_file, tmp_path, monkeypatch, capsys):
    crafted(monkeypatch, DETECT_OUT)
    png = tmp_path / "boxes.png"
    assert main(["detect", str(model_dir), "--image", image_file, "cat ; black dog", "-o", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["label"] for o in out["objects"]] == ["cat", "black dog"]
    assert Image.open(png).size == (W, H)
    assert main(["detect", str(model_dir), "--image", image_file, "cat"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"cat  [0.0, 0.0, {W:.1f}, {511 / 1023 * H:.1f}]"]  # "black dog" was not asked
    assert f"unmatched (not asked for): black dog  [{256 / 1023 * W:.1f}, {512 / 1023 * H:.1f}, " in err
    assert "cut off" not in err


def test_segment_command_says_when_cut_off(model_dir, image_file, vae_file, monkeypatch, capsys):
    crafted(monkeypatch, SEGMENT_OUT, finish_reason="length")
    assert main(["segment", str(model_dir), "--image", image_file, "cat", "--vae", str(vae_file),
                 "--max-tokens", "21"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("cat  [")
    assert "cut off at the token limit (21 tokens): objects may be missing; raise it with --max-tokens" in err


def test_segment_command_finds_vae_in_model_folder(model_dir, image_file, vae_file, tmp_path, monkeypatch, capsys):
    crafted(monkeypatch, SEGMENT_OUT)
    args = ["segment", str(model_dir), "--image", image_file, "cat", "--json"]
    assert main(args) == 2  # no decoder anywhere yet: a clear error, not a traceback
    assert "convert-vae" in capsys.readouterr().err
    assert main(args + ["--vae", str(vae_file)]) == 0
    with_flag = json.loads(capsys.readouterr().out)
    shutil.copy(vae_file, model_dir / "vae.safetensors")
    png = tmp_path / "masks.png"
    assert main(args + ["-o", str(png)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["objects"][0]["mask"] == with_flag["objects"][0]["mask"]
    assert rle_to_mask(found["objects"][0]["mask"]).any() and png.is_file()


def test_commands_check_inputs_before_loading(image_file, tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert main(["detect", missing_model, "--image", str(tmp_path / "none.png"), "cat"]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["detect", missing_model, "--image", image_file, "cat", "-o", str(tmp_path / "x.nope")]) == 2
    assert "image format" in capsys.readouterr().err
    assert main(["segment", missing_model, "--image", image_file, "cat", "--vae", str(tmp_path / "v")]) == 2
    assert "mask decoder not found" in capsys.readouterr().err


def test_real_tiny_model_runs_every_command(model_dir, image_file, capsys):
    """No mocks: the random model's output is noise, but every command must run and exit 0."""
    pg = load(model_dir)
    for argv in (["caption", "--lang", "de"], ["ocr"], ["ask", "what is it?"], ["detect", "cat ; dog", "--json"]):
        assert main([argv[0], str(model_dir), "--image", image_file, *argv[1:], "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("{") and json.loads(out[-1])["task"] == "detect"
    # Same text as calling the function directly (the command adds nothing of its own).
    direct = calls.caption(pg, image_file, "de", max_tokens=4).text
    assert out[0] == direct


def test_tasks_are_methods_of_the_loaded_model(model_dir, image, monkeypatch):
    """`pg.detect(...)` etc. on the object `pg_edge.load` returns, same results as the functions."""
    crafted(monkeypatch, DETECT_OUT)
    pg = pg_edge.load(model_dir)
    r = pg.detect(image, "cat ; black dog")
    assert [o.label for o in r.objects] == ["cat", "black dog"]
    assert r.objects[0].box == calls.detect(pg, image, "cat ; black dog").objects[0].box
    assert pg.caption(image).prompt == "caption en"
