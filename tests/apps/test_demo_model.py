"""The built-in `demo` model: its scores on held-out shapes, the path that rebuilds it from the
HF source in the repository, loading by name (also from a non-editable install) and the CLI.

Scores (pg_edge/demo/score.py) on the test split (seeds disjoint from training), 100 images x
4 tasks, generations batched; the float model on the first 50 (CI time), against the quantized
model's scores on the same 50. Detection and segmentation match predictions to ground truth per
kind, greedily by IoU, each ground-truth object at most once; an unmatched ground truth scores 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge import demo
from pg_edge.tasks import parse
from pg_edge.demo import score, shapes as S

ROOT = Path(__file__).resolve().parents[2]
HF_SOURCE = ROOT / "apps" / "demo_model" / "hf"
VAE_SOURCE = ROOT / "apps" / "demo_model" / "vae-oid.npz"
RECIPE = json.loads((ROOT / "apps" / "demo_model" / "recipe.json").read_text())
N_TEST = 100
N_FLOAT = 50  # the float model runs on the first half only (CI time); compared on that half
# Issue 10's targets on the held-out split, asserted as they are (the shipped model scores
# caption 0.90, count 1.00, boxes 0.787, masks 0.713: apps/demo_model/README.md). A broken
# loader, tokenizer, parser, mask decoder or quantization falls far below them: a random or
# mis-converted model scores ~0 on all four.
ISSUE_TARGETS = {"caption": 0.90, "count": 0.95, "detect": 0.75, "segment": 0.70}
# Float vs quantized "within noise": two images in fifty for the exact-match rates, 0.02 IoU.
NOISE = {"caption": 0.04, "count": 0.04, "detect": 0.02, "segment": 0.02}


@pytest.fixture(scope="session")
def test_samples():
    return S.split("test", N_TEST)


@pytest.fixture(scope="session")
def demo_pg():
    return pg_edge.load("demo")


@pytest.fixture(scope="session")
def rebuilt(tmp_path_factory):
    """(float folder, quantized folder) made from the repository's HF source with the recorded
    settings: `pg-edge convert` then `pg-edge quantize`, as apps/demo_model/build.py's ship stage."""
    from pg_edge.convert.hf import convert_hf
    from pg_edge.quantize import quantize, resolve_settings

    work = tmp_path_factory.mktemp("demo_rebuild")
    float_dir = convert_hf(HF_SOURCE, work / "float", dtype=RECIPE["convert"]["dtype"], quiet=True)
    q = RECIPE["quantize"]
    settings = resolve_settings(recipe=q["recipe"], group_size=q["group_size"])
    quantize(float_dir, work / "quant", settings, probes=0, quiet=True)
    return float_dir, work / "quant"


@pytest.fixture(scope="session")
def quant_halves(demo_pg, test_samples):
    """Scores of the shipped model on the first N_FLOAT test images and on the rest."""
    return (score.evaluate(demo_pg, test_samples[:N_FLOAT]), score.evaluate(demo_pg, test_samples[N_FLOAT:]))


def test_shipped_quantized_model_scores(quant_halves):
    s = quant_halves[0].merge(quant_halves[1])
    print("quantized:", s.as_dict(), "issue targets:", ISSUE_TARGETS)
    assert s.n_images >= 100
    for name, target in ISSUE_TARGETS.items():
        assert getattr(s, name) >= target, (name, getattr(s, name))


def test_float_model_scores_at_least_as_well(rebuilt, test_samples, quant_halves):
    float_dir, _ = rebuilt
    pg = pg_edge.load(float_dir)
    s = score.evaluate(pg, test_samples[:N_FLOAT], vae=demo.MODEL_DIR / "vae.safetensors")
    print("float:", s.as_dict())
    for name, noise in NOISE.items():
        assert getattr(s, name) >= getattr(quant_halves[0], name) - noise, name


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_rebuilding_from_the_hf_source_gives_the_shipped_tensors(rebuilt):
    _, quant = rebuilt
    got, want = _tensors(quant), _tensors(demo.MODEL_DIR)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert np.array_equal(np.array(got[k]), np.array(want[k])), k
    shipped_cfg = json.loads((demo.MODEL_DIR / "config.json").read_text())
    assert json.loads((quant / "config.json").read_text())["quantization"] == shipped_cfg["quantization"]


