"""Draw the README's detection figure from a model output string, with pg_edge's own parser and
drawing code (run: `python docs/figures/make_task_figures.py`).

The output string has the exact form PaliGemma emits for `detect eye ; nose`; it is
written by hand here (with `encode_box`) because official weights cannot be downloaded in
this project's build environment. Parsing and drawing are the code paths `pg-edge detect` runs.
"""
from pathlib import Path

from PIL import Image

from pg_edge import task_text
from pg_edge.draw import draw_objects

HERE = Path(__file__).parent
ASSETS = HERE.parent.parent / "pg_edge" / "assets"


def main() -> None:
    cat = Image.open(ASSETS / "cat.jpg")
    # What a model answers to "detect eye ; nose": y1 x1 y2 x2 over 1024 bins, then the label,
    # objects joined by " ; ".
    boxes = [((92, 58, 152, 112), "eye"), ((200, 72, 252, 122), "eye"), ((160, 148, 212, 196), "nose")]
    text = " ; ".join(tasks.encode_box(box, cat.size) + " " + label for box, label in boxes)
    result = tasks.parse_objects(text, cat.size)
    print(text)
    for obj in result.objects:
        print(f"{obj.label}: box (x1, y1, x2, y2) = {tuple(round(v, 1) for v in obj.box)}")
    draw_objects(cat, result.objects).save(HERE / "detect_cat.png")
    segment_figure()


def segment_figure() -> None:
    """How `pg-edge segment -o` draws a mask. The mask here is HAND-MADE (two ellipses, the
    cup and its saucer, as a decoded mask would look): real masks come from the VQ-VAE decoder
    with big_vision's vae-oid.npz weights, which cannot be downloaded here."""
    from dataclasses import replace

    import numpy as np
    from PIL import ImageDraw

    coffee = Image.open(ASSETS / "coffee.jpg")
    w, h = coffee.size
    box = (38, 8, 292, 212)
    obj = tasks.parse_objects(tasks.encode_box(box, coffee.size) + " cup", coffee.size).objects[0]
    canvas = Image.new("L", coffee.size, 0)
    d = ImageDraw.Draw(canvas)
    d.ellipse((38, 62, 292, 212), fill=255)   # saucer
    d.ellipse((92, 8, 226, 150), fill=255)    # cup
    mask = np.asarray(canvas) > 0
    draw_objects(coffee, [replace(obj, mask=mask)]).save(HERE / "segment_coffee.png")


if __name__ == "__main__":
    main()
