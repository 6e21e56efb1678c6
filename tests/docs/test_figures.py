"""docs/figures/make_figures.py runs (into a temporary folder) and makes what is committed: every
figure file, the same numbers in figures.json; and the parameter counts the docs print are the
code's, which are the published ones."""
import importlib.util
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from pg_edge.model import variants
from pg_edge.tasks.explain_draw import read_mask_picture

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
# Generation is bit-for-bit reproducible on one backend; the committed figures were made on the CPU.
SAME_BACKEND = mx.default_device() == mx.cpu

# keras-hub's presets (pali_gemma_presets.py), re-derived with the 257152 real vocabulary rows and
# tied embeddings: /work/shared/research/anchors.md, "Param counts".
PUBLISHED = {"pg1-3b-224": 2_923_335_408, "pg1-3b-448": 2_924_220_144, "pg1-3b-896": 2_927_759_088,
             "pg2-3b-224": 3_032_094_960, "pg2-3b-448": 3_032_979_696, "pg2-3b-896": 3_036_518_640,
             "pg2-10b-224": 9_662_409_456, "pg2-10b-448": 9_663_294_192, "pg2-10b-896": 9_666_833_136,
             "pg2-28b-224": 27_650_192_112}


def _script():
    spec = importlib.util.spec_from_file_location("make_figures", FIGURES / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameter_counts_are_the_published_ones():
    for name, size in variants.variants():
        counts = variants.parameter_counts(variants.official_config(name, size, vocab=variants.REAL_VOCAB))
        if f"{name}-{size}" in PUBLISHED:
            assert sum(counts.values()) == PUBLISHED[f"{name}-{size}"], (name, size)
    # resolutions differ only in the position table: (S / 14)^2 rows of 1152
    c224 = variants.parameter_counts(variants.official_config("pg2-28b", 224))
    c896 = variants.parameter_counts(variants.official_config("pg2-28b", 896))
    assert c896["vision"] - c224["vision"] == (4096 - 256) * 1152
    assert {k: c896[k] for k in ("connector", "decoder", "embed")} == {k: c224[k] for k in ("connector", "decoder", "embed")}


def test_docs_parameter_table_is_the_codes():
    assert variants.markdown_table() in (ROOT / "docs" / "architecture.md").read_text()


def test_figure_script_makes_the_committed_figures(tmp_path):
    t0 = time.perf_counter()
    data = _script().main(["--out", str(tmp_path)])
    seconds = time.perf_counter() - t0
    print(f"make_figures.py: {seconds:.1f} s")
    assert seconds < 300
    committed = json.loads((FIGURES / "figures.json").read_text())
    assert json.loads((tmp_path / "figures.json").read_text()) == json.loads(json.dumps(data))
    names = {p.name for p in FIGURES.glob("*.png")} - {"desktop_detect.png"}  # that one: tests/apps/test_desktop.py
    assert names == {p.name for p in tmp_path.glob("*.png")}
    for name in names:  # every picture is a readable image; fixed-layout ones have the committed size
        made, kept = Image.open(tmp_path / name), Image.open(FIGURES / name)
        made.load()
        if name in ("explain_mask.png", "explain_input.png", "quantize_recipes.png", "demo_segment.png"):
            assert made.size == kept.size, name

    # the mask picture shows the mask the data records, which is the committed one
    rows = np.array([[c == "1" for c in r] for r in data["explain"]["mask_rows"]])
    assert np.array_equal(read_mask_picture(tmp_path / "explain_mask.png"), rows)
    assert np.array_equal(read_mask_picture(FIGURES / "explain_mask.png"),
                          np.array([[c == "1" for c in r] for r in committed["explain"]["mask_rows"]]))
    assert data["parameters"] == committed["parameters"]
    for name, row in data["quantize_recipes"].items():
        old = committed["quantize_recipes"][name]
        assert row["size_gb"] == old["size_gb"] and row["vs_bf16"] == old["vs_bf16"]
        if "demo_top1" in row:
            assert row["demo_top1"] == pytest.approx(old["demo_top1"], abs=0.05)
            assert row["demo_mean_kl"] == pytest.approx(old["demo_mean_kl"], rel=0.5, abs=2e-3)
    if SAME_BACKEND:  # the demo's greedy outputs, token for token
        assert data["tasks"] == committed["tasks"]
        assert data["explain"] == committed["explain"]
    else:
        assert data["explain"]["siglip"] == committed["explain"]["siglip"]
