"""`pg-edge label`: a folder of images -> COCO JSON, broken images reported, resumable."""
import json
import re
import pytest

from pg_edge.cli import main
from pg_edge.convert.vae import convert_vae
from pg_edge.tasks.calls import rle_to_mask
from pg_edge.generate import GenerationResult
from pg_edge.pipeline import PaliGemma
from pg_edge.tasks.parse import decode_box
from fixtures.vae import write_fake_vae


def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


CRAFTED = f"{loc(100, 200, 600, 900)} cat ; {loc(0, 0, 1023, 511)} black dog ; {loc(50, 60, 500, 700)} dog"
CRAFTED_SEG = f"{loc(102, 51, 920, 972)}" + "".join(f"<seg{c:03d}>" for c in range(3, 131, 8)) + " cat"


@pytest.fixture
def folder(tmp_path, _sample_images_cache):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    _sample_images_cache["chelsea"].resize((120, 80)).save(d / "a_cat.png")
    _sample_images_cache["astronaut"].resize((64, 64)).save(d / "sub" / "b_astronaut.jpg")
    _sample_images_cache["coffee_portrait"].resize((40, 60)).save(d / "c_coffee.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (d / "notes.txt").write_text("not an image, ignored")
    return d


@pytest.fixture(scope="module")
def model(converted):
    return str(converted(version=1))


def run_label(folder, model, out, *extra):
    return main(["label", model, str(folder), "--detect", "cat ; dog", "-o", str(out),
                 "--max-tokens", "4", *extra])


def test_real_model_on_a_folder_with_a_broken_image(folder, model, tmp_path, capsys):
    out = tmp_path / "labels.json"
    assert run_label(folder, model, out) == 0
    err = capsys.readouterr().err
    assert "skipped broken.jpg: cannot read image" in err and "label [" in err
    coco = json.loads(out.read_text())
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        ("a_cat.png", 120, 80), ("c_coffee.png", 40, 60), ("sub/b_astronaut.jpg", 64, 64)]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    (skipped,) = coco["pg_edge"]["skipped"]
    assert skipped["file"] == "broken.jpg" and "cannot read image" in skipped["reason"]
    assert all(a["image_id"] in (1, 2, 3) for a in coco["annotations"])


def test_annotations_are_coco_boxes_and_masks(folder, model, tmp_path, monkeypatch):
    calls = []

    def generate(self, image, prompt, **gen):
        calls.append(prompt)
        return GenerationResult(text=CRAFTED_SEG if prompt.startswith("segment") else CRAFTED,
                                tokens=[1], prompt_tokens=3, finish_reason="stop")

    monkeypatch.setattr(PaliGemma, "generate", generate)
    out = tmp_path / "labels.json"
    assert run_label(folder, model, out) == 0
    coco = json.loads(out.read_text())
    assert calls == ["detect cat ; dog"] * 3
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert [a["category_id"] for a in first] == [1, 2]  # cat, dog; "black dog" was not asked for
    x1, y1, x2, y2 = decode_box((100, 200, 600, 900), (120, 80))
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert first[0]["area"] == pytest.approx((x2 - x1) * (y2 - y1), abs=0.05)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) == 6
    assert {"file": "a_cat.png", "label": "black dog"} in coco["pg_edge"]["unmatched"]

    d = tmp_path / "vae"
    d.mkdir()
    vae = convert_vae(write_fake_vae(d / "vae-oid.npz", seed=3), d / "vae.safetensors")
    seg_out = tmp_path / "masks.json"
    assert run_label(folder, model, seg_out, "--segment", "--vae", str(vae)) == 0
    ann = json.loads(seg_out.read_text())["annotations"][0]
    mask = rle_to_mask(ann["segmentation"])
    assert mask.shape == (80, 120) and ann["area"] == int(mask.sum()) > 0


def test_resume_after_an_interruption(folder, model, tmp_path, monkeypatch, capsys):
    calls = []

    def generate(self, image, prompt, **gen):
        calls.append(image.size)
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return GenerationResult(text=CRAFTED, tokens=[1], prompt_tokens=3, finish_reason="stop")

    monkeypatch.setattr(PaliGemma, "generate", generate)
    out = tmp_path / "labels.json"
    interrupt = True
    assert run_label(folder, model, out) == 130
    partial = json.loads(out.read_text())
    # Images go to the model in batches (a pool asks for several at once): the interrupted one
    # is never recorded; the others may or may not have finished first.
    done = partial["pg_edge"]["done"]
    sizes = {"a_cat.png": (120, 80), "sub/b_astronaut.jpg": (64, 64), "c_coffee.png": (40, 60)}
    assert len(done) <= 2 and set(done) <= set(sizes)
    interrupt, calls[:] = False, []
    assert run_label(folder, model, out) == 0
    assert sorted(calls) == sorted(v for k, v in sizes.items() if k not in done)  # only those not done
    coco = json.loads(out.read_text())
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert len(coco["pg_edge"]["skipped"]) == 1  # broken.jpg reported once, not retried
    err = capsys.readouterr().err
    assert re.search(r"wrote .*labels\.json: \d+ images", err) and (not done or "done before" in err)

    assert main(["label", model, str(folder), "--detect", "cat", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    calls[:] = []
    assert run_label(folder, model, out, "--force") == 0 and len(calls) == 3


def test_bad_inputs_fail_before_loading(tmp_path, capsys):
    out = str(tmp_path / "o.json")
    assert main(["label", "x", str(tmp_path / "nope"), "--detect", "cat", "-o", out]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["label", "x", str(tmp_path), "--detect", "cat ; ", "-o", out]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_label_with_the_demo_model(tmp_path):
    """MODEL demo: the built-in demo model labels its own sample images (real boxes, in pixels)."""
    import shutil

    from pg_edge.demo import SAMPLES

    d = tmp_path / "shapes"
    d.mkdir()
    for f in SAMPLES:
        shutil.copy(f, d / f.name)
    out = tmp_path / "shapes.json"
    assert main(["label", "demo", str(d), "--detect", "circle ; square ; triangle", "-o", str(out), "--quiet"]) == 0
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    assert len(coco["images"]) == len(SAMPLES)
    assert len(coco["annotations"]) >= len(SAMPLES)  # every sample has at least one shape
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 224 and y + h <= 224
