"""Bad input: one line naming the problem, a non-zero exit, and no output folder left behind."""
import json
import shutil

import pytest

from pg_edge.cli import main


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *words):
    """Non-zero exit; exactly one error line, the last one (progress lines may precede it)."""
    assert code != 0
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    for w in words:
        assert w in errors[0], errors[0]


def test_truncated_safetensors(hf_checkpoint, tmp_path, capsys):
    src = copy_folder(hf_checkpoint(version=1), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out")
    assert_one_line_error(code, err, shard.name)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left either


def test_missing_tokenizer(hf_checkpoint, tmp_path, capsys):
    src = copy_folder(hf_checkpoint(version=1), tmp_path / "src")
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").unlink()  # the fallback; with neither there is no tokenizer
    code, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "tokenizer")
    assert not (tmp_path / "out").exists()


def test_config_of_another_model_type(hf_checkpoint, tmp_path, capsys):
    src = copy_folder(hf_checkpoint(version=1), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llava"
    (src / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "llava")
    assert not (tmp_path / "out").exists()


def test_pickled_bin_checkpoint_is_refused_unread(hf_checkpoint, tmp_path, capsys):
    src = copy_folder(hf_checkpoint(version=1), tmp_path / "src")
    for f in src.glob("*.safetensors*"):
        f.unlink()
    # Not even a valid pickle: proves it is refused by name, never opened.
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    code, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "pytorch_model.bin", "unpickle")
    assert not (tmp_path / "out").exists()


def test_unreadable_image(converted, tmp_path, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_text("this is not a JPEG")
    code, err = run_cli(capsys, "run", converted(version=1), "--image", bad, "--prompt", "caption en")
    assert_one_line_error(code, err, "photo.jpg")
    code, err = run_cli(capsys, "run", converted(version=1), "--image", tmp_path / "nope.png", "--prompt", "x")
    assert_one_line_error(code, err, "nope.png")


def test_existing_output_needs_force(hf_checkpoint, converted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "convert", hf_checkpoint(version=1), "-o", out)
    assert_one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, "convert", hf_checkpoint(version=1), "-o", out, "--force", "--quiet")
    assert_one_line_error(code, err, "not a pg-edge model output")  # --force replaces only pg-edge's own
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, _ = run_cli(capsys, "convert", hf_checkpoint(version=1), "-o", out, "--quiet")
    assert code == 2  # an empty folder exists too
    code, _ = run_cli(capsys, "convert", hf_checkpoint(version=1), "-o", out, "--force", "--quiet")
    assert code == 0 and (out / "config.json").is_file()
    code, _ = run_cli(capsys, "convert", hf_checkpoint(version=1), "-o", out, "--force", "--quiet")
    assert code == 0 and (out / "config.json").is_file()  # its own output is replaced


def test_missing_model_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "convert", tmp_path / "nowhere", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "nowhere")
