"""Drawing boxes / labels / masks, checked pixel by pixel on the saved PNG; COCO RLE."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pg_edge.tasks.draw import color_for, draw_objects, line_width
from pg_edge.tasks.calls import mask_to_rle, rle_to_mask
from pg_edge.errors import PgEdgeError
from pg_edge.tasks.parse import encode_box, parse_objects

GREY = (128, 128, 128)
W, H = 300, 200  # non-square on purpose


def drawn(tmp_path, text, masks=None):
    """Parse `text` for a grey W x H image, draw, save as PNG, read back: (pixels, objects)."""
    image = Image.new("RGB", (W, H), GREY)
    objects = parse_objects(text, image.size).objects
    if masks:
        objects = [dataclasses.replace(o, mask=m) for o, m in zip(objects, masks)]
    draw_objects(image, objects).save(tmp_path / "out.png")
    assert image.getpixel((0, 0)) == GREY  # the input is not modified
    return np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), objects


def is_color(pixels, color):
    return (pixels == np.array(color, np.uint8)).all(axis=-1)


def test_box_pixels_only_where_the_parser_put_the_box(tmp_path):
    box = (60.0, 50.0, 240.0, 150.0)  # x1, y1, x2, y2 in pixels
    pixels, (obj,) = drawn(tmp_path, encode_box(box, (W, H)))  # no label: outline only
    x1, y1, x2, y2 = (int(v) for v in obj.box)
    lw = line_width((W, H))
    on = is_color(pixels, color_for(0))
    for x, y in [(x1, (y1 + y2) // 2), (x2 - 1, (y1 + y2) // 2), ((x1 + x2) // 2, y1),
                 ((x1 + x2) // 2, y2 - 1), (x1 + lw - 1, y1 + lw - 1)]:
        assert on[y, x], (x, y)
    ring = np.zeros_like(on)
    ring[y1:y2, x1:x2] = True
    ring[y1 + lw:y2 - lw, x1 + lw:x2 - lw] = False
    assert (on == ring).all()  # exactly the outline, lw pixels wide, nothing elsewhere
    assert is_color(pixels, GREY)[~ring].all()


def test_label_on_filled_tag_above_the_box(tmp_path):
    text = (encode_box((60, 80, 240, 150), (W, H)) + " cat ; "
            + encode_box((10, 2, 50, 40), (W, H)) + " dog")
    pixels, (cat, dog) = drawn(tmp_path, text)
    assert color_for(0) != color_for(1)
    cx1, cy1, cx2, cy2 = (int(v) for v in cat.box)
    first = is_color(pixels, color_for(0))
    above = first[:cy1]
    assert above[:, cx1:cx1 + 5].any()  # the tag starts at the box's left edge, above it
    assert not above[:, :cx1].any() and not first[cy2:].any()  # not left of it, not below
    # The text inside the tag is drawn in a contrasting colour, not the tag colour.
    tag_rows = np.nonzero(above.any(axis=1))[0]
    tag = pixels[tag_rows.min():tag_rows.max() + 1, cx1:cx1 + 40]
    assert not is_color(tag, color_for(0)).all()
    # "dog" touches the top edge, so its tag goes inside the box instead of off the image.
    dx1, dy1, dx2, dy2 = (int(v) for v in dog.box)
    second = is_color(pixels, color_for(1))
    assert second[dy1:dy1 + 10, dx1 + 5:dx1 + 15].any() and not second[dy2:].any()


def test_translucent_mask_only_inside_the_mask(tmp_path):
    mask = np.zeros((H, W), bool)
    mask[60:140, 70:150] = True
    pixels, _ = drawn(tmp_path, encode_box((60, 50, 240, 150), (W, H)), masks=[mask])
    lw = line_width((W, H))
    inner = pixels[60:140, 70 + lw:150]  # away from the outline at x1 = 60 .. 60 + lw
    want = np.round(np.array(GREY) * 0.55 + np.array(color_for(0)) * 0.45)
    assert (np.abs(inner.astype(int) - want) <= 1).all()  # blended, not opaque
    untouched = np.ones((H, W), bool)
    untouched[50:150, 60:240] = False  # the box (outline included)
    assert is_color(pixels, GREY)[untouched].all()


def test_wrong_mask_shape_is_refused():
    image = Image.new("RGB", (W, H))
    (obj,) = parse_objects(encode_box((1, 1, 9, 9), (W, H)) + " x", (W, H)).objects
    with pytest.raises(PgEdgeError, match="mask"):
        draw_objects(image, [dataclasses.replace(obj, mask=np.ones((H, H), bool))])


def test_rle_round_trip_and_coco_convention():
    m = np.array([[0, 1, 1],
                  [0, 0, 1]], bool)
    rle = mask_to_rle(m)
    # Column-major: col0 = 0,0; col1 = 1,0; col2 = 1,1 -> 0 0 1 0 1 1
    assert rle == {"size": [2, 3], "counts": [2, 1, 1, 2]}
    assert mask_to_rle(np.ones((2, 2), bool))["counts"] == [0, 4]  # starts with zero 0s
    assert mask_to_rle(np.zeros((2, 2), bool))["counts"] == [4]
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (40, 33)]:
        m = rng.random(shape) > 0.6
        back = rle_to_mask(mask_to_rle(m))
        assert back.dtype == bool and (back == m).all()
    with pytest.raises(PgEdgeError, match="sum"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})
