"""Data loss: no writing command writes over one of its inputs, and `--force` replaces only an
output pg-edge wrote (pg_edge.checkpoint.output_check). Each case: non-zero exit, one error line, every input
byte-for-byte as before; and --force still replaces the command's own previous output."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pg_edge.cli import main
from pg_edge.errors import PgEdgeError
from pg_edge.checkpoint.output_check import check_output, why_not_ours
from fixtures.vae import write_fake_vae
from train_helpers import write_colour_set


def snapshot(path: Path) -> dict:
    """{relative path: bytes} of a file or every file under a folder (symlinks as their target)."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(capsys, argv, *words) -> str:
    """Run `pg-edge ARGV`: exit 2, exactly one line on stderr (the error), holding `words`."""
    code = main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def photos(tmp_path, _sample_images_cache):
    d = tmp_path / "photos"
    d.mkdir()
    _sample_images_cache["chelsea"].resize((40, 30)).save(d / "cat.png")
    (d / "notes.txt").write_text("mine")
    return d


# -- label ------------------------------------------------------------------------------------
def test_label_never_writes_over_its_folder(photos, tmp_path, capsys):
    before = snapshot(photos)
    label = ["label", "demo", photos, "--detect", "cat", "--quiet"]
    refused(capsys, [*label, "-o", photos, "--force"], "is the input")  # the case
    refused(capsys, [*label, "-o", photos], "is the input")
    refused(capsys, [*label, "-o", photos / "labels.json", "--force"], "inside the input")
    refused(capsys, [*label, "-o", tmp_path, "--force"], "contains the input")
    link = tmp_path / "link"
    link.symlink_to(photos)
    refused(capsys, [*label, "-o", link, "--force"], "is the input")  # symlinks resolved
    assert snapshot(photos) == before and not list(photos.glob(".*"))


def test_label_force_replaces_only_a_labels_file(photos, tmp_path, capsys):
    label = ["label", "demo", photos, "--detect", "cat", "--quiet", "--max-tokens", "2"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"images": [], "annotations": []}))  # JSON, but not pg-edge's
    other = tmp_path / "folder"
    other.mkdir()
    (other / "x.txt").write_text("x")
    for out in (mine, other):
        before = snapshot(out)
        refused(capsys, [*label, "-o", out, "--force"], "not a labels file pg-edge label wrote")
        refused(capsys, [*label, "-o", out], "not a labels file pg-edge label wrote")
        assert snapshot(out) == before
    out = tmp_path / "labels.json"
    assert main([str(a) for a in [*label, "-o", out]]) == 0
    first = json.loads(out.read_text())
    assert first["pg_edge"]["done"] == ["cat.png"]
    assert main([str(a) for a in [*label, "-o", out, "--force"]]) == 0  # its own: replaced
    assert json.loads(out.read_text())["pg_edge"]["done"] == ["cat.png"]


# -- finetune ---------------------------------------------------------------------------------
def test_finetune_never_writes_over_its_data_or_model(converted, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(converted(version=1), model)
    data = write_colour_set(tmp_path / "data", 2, seed=0).parent
    before = {p: snapshot(p) for p in (model, data)}
    ft = ["finetune", model, "--data", data, "--train", "attn", "--steps", 1, "--batch-size", 2, "--quiet"]
    refused(capsys, [*ft, "-o", data, "--force"], "is the input")  # the cases
    refused(capsys, [*ft, "-o", model, "--force"], "is the input")
    refused(capsys, [*ft, "-o", data / "run", "--force"], "inside the input")
    refused(capsys, [*ft, "-o", tmp_path, "--force"], "contains the input")
    valid = write_colour_set(tmp_path / "valid", 2, seed=1).parent
    refused(capsys, [*ft, "--valid", valid, "-o", valid, "--force"], "is the input")
    arbitrary = tmp_path / "notes"
    arbitrary.mkdir()
    (arbitrary / "todo.txt").write_text("mine")
    refused(capsys, [*ft, "-o", arbitrary, "--force"], "not a pg-edge training output", "todo.txt")
    assert (arbitrary / "todo.txt").read_text() == "mine"
    assert {p: snapshot(p) for p in (model, data)} == before

    out = tmp_path / "run"
    assert main([str(a) for a in [*ft, "-o", out]]) == 0
    (out / "log.jsonl").write_text('{"step": 99}\n')  # marks the previous run
    assert main([str(a) for a in [*ft, "-o", out, "--force"]]) == 0  # its own: replaced
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]


