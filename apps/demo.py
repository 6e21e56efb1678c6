"""`make demo`: the built-in `demo` model doing the real job on its three sample images, offline.

The model is a tiny PaliGemma 2 that this project trained on synthetic shapes (pg_edge/demo;
how: apps/demo_model/README.md), shipped 8-bit quantized inside the package and loaded by name with
`pg_edge.load("demo")`, through the same loader, generation, parsers and mask decoder a real
checkpoint uses. For each sample image it runs the four tasks, prints text and boxes, and
writes two annotated pictures to demo_out/: NAME_detect.png (boxes, labelled) and
NAME_segment.png (boxes and translucent masks, labelled), with the caption and count below.

    python -m apps.demo [--out DIR] [IMAGE ...]      (default: the three bundled samples)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

OUT = Path("demo_out")
OBJECTS = "circle ; square ; triangle"
SCALE = 2  # pictures drawn at twice the 224 px input so that labels stay readable
FOOTER = 44  # pixels below the picture for the caption and the count


def fmt_box(box) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


def annotate(image, text: str, lines: list[str], decoder=None):
    """The image at SCALE with the objects of a detect/segment output drawn (masks decoded
    with `decoder` when given), and `lines` written in a strip below it."""
    from PIL import Image, ImageDraw

    from pg_edge.tasks import parse
    from pg_edge.tasks.draw import draw_objects
    from pg_edge.model.vae import add_masks

    big = image.convert("RGB").resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    objects = parse.parse_objects(text, big.size).objects  # boxes in the big picture's pixels
    if decoder is not None:
        objects = add_masks(objects, decoder, big.size)
    drawn = draw_objects(big, objects)
    canvas = Image.new("RGB", (big.width, big.height + FOOTER), (255, 255, 255))
    canvas.paste(drawn, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, big.height + 6 + 18 * i), line, fill=(0, 0, 0))
    return canvas


def run(images: list[Path], out: Path) -> int:
    import pg_edge
    from pg_edge import demo
    from pg_edge.inputs.images import load_image
    from pg_edge.tasks.calls import find_vae
    from pg_edge.checkpoint.output_check import inputs_overlap

    for path in images:  # the pictures written are never one of those given
        for kind in ("detect", "segment"):
            inputs_overlap(out / f"{Path(path).stem}_{kind}.png", images)
    t0 = time.perf_counter()
    pg = pg_edge.load(demo.NAME)
    decoder = find_vae(pg)
    params = _parameters(pg)
    print(f"pg_edge demo: the built-in `demo` model, a {params / 1e6:.1f}M-parameter PaliGemma 2 "
          f"trained by this project on synthetic shapes,\n8-bit quantized, loaded from "
          f"{pg.folder} in {time.perf_counter() - t0:.1f} s. Offline: nothing is downloaded.\n")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = load_image(path).convert("RGB")
        t = time.perf_counter()
        cap = pg.caption(image)
        count = pg.ask(image, "how many shapes?")
        det = pg.detect(image, OBJECTS)
        seg = pg.segment(image, OBJECTS, vae=decoder)
        print(f"{path}  ({time.perf_counter() - t:.2f} s for the four tasks)")
        print(f"  {cap.prompt:<36} {cap.text}")
        print(f"  {count.prompt:<36} {count.text}")
        print(f"  {det.prompt:<36} " + (" ; ".join(f"{o.label} {fmt_box(o.box)}" for o in det.objects) or "(none)"))
        print(f"  {seg.prompt:<36} " + (" ; ".join(
            f"{o.label} {fmt_box(o.box)} mask {int(o.mask.sum())} px" for o in seg.objects if o.mask is not None)
            or "(none)"))
        print(f"  {'':<36} boxes: (x1, y1, x2, y2) pixels of the {image.width}x{image.height} image")
        lines = [f"caption: {cap.text}", f"shapes: {count.text}"]
        for kind, result, dec in (("detect", det, None), ("segment", seg, decoder)):
            target = out / f"{Path(path).stem}_{kind}.png"
            annotate(image, result.text, lines, dec).save(target)
            written.append(target)
        print()
    print(f"wrote {len(written)} annotated pictures to {out.resolve()}/:")
    for p in written:
        print(f"  {p}")
    return 0


def _parameters(pg) -> int:
    """Parameters of the model before quantization: a quantized matrix counts group_size per
    scale (its packed uint32 words hold several weights each)."""
    from mlx.utils import tree_flatten

    from pg_edge.checkpoint.folder import quantization_section

    tensors = dict(tree_flatten(pg.model.parameters()))
    group = (quantization_section(pg.config.raw) or {}).get("group_size", 64)
    n = 0
    for k, v in tensors.items():
        if k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] + ".scales" in tensors:
            n += v.size * group if k.endswith(".scales") else 0
        elif not (k.endswith(".weight") and k[:-len("weight")] + "scales" in tensors):
            n += v.size
    return n


def main(argv=None) -> int:
    from pg_edge import demo
    from pg_edge.errors import PgEdgeError

    p = argparse.ArgumentParser(prog="python -m apps.demo", description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="*", type=Path, help="images (default: the three bundled samples)")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the annotated pictures (default demo_out)")
    a = p.parse_args(argv)
    try:
        return run(a.images or list(demo.SAMPLES), a.out)
    except PgEdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
