"""Draw every figure of the README and docs/ from the code, with the numbers behind them
(run: `python docs/figures/make_figures.py [--out DIR]`; tests/docs/test_figures.py runs it in CI and
compares figures.json with the committed one).

    demo_segment.png      what `make demo` writes for the third sample (apps/demo.py's drawing)
    detect_shapes.png     `pg-edge detect demo --image shapes_2.png "circle ; square ; triangle" -o ...`
    segment_shapes.png    `pg-edge segment demo --image shapes_3.png "circle ; square ; triangle" -o ...`
    explain_mask.png      `pg-edge explain demo --image shapes_3.png --prompt "detect circle ; square ;
    explain_layout.png     triangle" -o ...`: the attention mask and token layout of that real prompt
    explain_input.png     and the pixels the model sees, with its patch grid
    quantize_recipes.png  each quantization recipe: size for PaliGemma 2 3B-224, agreement of the
                          demo model quantized with it against its float32 self
    figures.json          the data: generated texts, token layout, mask rows, recipe numbers,
                          parameter counts of every official variant (pg_edge.model.variants)

Every box, mask and token comes from generating with the shipped `demo` model, parsed and drawn
by the code the commands use.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pg_edge  # noqa: E402
from apps.demo import OBJECTS, annotate  # noqa: E402
from pg_edge import demo  # noqa: E402
from pg_edge.tasks import calls
from pg_edge.model import variants
from pg_edge.tasks.explain import explain  # noqa: E402
from pg_edge.inputs.images import load_image  # noqa: E402

DEMO_FLOAT = ROOT / "apps" / "demo_model" / "hf"  # the demo model before quantization (HF layout)


def task_figures(pg, out: Path) -> dict:
    decoder = calls.find_vae(pg)
    s2, s3 = demo.SAMPLES[1], demo.SAMPLES[2]
    cap, count = pg.caption(s3), pg.ask(s3, "how many shapes?")
    seg3 = pg.segment(s3, OBJECTS, vae=decoder)
    lines = [f"caption: {cap.text}", f"shapes: {count.text}"]
    annotate(load_image(s3), seg3.text, lines, decoder).save(out / "demo_segment.png")
    det = pg.detect(s2, OBJECTS)
    calls.draw(det, s2).save(out / "detect_shapes.png")
    calls.draw(seg3, s3).save(out / "segment_shapes.png")
    return {"caption": cap.text, "count": count.text, "detect": det.text, "segment": seg3.text}


def explain_figures(pg, out: Path) -> dict:
    prompt = f"detect {OBJECTS}"
    ex = explain(pg, demo.SAMPLES[2], prompt, top_k=3)
    with tempfile.TemporaryDirectory() as tmp:
        for path in ex.save(tmp):
            if path.name in ("mask.png", "layout.png", "input.png"):
                path.replace(out / f"explain_{path.name}")
    return {"prompt": prompt, "text": ex.text, "prefix_length": ex.prefix_length,
            "tokens": [[t.position, t.id, t.piece, t.kind, t.block] for t in ex.tokens],
            "mask_rows": ["".join("1" if v else "0" for v in row) for row in ex.masks[None]],
            "siglip": ex.vision["siglip"]["shape"], "connector": ex.vision["connector"]["shape"]}


def recipe_numbers() -> dict:
    """Each recipe: bytes for full PaliGemma 2 3B-224 (bench/quantize_sizes.py's arithmetic,
    QuantPlan's shapes) and the demo model's agreement with its float32 self on its own task."""
    from bench.quantize_sizes import config_raw, predicted_bytes
    from pg_edge.convert.hf import convert_hf
    from pg_edge.eval.probes import Probe
    from pg_edge.quantize import quantize
    from pg_edge.quantize.recipes import RECIPES, resolve_settings

    full = config_raw("pg2-3b-224")
    bf16 = sum(predicted_bytes(full, None).values())
    probes = [Probe(f"{p.stem}:{q}", q, str(p)) for p in demo.SAMPLES for q in ("caption en", f"detect {OBJECTS}")]
    rows = {"bf16": {"size_gb": round(bf16 / 1e9, 3), "vs_bf16": 1.0}}
    with tempfile.TemporaryDirectory() as tmp:
        src = convert_hf(DEMO_FLOAT, Path(tmp) / "float32", dtype="float32", quiet=True)
        for name in RECIPES:
            settings = resolve_settings(recipe=name)
            size = sum(predicted_bytes(full, settings).values())
            q = quantize(src, Path(tmp) / name, settings=settings, probes=probes, max_new_tokens=8).quality
            rows[name] = {"size_gb": round(size / 1e9, 3), "vs_bf16": round(size / bf16, 4),
                          "demo_top1": round(q["top1_agreement"], 4), "demo_mean_kl": round(q["mean_kl"], 5),
                          "demo_max_rel_err": round(q["max_rel_err"], 4)}
    return rows


def recipe_picture(rows: dict):
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    img = Image.new("RGB", (820, 40 + 34 * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), "size of PaliGemma 2 3B-224 (GB)                         "
              "demo model vs its float32 self: top-1 agreement, mean KL", fill=(0, 0, 0), font=font)
    for i, (name, r) in enumerate(rows.items()):
        y = 36 + 34 * i
        draw.text((10, y + 6), name, fill=(0, 0, 0), font=font)
        w = int(300 * r["vs_bf16"])
        draw.rectangle([140, y, 140 + w, y + 24], fill=(0, 130, 200))
        draw.text((146 + w, y + 6), f"{r['size_gb']:.2f} GB ({r['vs_bf16']:.0%})", fill=(0, 0, 0), font=font)
        if "demo_top1" in r:
            draw.text((560, y + 6), f"top-1 {r['demo_top1']:.3f}   KL {r['demo_mean_kl']:.4f}",
                      fill=(0, 0, 0), font=font)
        else:
            draw.text((560, y + 6), "(the float reference)", fill=(120, 120, 120), font=font)
    return img


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE), help="folder for the figures (default: docs/figures)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pg = pg_edge.load(demo.NAME)
    data = {"tasks": task_figures(pg, out), "explain": explain_figures(pg, out)}
    data["quantize_recipes"] = recipes = recipe_numbers()
    recipe_picture(recipes).save(out / "quantize_recipes.png")
    data["parameters"] = {f"{n}-{s}": variants.parameter_counts(variants.official_config(n, s, vocab=variants.REAL_VOCAB))
                          for n, s in variants.variants()}
    (out / "figures.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"figures written to {out} in {time.perf_counter() - t0:.1f} s")
    return data


if __name__ == "__main__":
    main()
