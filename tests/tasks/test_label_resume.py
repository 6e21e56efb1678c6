"""Issue 23 item 14: `pg-edge label` resume checks what the labels file was made from (folder,
model, task, objects); a labels file of the right shape with wrong content is one line; an
unreadable subfolder is reported; non-UTF-8 file names are stored as valid JSON, losslessly."""
from __future__ import annotations

import copy
import json
import os

import pytest

from pg_edge.cli import main
from pg_edge.generate import GenerationResult
from pg_edge.pipeline import PaliGemma


@pytest.fixture
def photos(tmp_path, _sample_images_cache):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    _sample_images_cache["chelsea"].resize((40, 30)).save(d / "a.png")
    _sample_images_cache["chelsea"].resize((30, 40)).save(d / "sub" / "b.png")
    return d


@pytest.fixture
def calls(monkeypatch):
    """PaliGemma.generate replaced: one box of "cat" per image; records the image sizes."""
    seen = []

    def generate(self, image, prompt, **gen):
        seen.append(image.size)
        return GenerationResult(text="<loc0100><loc0100><loc0500><loc0500> cat", tokens=[1],
                                prompt_tokens=3, finish_reason="stop")

    monkeypatch.setattr(PaliGemma, "generate", generate)
    return seen


@pytest.fixture(scope="module")
def model(converted):
    return str(converted(version=1))


def label(folder, model, out, *extra) -> int:
    return main(["label", model, str(folder), "--detect", "cat", "-o", str(out), "--quiet", *extra])


def one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" not in err[0] and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_resume_refuses_a_file_made_from_another_folder(photos, model, tmp_path, calls, capsys):
    out = tmp_path / "labels.json"
    assert label(photos, model, out) == 0
    meta = json.loads(out.read_text())["pg_edge"]
    assert meta["folder"] == str(photos.resolve()) and meta["model_folder"] == str(os.path.realpath(model))
    other = tmp_path / "other"
    other.mkdir()
    (photos / "a.png").rename(other / "a.png")  # same name, another folder: was silently skipped
    before = out.read_bytes()
    calls.clear()
    capsys.readouterr()
    assert label(other, model, out) == 2
    one_line(capsys, "made from other inputs", "folder", str(other.resolve()), "--force")
    assert out.read_bytes() == before and calls == []
    assert label(other, model, out, "--force") == 0 and calls == [(40, 30)]


MUTATIONS = {
    "done not a list": lambda c: c["pg_edge"].update(done=5),
    "done of numbers": lambda c: c["pg_edge"].update(done=[1, 2]),
    "skipped of strings": lambda c: c["pg_edge"].update(skipped=["x"]),
    "skipped file a number": lambda c: c["pg_edge"].update(skipped=[{"file": 3}]),
    "unmatched not a list": lambda c: c["pg_edge"].update(unmatched={}),
    "images a string": lambda c: c.update(images="x"),
    "image id a string": lambda c: c["images"][0].update(id="1"),
    "image id a bool": lambda c: c["images"][0].update(id=True),
    "annotations of lists": lambda c: c.update(annotations=[[1]]),
    "annotation id a float": lambda c: c["annotations"][0].update(id=1.5),
    "categories missing": lambda c: c.pop("categories"),
    "category renamed": lambda c: c["categories"][0].update(name="dog"),
    "pg_edge a list": lambda c: c.update(pg_edge=[]),
    "top level a list": lambda c: c.clear() or None,
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_wrong_content_is_one_line(photos, model, tmp_path, calls, capsys, name):
    out = tmp_path / "labels.json"
    assert label(photos, model, out) == 0
    coco = json.loads(out.read_text())
    (photos / "c.png").write_bytes((photos / "a.png").read_bytes())  # something left to do
    bad = copy.deepcopy(coco)
    MUTATIONS[name](bad)
    out.write_text(json.dumps([] if name == "top level a list" else bad))
    before = out.read_bytes()
    capsys.readouterr()
    assert label(photos, model, out) == 2
    one_line(capsys)
    assert out.read_bytes() == before


def test_an_unreadable_subfolder_is_reported(photos, model, tmp_path, calls, capsys, monkeypatch):
    real = os.scandir
    locked = str(photos / "sub")

    def scandir(path="."):  # as a folder without read permission behaves (the tests run as root)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "labels.json"
    assert label(photos, model, out) == 0
    assert "skipped sub/: cannot read folder: Permission denied" in capsys.readouterr().err
    skipped = json.loads(out.read_text())["pg_edge"]["skipped"]
    assert skipped == [{"file": "sub/", "reason": "cannot read folder: Permission denied"}]
    assert label(photos, model, out) == 0  # resumed: reported again, recorded once
    assert len(json.loads(out.read_text())["pg_edge"]["skipped"]) == 1


def test_non_utf8_names_are_valid_json_and_lossless(photos, model, tmp_path, calls, capsys):
    raw = b"caf\xe9.png"  # Latin-1, not UTF-8
    os.rename(photos / "a.png", os.path.join(os.fsencode(photos), raw))
    (photos / "broken\udcff.jpg".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
     ).write_bytes(b"not a jpeg")
    out = tmp_path / "labels.json"
    assert label(photos, model, out) == 0
    coco = json.loads(out.read_bytes().decode("utf-8"))  # strict UTF-8

    def strings(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    for s in strings(coco):
        s.encode("utf-8")  # no lone surrogate anywhere (strict readers reject them)
    (image,) = [im for im in coco["images"] if "file_name_bytes" in im]
    assert image["file_name"] == "caf\\xe9.png" and bytes.fromhex(image["file_name_bytes"]) == raw
    assert {s["file"] for s in coco["pg_edge"]["skipped"]} == {"broken\\xff.jpg"}
    calls.clear()
    assert label(photos, model, out) == 0 and calls == []  # resumed: nothing done twice
