"""--adapters everywhere a model goes (issue 22 item 5): a detection fine-tune of the demo model,
made here with `pg-edge label` + `pg-edge finetune` on a COCO file, used by caption, ocr, ask,
detect, segment, explain, label, run and the desktop example's loader; each gives what the API
with the same adapters gives, and detect / segment / label parse the fine-tune's boxes.

The fine-tune renames the objects: every shape is a "red" (a word of the demo's vocabulary, one
token, never an object name in its training). On the last sample the base model answers
`detect red` with no box; with the adapters it boxes the shapes.
"""
import json
import shutil

import pytest

import pg_edge
from pg_edge.tasks import calls, parse
from pg_edge.cli import main
from pg_edge.demo import SAMPLES

OBJECTS = "red"


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(photos folder, COCO labels of its shapes as one category "red", adapters folder)."""
    root = tmp_path_factory.mktemp("adapters_cli")
    photos = root / "photos"
    photos.mkdir()
    for s in SAMPLES:
        shutil.copy(s, photos / s.name)
    labels = root / "labels.json"
    assert main(["label", "demo", str(photos), "--detect", "circle ; square ; triangle", "-o", str(labels),
                 "--quiet"]) == 0
    coco = json.loads(labels.read_text())
    coco["categories"] = [{"id": 1, "name": OBJECTS, "supercategory": "object"}]
    for a in coco["annotations"]:
        a["category_id"] = 1
    labels.write_text(json.dumps(coco))
    assert main(["finetune", "demo", "--data", str(labels), "--train", "lora", "--steps", "40",
                 "--batch-size", "3", "--lr", "3e-3", "-o", str(root / "run"), "--quiet"]) == 0
    return photos, coco, root / "run" / "adapters"


@pytest.fixture(scope="module")
def with_adapters(tuned):
    return pg_edge.load("demo", adapters=tuned[2])


def truth(coco, name):
    image_id = next(im["id"] for im in coco["images"] if im["file_name"] == name)
    return [(x, y, x + w, y + h) for a in coco["annotations"] if a["image_id"] == image_id
            for x, y, w, h in [a["bbox"]]]


def test_detect_with_adapters_parses_the_fine_tunes_boxes(tuned, with_adapters, capsys):
    photos, coco, adapters = tuned
    image = str(photos / SAMPLES[-1].name)
    assert main(["detect", "demo", "--image", image, OBJECTS, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"] == []  # the base boxes nothing "red" here
    assert main(["detect", "demo", "--image", image, OBJECTS, "--adapters", str(adapters), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = calls.to_json(calls.detect(with_adapters, image, OBJECTS))
    assert got["text"] == want["text"] and got["objects"] == want["objects"]
    boxes = [o["box"] for o in got["objects"]]
    assert boxes, got["text"]
    assert all(max(iou(b, t) for t in truth(coco, SAMPLES[-1].name)) > 0.5 for b in boxes[:1])


@pytest.mark.parametrize("argv", [
    ["caption"], ["ocr"], ["ask", "how many shapes?"], ["segment", OBJECTS],
    ["run", "--prompt", "detect red"],
])
def test_each_command_applies_the_adapters(argv, tuned, with_adapters, capsys):
    photos, _, adapters = tuned
    image = str(photos / SAMPLES[-1].name)
    command, rest = argv[0], argv[1:]
    assert main([command, "demo", "--image", image, *rest, "--adapters", str(adapters), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    prompt = {"caption": "caption en", "ocr": "ocr", "ask": "answer en how many shapes?",
              "segment": "segment red", "run": "detect red"}[command]
    # the commands print the cleaned text (run: the raw one); compared cleaned on both sides
    assert parse.clean_output(got["text"], prompt) == parse.clean_output(with_adapters.generate(image, prompt).text, prompt)


def test_explain_and_label_apply_the_adapters(tuned, with_adapters, tmp_path, capsys):
    photos, coco, adapters = tuned
    image = str(photos / SAMPLES[-1].name)
    assert main(["explain", "demo", "--image", image, "--prompt", "detect red", "--adapters", str(adapters),
                 "--no-check"]) == 0
    text = capsys.readouterr().out
    answer = with_adapters.generate(image, "detect red", max_tokens=32).text
    assert answer[:60] in text.replace("\n", "")  # the generation shown is the adapters' one

    out = tmp_path / "labels.json"
    assert main(["label", "demo", str(photos), "--detect", OBJECTS, "-o", str(out), "--quiet",
                 "--adapters", str(adapters)]) == 0
    labelled = json.loads(out.read_text())
    assert labelled["annotations"], "the fine-tune's boxes became annotations"
    assert str(adapters.resolve()) in labelled["pg_edge"]["model"]
    # a resume with other adapters (or none) is refused: the file records them
    assert main(["label", "demo", str(photos), "--detect", OBJECTS, "-o", str(out), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_desktop_example_takes_the_same_option(tuned, monkeypatch):
    from apps.desktop import __main__ as desktop

    seen = {}

    class FakeApp:  # the window itself is tested in test_desktop.py; here: what it is given
        def __init__(self, root, **kw):
            seen.update(kw)

    class FakeTk:
        def mainloop(self):
            pass

    import tkinter

    monkeypatch.setattr(tkinter, "Tk", FakeTk)
    monkeypatch.setattr("apps.desktop.app.App", FakeApp)
    assert desktop.main(["demo", "--adapters", str(tuned[2])]) == 0
    assert seen["adapters"] == str(tuned[2])
    assert desktop.main(["demo", "--adapters", str(tuned[0])]) == 2  # not an adapters folder


def test_a_folder_without_adapters_is_refused_before_loading(tuned, capsys):
    photos, _, _ = tuned
    for command in (["detect", "demo", "--image", str(SAMPLES[0]), "cat"], ["caption", "demo", "--image", str(SAMPLES[0])]):
        assert main([*command, "--adapters", str(photos)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not an adapters folder" in err
