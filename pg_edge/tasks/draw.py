"""Draw parsed objects (boxes, labels, translucent masks) on an image.

`draw_objects` returns a new RGB PIL image; the caller saves it (PNG keeps the exact colours
that tests/tasks/test_draw.py checks, JPEG would smear them). Boxes are the parser's float pixel
edges truncated with int(), as the mask step does, so a box outline covers the pixels
x1..x2-1, y1..y2-1: the same pixels as the object's mask can occupy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pg_edge.errors import PgEdgeError
from pg_edge.tasks.parse import DetectedObject

# Twelve colours far apart from each other and from typical photo content (saturated hues,
# no greys), cycled when there are more objects.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (255, 225, 25),
    (170, 110, 40), (128, 0, 0),
)


def color_for(index: int) -> tuple[int, int, int]:
    """The colour of the index-th object."""
    return PALETTE[index % len(PALETTE)]


def line_width(image_size: tuple[int, int]) -> int:
    """Box outline width in pixels: about 0.4% of the longer side, at least 2."""
    return max(2, round(max(image_size) / 250))


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont:
    size = max(10, round(max(image_size) / 40))
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # bitmap fallback: small, but readable


def _text_color(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    # Rec. 601 luma: dark text on light label backgrounds, white on dark ones.
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _int_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in box)
    return max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)


def draw_objects(image: Image.Image, objects: Sequence[DetectedObject], *,
                 mask_alpha: float = 0.45) -> Image.Image:
    """A copy of `image` (RGB) with each object's mask, box and label drawn in its colour.

    objects: boxes in pixels of this image (parse with its `image.size`); masks bool[H, W].
    mask_alpha: opacity of the mask tint, 0..1.
    """
    if not 0.0 <= mask_alpha <= 1.0:
        raise PgEdgeError(f"mask_alpha must be in 0..1, got {mask_alpha}")
    out = image.convert("RGB")  # always a copy, even for RGB input
    width, height = out.size

    # Masks first so that outlines and labels stay crisp on top of the tint.
    pixels = np.asarray(out, dtype=np.float32).copy()
    for i, obj in enumerate(objects):
        if obj.mask is None:
            continue
        mask = np.asarray(obj.mask, dtype=bool)
        if mask.shape != (height, width):
            raise PgEdgeError(f"mask of {obj.label!r} is {mask.shape}, image is {(height, width)}")
        pixels[mask] = pixels[mask] * (1.0 - mask_alpha) + np.float32(color_for(i)) * mask_alpha
    out = Image.fromarray(np.round(pixels).astype(np.uint8))

    draw = ImageDraw.Draw(out)
    lw = line_width(out.size)
    font = _font(out.size)
    for i, obj in enumerate(objects):
        color = color_for(i)
        x1, y1, x2, y2 = _int_box(obj.box, width, height)
        if x2 <= x1 or y2 <= y1:
            continue
        # PIL includes both corners and grows the outline inwards: the last pixel is x2 - 1.
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=color, width=lw)
        if obj.label:
            _draw_label(draw, obj.label, (x1, y1, x2, y2), color, font, lw, out.size)
    return out


def _draw_label(draw, text, box, color, font, pad, image_size) -> None:
    """Text on a filled box-coloured tag above the box, or just inside it at the top edge."""
    width, height = image_size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x1, y1 = box[0], box[1]
    ty = y1 - tag_h if y1 - tag_h >= 0 else y1  # no room above: overlap the box's top
    tx = min(x1, max(width - tag_w, 0))  # keep the tag inside the image on the right
    draw.rectangle([tx, ty, tx + tag_w - 1, ty + tag_h - 1], fill=color)
    draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(color), font=font)
