"""The built-in `demo` model: its scores on held-out shapes for every prompt form, the path that
rebuilds it from the HF source in the repository, the README's commands on it, loading by name
(also from a non-editable install) and the CLI.

Scores (pg_edge/demo/score.py) on the test split (seeds disjoint from training), 400 images,
every prompt form (caption, count, detect one kind / two kinds / all three in a shuffled order,
segment one kind / all three, a kind that is not in the image), generations batched; the float
model on the first 100 images and the forms with a target (CI time), against the quantized
model's scores on the same 100.
Detection and segmentation match predictions to ground truth per kind, greedily by IoU, each
ground-truth object at most once; an unmatched ground truth scores 0.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import pg_edge
from pg_edge import demo
from pg_edge.tasks import parse, prompts
from pg_edge.demo import score, shapes as S

ROOT = Path(__file__).resolve().parents[2]
HF_SOURCE = ROOT / "apps" / "demo_model" / "hf"
VAE_SOURCE = ROOT / "apps" / "demo_model" / "vae-oid.npz"
RECIPE = json.loads((ROOT / "apps" / "demo_model" / "recipe.json").read_text())
# 400 held-out images (issue 20 asks for >= 100): on the first 100 alone one-kind detection
# read 0.755 for a model that scores 0.733 on all 400 (one object of ~140 moves a 100-image mean
# by 0.006), so the asserted figures come from all 400 (~540 objects a one-kind form).
N_TEST = 400
N_FLOAT = 100
# Issue 20's targets on the held-out split, all met by the shipped model and asserted as they
# are (its scores per form: apps/demo_model/README.md; the closest margins, on the 400 images:
# all-kinds detection 0.753, one-kind detection 0.755, one-kind masks 0.708). A broken loader,
# tokenizer, parser, mask decoder or quantization falls far below them: a random or
# mis-converted model scores ~0.
TARGETS = {"caption": 0.90, "count": 0.95, "absent": 0.95, "detect_all": 0.75, "detect_single": 0.75,
           "segment_single": 0.70}
# The float model is scored on the forms with a target (CI time: pairs and three-kind masks are
# the quantized model's alone). Float vs quantized "within noise": four images in a hundred for
# the rates, 0.02 IoU (one object of the ~140 a one-kind form averages over, flipped from a
# good box to none, moves its mean by 0.006; on 50 images the two models' one-kind mask scores
# differed by 0.04 in both directions as the products' rounding changed).
FLOAT_FORMS = ("caption", "count", "detect_single", "detect_all", "segment_single", "absent")
NOISE = {"caption": 0.04, "count": 0.04, "absent": 0.04, "detect_single": 0.02, "detect_pair": 0.02,
         "detect_all": 0.02, "segment_single": 0.02, "segment_all": 0.02}


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
def quant_parts(demo_pg, test_samples):
    """Scores of the shipped model on the first N_FLOAT test images and on the rest."""
    return (score.evaluate(demo_pg, test_samples[:N_FLOAT]),
            score.evaluate(demo_pg, test_samples[N_FLOAT:], start=N_FLOAT))


@pytest.fixture(scope="session")
def quant_scores(quant_parts):
    """Scores of the shipped model on all N_TEST test images."""
    return quant_parts[0].merge(quant_parts[1])


def test_shipped_quantized_model_scores_every_prompt_form(quant_scores):
    s = quant_scores
    print("quantized:", s.as_dict(), "targets:", TARGETS)
    assert s.n_images == N_TEST and sorted(s.scores) == sorted(score.FORMS)
    # images (caption, count, absent: the images with a kind missing) or objects (IoU forms)
    assert s.counts["absent"] >= 320 and all(n >= 400 for f, n in s.counts.items() if f != "absent")
    for name, target in TARGETS.items():
        assert s[name] >= target, (name, s[name])


def test_float_model_scores_as_well(rebuilt, test_samples, quant_parts):
    float_dir, _ = rebuilt
    pg = pg_edge.load(float_dir)
    s = score.evaluate(pg, test_samples[:N_FLOAT], vae=demo.MODEL_DIR / "vae.safetensors", forms=FLOAT_FORMS)
    print("float:", s.as_dict())
    for name in FLOAT_FORMS:
        assert s[name] >= quant_parts[0][name] - NOISE[name], name


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


def readme_block(section: str) -> list[str]:
    """The lines of the first bash block under the README heading `## {section}`."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def shown_runs(lines: list[str]) -> list[tuple[list[str], list[str]]]:
    """(argv, the output lines shown under it as `# ...` comments) per `pg-edge` line."""
    runs = []
    for line in lines:
        if line.startswith("pg-edge "):
            runs.append((shlex.split(line.split("  #")[0])[1:], []))
        elif line.startswith("# ") and runs:
            runs[-1][1].append(line[2:])
    return runs


def truth() -> dict[tuple[str, str], str]:
    """{(image name, prompt): answer} from pg_edge/demo/samples/labels.jsonl."""
    rows = [json.loads(x) for x in (demo.HERE / "samples" / "labels.jsonl").read_text().splitlines()]
    return {(r["image"], r["prefix"]): r["suffix"] for r in rows}


