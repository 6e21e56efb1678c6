"""The synthetic shapes task the built-in `demo` model was trained on (issue 10's fixed spec).

An image is 224x224 RGB: a uniform background (each channel 190..250) plus independent
per-pixel, per-channel noise in -10..10 (clipped), then 1 to 3 solid shapes drawn with Pillow's
ImageDraw (no outline, no anti-aliasing). Each shape fills a square box of side 40..100 px, at
least 4 px inside the image, boxes at least 4 px apart. Kinds: circle, square, triangle (apex up
at the top centre of its box, horizontal base); colours: COLOURS. Kinds and colours may repeat.

Boxes are edge coordinates `(x1, y1, x2, y2)` (as pg_edge.tasks.parse returns them): a box of side s
at (x, y) covers pixels x..x+s-1, so x2 = x + s. Objects are always listed left to right by box
centre x (ties: top to bottom). Targets, with `pg_edge.tasks.parse.encode_box`'s bins:

    caption en                -> "a red circle, a blue square and a green triangle"
    answer en how many shapes? -> "3"
    detect circle ; square    -> "<locY1><locX1><locY2><locX2> circle ; ..." (matching objects)
    segment circle            -> the same with 16 <segNNN> codes after each box (codes from a
                                 VQ-VAE encoder, so the segment target needs `seg_codes`)

Only numpy and Pillow: the tests, the demo and the training tools share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pg_edge.tasks.parse import encode_box

SIZE = 224
KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (220, 190, 30)}
SIDE = (40, 100)  # inclusive
MARGIN = 4  # to the image border and between boxes
CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many shapes?"
SPLIT_SEEDS = {"train": 1000, "valid": 2000, "test": 3000}  # base seed per split; + index


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) edge coordinates, x2 - x1 = side

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass
class Sample:
    image: Image.Image
    shapes: list[Shape]  # left to right


def _fits(box, boxes) -> bool:
    x1, y1, x2, y2 = box
    return all(x1 >= b[2] + MARGIN or b[0] >= x2 + MARGIN or y1 >= b[3] + MARGIN or b[1] >= y2 + MARGIN
               for b in boxes)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Sequence[int], fill) -> None:
    """A solid shape filling the square edge-coordinate box (pixels x1..x2-1, y1..y2-1)."""
    x1, y1, x2, y2 = box
    xy = (x1, y1, x2 - 1, y2 - 1)  # ImageDraw's boxes include their last pixel
    if kind == "circle":
        draw.ellipse(xy, fill=fill)
    elif kind == "square":
        draw.rectangle(xy, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def make_sample(seed: int, n: int | None = None) -> Sample:
    """One image and its shapes, a pure function of `seed` (and of `n`, the number of shapes,
    1 to 3 at random unless given: training may ask for easy one-shape images)."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(190, 251, size=3)
    noise = rng.integers(-10, 11, size=(SIZE, SIZE, 3))
    pixels = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    drawn = int(rng.integers(1, 4))
    n = drawn if n is None else int(n)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:  # rejection sampling; restart when the image is too crowded
        for _ in range(200):
            s = int(rng.integers(SIDE[0], SIDE[1] + 1))
            x, y = (int(v) for v in rng.integers(MARGIN, SIZE - MARGIN - s + 1, size=2))
            if _fits((x, y, x + s, y + s), boxes):
                boxes.append((x, y, x + s, y + s))
                break
        else:
            boxes = []
    draw = ImageDraw.Draw(image)
    shapes = []
    for box in boxes:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        draw_shape(draw, kind, box, COLOURS[colour])
        shapes.append(Shape(kind, colour, box))
    shapes.sort(key=lambda s: (s.centre[0], s.centre[1]))
    return Sample(image, shapes)


def split(name: str, n: int, start: int = 0) -> list[Sample]:
    """Samples start..start+n-1 of split `name` (train / valid / test: disjoint seeds)."""
    base = SPLIT_SEEDS[name] * 1_000_000
    return [make_sample(base + i) for i in range(start, start + n)]


def shape_mask(shape: Shape, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """bool[H, W]: the pixels the shape covers in an image of (width, height)."""
    m = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(m), shape.kind, shape.box, 255)
    return np.asarray(m) > 0


def caption(shapes: Sequence[Shape]) -> str:
    names = [f"a {s.colour} {s.kind}" for s in shapes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def count(shapes: Sequence[Shape]) -> str:
    return str(len(shapes))


def _objects(shapes, kinds, seg_codes=None) -> str:
    out = []
    for s in shapes:
        if s.kind in kinds:
            seg = "".join(f"<seg{c:03d}>" for c in seg_codes(s)) if seg_codes else ""
            out.append(f"{encode_box(s.box, (SIZE, SIZE))}{seg} {s.kind}")
    return " ; ".join(out)


def detect_prompt(kinds: Sequence[str]) -> str:
    return "detect " + " ; ".join(kinds)


def segment_prompt(kinds: Sequence[str]) -> str:
    return "segment " + " ; ".join(kinds)


def detect_target(shapes: Sequence[Shape], kinds: Sequence[str]) -> str:
    """Boxes of the objects whose kind is in `kinds`, left to right ("" when none)."""
    return _objects(shapes, set(kinds))


def segment_target(shapes: Sequence[Shape], kinds: Sequence[str],
                   seg_codes: Callable[[Shape], Sequence[int]]) -> str:
    """Boxes plus `seg_codes(shape)` (16 ints) per matching object, left to right."""
    return _objects(shapes, set(kinds), seg_codes)
