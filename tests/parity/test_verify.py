"""`pg-edge verify`: passes on correct conversions, fails (naming the figure) on a corrupted one,
and compares a quantized folder with its float source through MLX and the NumPy reference."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cli import main
from pg_edge.eval.verify import verify


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("image_size", [28, 56])
def test_correct_conversion_passes(version, image_size, converted, capsys):
    """MLX vs the NumPy reference, float32: logits, top-1 and free greedy decoding agree."""
    code, out, _ = run_cli(capsys, "verify", converted(version=version, image_size=image_size), "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"]
    assert report["mlx"]["top1_agreement"] == 1.0
    assert report["mlx"]["max_rel_err"] < 1e-5 and report["mlx"]["mean_kl"] < 1e-8
    assert report["greedy_agreement"] == 1.0
    assert report["mlx"]["positions"] == 4 * 9  # 4 probes x (last prompt position + 8 tokens)


def corrupt(folder, dst, key="language_model.model.layers.0.self_attn.o_proj.weight"):
    """A copy of `folder` with one weight's rows permuted (as a bad converter would)."""
    shutil.copytree(folder, dst)
    for f in dst.glob("*.safetensors"):
        tensors, meta = mx.load(str(f), return_metadata=True)
        if key in tensors:
            w = np.array(tensors[key])
            tensors[key] = mx.array(w[np.random.default_rng(0).permutation(w.shape[0])])
            mx.save_safetensors(str(f), tensors, metadata=meta)
            return dst
    raise AssertionError(f"{key} not found")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conversion_against_its_hf_source_passes(dtype, hf_checkpoint, converted, capsys):
    code, out, _ = run_cli(capsys, "verify", converted(version=2, dtype=dtype), "--against",
                           hf_checkpoint(version=2), "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"], report["failures"]
    if dtype == "float32":
        assert report["mlx"]["max_rel_err"] < 1e-5 and report["reference"]["max_rel_err"] < 1e-5


def test_corrupted_conversion_fails_naming_the_figure(hf_checkpoint, converted, tmp_path, capsys):
    bad = corrupt(converted(version=2), tmp_path / "bad")
    code, out, err = run_cli(capsys, "verify", bad, "--against", hf_checkpoint(version=2))
    assert code == 1
    assert "FAIL" in out and "max relative logit error" in err
    report = verify(str(bad), str(hf_checkpoint(version=2)))
    assert not report.passed and report.mlx["max_rel_err"] > 5e-2
    assert report.reference["max_rel_err"] > 5e-2  # the reference sees the corruption too


def test_against_float_source_through_mlx_and_reference(qsrc, tmp_path, capsys):
    from pg_edge.quantize import quantize

    _, src = qsrc(1)
    q8 = tmp_path / "q8"
    quantize(src, q8, "all8", probes=0)
    code, out, _ = run_cli(capsys, "verify", q8, "--against", src, "--json", "--probes", "3")
    r8 = json.loads(out)
    assert code == 0 and r8["passed"] and r8["reference"] is not None
    # MLX and the reference see the same quantized weights: they measure the same loss
    assert abs(r8["mlx"]["mean_kl"] - r8["reference"]["mean_kl"]) <= 1e-3 + 0.05 * r8["mlx"]["mean_kl"]
    q4 = tmp_path / "q4"
    quantize(src, q4, "all4", probes=0)
    r4 = verify(str(q4), str(src), probes=3)
    assert r4.mlx["mean_kl"] > r8["mlx"]["mean_kl"]
    # a strict limit makes the 4-bit model fail, naming the figure
    code, _, err = run_cli(capsys, "verify", q4, "--against", src, "--probes", "3", "--min-top1", "0.999")
    assert code == 1 and "top-1 agreement" in err


def test_user_images_and_prompts(converted, sample_images, tmp_path, capsys):
    img = tmp_path / "photo.png"
    sample_images[2].save(img)
    code, out, _ = run_cli(capsys, "verify", converted(version=1), "--images", img, "--prompts", "ocr",
                           "caption es", "--max-tokens", "3", "--json")
    report = json.loads(out)
    assert code == 0 and [p["prompt"] for p in report["probes"]] == ["ocr", "caption es"]
    assert report["mlx"]["positions"] == 2 * 4


def test_bad_inputs(converted, tmp_path, capsys):
    bad = tmp_path / "x.jpg"
    bad.write_text("no")
    code, _, err = run_cli(capsys, "verify", converted(version=1), "--images", bad)
    assert code == 2 and "x.jpg" in err
    code, _, err = run_cli(capsys, "verify", tmp_path / "missing")
    assert code == 2 and "missing" in err