BOX_LINE = re.compile(r"(\w+)  \[([\d., ]+)\](?:  mask (\d+) px)?")


def test_readme_demo_commands_print_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    """Every `pg-edge` command of the README's demo section, run as written (through the CLI
    entry point, in a folder where pg_edge/ is the package's), prints exactly the lines the
    README shows under it; the captions are the samples' truth and the boxes overlap the
    truth's (labels.jsonl) of the kinds asked for by IoU >= 0.5 (COCO's AP50 match), none
    missing, none extra."""
    from pg_edge.cli import main

    (tmp_path / "pg_edge").symlink_to(ROOT / "pg_edge")
    monkeypatch.chdir(tmp_path)
    runs = shown_runs(readme_block("The built-in demo model"))
    assert [argv[0] for argv, _ in runs].count("detect") >= 3 and len(runs) >= 5
    answers = truth()
    for argv, shown in runs:
        assert main(argv) == 0, argv
        out = capsys.readouterr().out.splitlines()
        assert out == shown, (argv, out)
        image = Path(argv[argv.index("--image") + 1]).name
        if argv[0] == "caption":
            assert out == [answers[image, S.CAPTION_PROMPT]]
            continue
        names = prompts.object_names(argv[argv.index("--image") + 2])
        want = parse.parse_objects(answers[image, S.detect_prompt(S.KINDS)], (S.SIZE, S.SIZE)).objects
        want = [o for o in want if o.label in names]
        got = [BOX_LINE.fullmatch(line) for line in out if line != "(nothing found)"]
        assert all(got), out
        assert sorted(m.group(1) for m in got) == sorted(o.label for o in want), (argv, out)
        for m in got:
            box = [float(v) for v in m.group(2).split(",")]
            best = max(score.box_iou(box, o.box) for o in want if o.label == m.group(1))
            assert best >= 0.5, (argv, m.group(0), best)
        if "-o" in argv:
            assert (tmp_path / argv[argv.index("-o") + 1]).is_file()


def test_readme_offline_lines_run_on_the_demo(tmp_path, monkeypatch, capsys):
    """The README's sections that otherwise need official weights (convert, quantize, verify,
    fine-tune, export, bench) each show a line on the demo model or its float source
    (apps/demo_model/hf); those lines run as written and succeed."""
    from pg_edge.cli import main

    for name in ("pg_edge", "apps"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    sections = ("Use", "Quantize", "Verify", "Fine-tune", "Embed without Python (C++, Swift)", "Speed")
    runs = [argv for section in sections for argv, _ in shown_runs(readme_block(section))
            if "demo" in " ".join(argv)]
    assert [argv[0] for argv in runs] == ["convert", "quantize", "verify", "finetune", "export", "bench"]
    assert runs[0][1] == demo.FLOAT_SOURCE
    for argv in runs:
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        if argv[0] == "verify":
            assert "PASS" in out
    assert (tmp_path / "demo-float" / "config.json").is_file() and (tmp_path / "demo-run" / "adapters").is_dir()


def test_float_source_is_named_where_the_demo_is_refused(tmp_path, capsys):
    """`quantize` / `convert` of the (quantized) demo say where its float source is."""
    from pg_edge.cli import main

    for argv in (["quantize", "demo", "-o", str(tmp_path / "q")], ["convert", "demo", "-o", str(tmp_path / "c")]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "already quantized" in err and f"float source is {demo.FLOAT_SOURCE}" in err
        assert (ROOT / demo.FLOAT_SOURCE / "config.json").is_file()


def test_segment_cut_off_says_so_and_names_the_flag(capsys):
    from pg_edge.cli import main

    sample = str(demo.SAMPLES[-1])
    assert main(["segment", "demo", "--image", sample, "circle ; square ; triangle", "--max-tokens", "30"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1  # one whole object fits in 30 tokens
    assert "cut off at the token limit (30 tokens): objects may be missing; raise it with --max-tokens" in err


def test_desktop_defaults_fit_the_demo(demo_pg):
    """The desktop example opens the demo with its kinds in the object field and a token limit
    that fits the three masks of the three-shape sample."""
    from apps.desktop import DEFAULT_TEXT, MAX_TOKENS, defaults_for

    text = defaults_for("demo")
    assert prompts.object_names(text["segment"]) == list(S.KINDS) == prompts.object_names(text["detect"])
    assert defaults_for("pg2-3b-224") == DEFAULT_TEXT
    r = demo_pg.segment(demo.SAMPLES[-1], text["segment"], max_tokens=MAX_TOKENS)
    assert not r.truncated and len(r.objects) == 3 and r.generation.finish_reason == "stop"


def test_make_demo_writes_annotated_pictures(tmp_path, demo_pg):
    """What `make demo` runs (the Makefile's demo target), offline; then the drawn boxes: the
    outline pixels of each detected box are that object's colour in the detect picture."""
    from PIL import Image

    from apps import demo as demo_app
    from pg_edge.tasks.draw import color_for, line_width

    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\ndemo: ", 1)[1].split("\n\n", 1)[0]  # prerequisites + commands
    assert recipe.startswith("runtime") and "\t$(PY) -m apps.demo" in recipe
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