# -- convert, quantize, convert-vae, export ---------------------------------------------------
def test_convert_and_quantize_never_write_over_their_source(hf_checkpoint, qsrc, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(hf_checkpoint(version=1), hf)
    hf_before = snapshot(hf)
    refused(capsys, ["convert", hf, "-o", hf, "--force", "--quiet"], "is the input")
    refused(capsys, ["convert", hf, "-o", hf / "mlx", "--force", "--quiet"], "inside the input")
    refused(capsys, ["convert", hf, "-o", tmp_path, "--force", "--quiet"], "contains the input")
    refused(capsys, ["convert", hf, "-o", hf, "-q", "4", "--force", "--quiet"], "is the input")
    assert snapshot(hf) == hf_before and not (hf / "mlx").exists()

    npz = tmp_path / "ckpt" / "model.npz"
    npz.parent.mkdir()
    npz.write_bytes(b"PK not really")
    refused(capsys, ["convert", npz, "-o", npz.parent, "--force", "--quiet"], "contains the input")
    refused(capsys, ["convert", npz, "-o", npz.parent, "-q", "4", "--force", "--quiet"], "contains the input")
    assert npz.read_bytes() == b"PK not really"

    _, src = qsrc(1)
    float_dir = tmp_path / "float"
    shutil.copytree(src, float_dir)
    before = snapshot(float_dir)
    refused(capsys, ["quantize", float_dir, "-o", float_dir, "--force", "--quiet"], "is the input")
    refused(capsys, ["quantize", float_dir, "-o", tmp_path, "--force", "--quiet"], "contains the input")
    assert snapshot(float_dir) == before
    # --force over a folder that is not pg-edge's (an HF checkpoint) is refused; over its own
    # output it replaces it.
    refused(capsys, ["quantize", float_dir, "-o", hf, "--force", "--quiet"], "not a pg-edge model output",
            "pg_edge_version")
    assert snapshot(hf) == hf_before
    out = tmp_path / "q4"
    assert main(["quantize", str(float_dir), "-o", str(out), "--probes", "0", "--quiet"]) == 0
    assert main(["quantize", str(float_dir), "-o", str(out), "--probes", "0", "--quiet", "--force"]) == 0
    capsys.readouterr()


def test_convert_vae_replaces_only_a_mask_decoder(converted, tmp_path, capsys):
    npz = write_fake_vae(tmp_path / "vae-oid.npz", embed_dim=4)
    model = tmp_path / "model"
    shutil.copytree(converted(version=1), model)
    before = snapshot(model)
    refused(capsys, ["convert-vae", npz, "-o", next(model.glob("*.safetensors")), "--force"],
            "not a pg-edge vae output")
    refused(capsys, ["convert-vae", npz, "-o", model, "--force"], "must end in .safetensors")
    assert snapshot(model) == before
    out = tmp_path / "vae.safetensors"
    assert main(["convert-vae", str(npz), "-o", str(out)]) == 0
    assert main(["convert-vae", str(npz), "-o", str(out), "--force"]) == 0  # its own: replaced
    capsys.readouterr()


def test_export_never_writes_over_its_model(converted, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(converted(version=1), model)
    before = snapshot(model)
    refused(capsys, ["export", model, "-o", model, "--force", "--quiet"], "is the input")
    refused(capsys, ["export", model, "-o", model / "bundle", "--force", "--quiet"], "inside the input")
    refused(capsys, ["export", model, "-o", tmp_path, "--force", "--quiet"], "contains the input")
    other = tmp_path / "other"
    shutil.copytree(model, other)  # a model folder is not a bundle
    refused(capsys, ["export", model, "-o", other, "--force", "--quiet"], "not a pg-edge bundle output")
    assert snapshot(model) == before and snapshot(other) == before
    bundle = tmp_path / "bundle"
    assert main(["export", str(model), "-o", str(bundle), "--quiet", "--max-tokens", "4"]) == 0
    first = json.loads((bundle / "manifest.json").read_text())["bundle_id"]
    assert main(["export", str(model), "-o", str(bundle), "--quiet", "--max-tokens", "4", "--force"]) == 0
    assert json.loads((bundle / "manifest.json").read_text())["bundle_id"] != first  # its own: replaced


def test_demo_model_is_an_input_too(tmp_path, capsys):
    from pg_edge.demo import MODEL_DIR

    before = snapshot(MODEL_DIR)
    refused(capsys, ["quantize", "demo", "-o", MODEL_DIR, "--force", "--quiet"], "is the input")
    refused(capsys, ["export", "demo", "-o", MODEL_DIR, "--force", "--quiet"], "is the input")
    assert snapshot(MODEL_DIR) == before


# -- detect / segment -o -------------------------------------------------------------------
def test_detect_drawing_never_replaces_the_image_or_a_foreign_file(photos, converted, tmp_path, capsys):
    model = str(converted(version=1))
    image = photos / "cat.png"
    before = snapshot(photos)
    detect = ["detect", model, "--image", image, "cat", "--max-tokens", "2"]
    refused(capsys, [*detect, "-o", image], "is the input")
    link = tmp_path / "link.png"
    link.symlink_to(image)
    refused(capsys, [*detect, "-o", link], "is the input")
    foreign = tmp_path / "holiday.png"
    shutil.copy(image, foreign)
    refused(capsys, [*detect, "-o", foreign], "not a pg-edge drawing output")
    assert snapshot(photos) == before and foreign.read_bytes() == image.read_bytes()
    out = tmp_path / "boxes.png"
    assert main([str(a) for a in [*detect, "-o", out]]) == 0
    first = out.stat().st_ino
    assert main([str(a) for a in [*detect, "-o", out]]) == 0  # its own drawing: replaced
    assert out.stat().st_ino != first and not list(tmp_path.glob(".boxes*"))
    capsys.readouterr()


# -- the rule itself --------------------------------------------------------------------------
def test_check_output_rule(converted, tmp_path):
    model = converted(version=1)
    assert why_not_ours(model, "model") is None
    assert "no config.json" in why_not_ours(Path(__file__).parent, "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, True, kind="model") == empty.resolve()  # nothing to lose
    with pytest.raises(PgEdgeError, match="exists; pass --force"):
        check_output(empty, False, kind="model")
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(PgEdgeError, match="symbolic link"):
        check_output(link, True, kind="model")
    with pytest.raises(PgEdgeError, match="is the input"):
        check_output(tmp_path / "a" / ".." / "empty", True, kind="model", inputs=[empty])
    training = tmp_path / "run"
    (training / "checkpoints").mkdir(parents=True)
    (training / ".model.partial-1-0123abcd").mkdir()  # a dead writer's temporary
    assert why_not_ours(training, "training") is None
    (training / "cat.png").write_bytes(b"x")
    assert "cat.png" in why_not_ours(training, "training")
    assert os.path.exists(training / "cat.png")


def test_demo_app_never_draws_over_a_given_picture(tmp_path, capsys):
    from apps.demo import main as demo_main
    from pg_edge.demo import SAMPLES

    shutil.copy(SAMPLES[0], tmp_path / "x.png")
    shutil.copy(SAMPLES[0], tmp_path / "x_detect.png")  # what x.png's detect picture would be named
    before = snapshot(tmp_path)
    assert demo_main([str(tmp_path / "x.png"), str(tmp_path / "x_detect.png"), "--out", str(tmp_path)]) == 1
    assert "is the input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