def test_shipped_mask_decoder_is_the_converted_vae(tmp_path):
    from pg_edge.convert.vae import convert_vae

    out = convert_vae(VAE_SOURCE, tmp_path / "vae.safetensors")
    got, want = mx.load(str(out)), mx.load(str(demo.MODEL_DIR / "vae.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(np.array(got[k]), np.array(want[k])), k


def test_special_ids_come_from_the_tokenizer_files(demo_pg):
    """The demo tokenizer puts every special token away from Gemma's ids; the runtime finds
    them in the files (and the model, which emits loc/seg tokens at those ids, scores above)."""
    tok = demo_pg.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.loc0 == 133 and tok.seg0 == 5
    assert tok.image_id == tok.vocab_size == demo_pg.config.image_token_index
    assert tok.encode("<loc0042>") == [tok.loc0 + 42]
    assert tok.encode("<seg007>") == [tok.seg0 + 7]
    assert demo_pg.config.real_vocab_size == tok.vocab_size


def test_cli_caption_and_detect_by_name(capsys, demo_pg):
    """`pg-edge caption demo --image X` and `pg-edge detect demo --image X circle` print what
    the Python API gives for the same image."""
    from pg_edge.cli import main

    sample = demo.SAMPLES[-1]
    assert main(["caption", "demo", "--image", str(sample)]) == 0
    assert capsys.readouterr().out.strip() == demo_pg.caption(sample).text
    assert main(["detect", "demo", "--image", str(sample), "circle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = demo_pg.detect(sample, "circle").objects
    assert [o["label"] for o in out["objects"]] == [o.label for o in want]
    assert [o["box"] for o in out["objects"]] == [[round(v, 2) for v in o.box] for o in want]


def test_make_demo_writes_annotated_pictures(tmp_path, demo_pg):
    """What `make demo` runs (the Makefile's demo target), offline; then the drawn boxes: the
    outline pixels of each detected box are that object's colour in the detect picture."""
    from PIL import Image

    from apps import demo as demo_app
    from pg_edge.tasks.draw import color_for, line_width

    make = (ROOT / "Makefile").read_text()
    assert "demo: runtime\n\t$(PY) -m apps.demo\n" in make
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "apps.demo", "--out", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote 6 annotated pictures to {out.resolve()}" in run.stdout
    for sample in demo.SAMPLES:
        image = Image.open(sample)
        assert demo_pg.caption(image).text in run.stdout
        det = demo_pg.detect(image, demo_app.OBJECTS)
        assert det.objects
        for kind in ("detect", "segment"):
            assert (out / f"{sample.stem}_{kind}.png").is_file()
        pic = np.asarray(Image.open(out / f"{sample.stem}_detect.png").convert("RGB"))
        big = (image.width * demo_app.SCALE, image.height * demo_app.SCALE)
        assert pic.shape == (big[1] + demo_app.FOOTER, big[0], 3)
        objects = parse.parse_objects(det.text, big).objects  # as the demo draws them
        lw = line_width(big)
        checked = 0
        for i, obj in enumerate(objects):
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
            for y, x in ((ym, x1), (ym, x2 - 1), (y2 - 1, xm), (ym, x1 + lw - 1)):
                later = [o for o in objects[i + 1:] if o.box[0] <= x < o.box[2] and o.box[1] <= y < o.box[3]]
                if not later:  # drawn last here: the outline pixel is this object's colour
                    assert tuple(pic[y, x]) == color_for(i), (sample.name, obj.label, y, x)
                    checked += 1
            assert tuple(pic[ym, xm]) != color_for(i)  # the inside is not filled
        assert checked >= 2 * len(objects)


def test_load_demo_from_a_non_editable_install(tmp_path, demo_pg):
    """pip install (no -e) into a folder, then load `demo` from there with the repository out
    of sight: the model and samples are package data, nothing imports tests/."""
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    code = (
        "import pg_edge, pg_edge.demo as d; pg = pg_edge.load('demo');"
        "print(pg_edge.__file__); print(len(d.SAMPLES)); print(pg.caption(d.SAMPLES[0]).text)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    file, n, caption = run.stdout.strip().splitlines()
    assert file.startswith(str(target))
    assert n == "3"
    assert caption == demo_pg.caption(demo.SAMPLES[0]).text
