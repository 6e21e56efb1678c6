"""The desktop example (apps/desktop) in a real X window under Xvfb, driven with real pointer
clicks (xdotool): a caption from the tiny model, a detection whose box is checked on a
screenshot, and Stop ending a long generation.

The tiny random model never emits a well-formed box, so the detection run replaces only the
token generator (`generate_step`) with a fixed token sequence; the worker, streaming decoder,
parser, drawing and window are the real ones. With PG_EDGE_WRITE_FIGURES=1 the test also writes
the screenshot shown in the README (docs/figures/desktop_detect.png).
"""
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import pg_edge
from pg_edge import model_tasks
from pg_edge.draw import color_for, line_width

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Xvfb is the Linux way to get a screen")

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "desktop_detect.png"


def scripted(token_ids, delay=0.0):
    """A stand-in for pg_edge.generate.generate_step yielding fixed tokens (then nothing)."""

    def generate_step(model, input_ids, image_features, *, max_tokens=256, **_):
        for t in token_ids[:max_tokens]:
            if delay:
                time.sleep(delay)
            yield mx.array([t] * input_ids.shape[0]), None

    return generate_step


def pump(root, until, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the window did not get there in time"
        root.update()
        time.sleep(0.01)


def edge_share(shot, origin, x, y1, y2, color):
    """Share of the pixels in screen column origin+x, rows y1..y2 that have exactly `color`."""
    px = [shot.getpixel((origin[0] + x, origin[1] + y)) for y in range(y1, y2)]
    return sum(p == color for p in px) / len(px)


def test_desktop_window(converted, _sample_images_cache, monkeypatch):
    from apps.desktop.xvfb import Xvfb, click_widget, missing_tools, screenshot

    assert not missing_tools(), f"install {missing_tools()} (listed in .ci/apt-packages.txt)"
    import tkinter as tk

    from apps.desktop.app import App

    pg = pg_edge.load(converted(version=1))
    cat = _sample_images_cache["chelsea"].copy()  # 451 x 300: shown at its own size
    with Xvfb() as display:
        root = tk.Tk(screenName=display)
        try:
            app = App(root, pg=pg, image=cat, gen={"max_tokens": 6})
            pump(root, lambda: root.winfo_viewable() and app.canvas.winfo_width() > 1)

            # 1. caption, clicked in the window: the tiny model's text, as the API gives it.
            click_widget(display, app.run_button)
            pump(root, lambda: app.result is not None and not app.busy)
            assert app.result == model_tasks.caption(pg, cat, max_tokens=6).text
            assert app.status.cget("text").startswith("done")

            # 2. detect: pick the task and run it with clicks; the box is drawn on the screen.
            prompt_ids = pg.tokenizer.encode("<loc0100><loc0200><loc0700><loc0800> cat")
            monkeypatch.setattr("pg_edge.generate.generate_step",
                                scripted(prompt_ids + [pg.tokenizer.eos_id]))
            click_widget(display, app.task_buttons["detect"])
            pump(root, lambda: app.text_var.get() == "cat")
            origin = app.image_origin()
            before = screenshot(display)
            click_widget(display, app.run_button)
            pump(root, lambda: not app.busy and not isinstance(app.result, str))
            root.update()
            (obj,) = app.result.objects
            assert obj.label == "cat"
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            assert (x1, y1) == (88, 29)  # loc 200/1023 of 451 px, loc 100/1023 of 300 px
            shot = screenshot(display)
            color, lw = color_for(0), line_width(cat.size)
            rows = (y1 + lw, y2 - lw)
            assert edge_share(shot, origin, x1, *rows, color) > 0.95  # left edge, outer pixel
            assert edge_share(shot, origin, x2 - 1, *rows, color) > 0.95  # right edge
            assert edge_share(before, origin, x1, *rows, color) < 0.05  # not there before
            assert edge_share(shot, origin, x1 + lw + 2, *rows, color) < 0.05  # inside: the photo
            window = (root.winfo_rootx(), root.winfo_rooty(),
                      root.winfo_rootx() + root.winfo_width(), root.winfo_rooty() + root.winfo_height())
            if os.environ.get("PG_EDGE_WRITE_FIGURES"):
                screenshot(display, window).save(FIGURE)

            # 3. Stop: a generation of 3000 slow tokens (15 s) ends when Stop is clicked.
            endless = pg.tokenizer.encode(" cat") * 3000
            monkeypatch.setattr("pg_edge.generate.generate_step", scripted(endless, delay=0.005))
            app.gen = {"max_tokens": len(endless)}
            click_widget(display, app.task_buttons["caption"])
            pump(root, lambda: app.task.get() == "caption")
            click_widget(display, app.run_button)
            pump(root, lambda: app.busy and app.answer.get("1.0", "end").count("cat") > 5)
            t0 = time.monotonic()
            click_widget(display, app.stop_button)
            pump(root, lambda: not app.busy, timeout=10)
            assert time.monotonic() - t0 < 5
            assert app.status.cget("text").startswith("stopped")
            assert 5 < len(app.result) < len(" cat") * len(endless) // 2
            assert app.run_button.cget("state") == "normal"
        finally:
            root.destroy()


def test_rendered_scales_boxes_and_masks_to_the_canvas():
    """Boxes and masks are drawn after scaling the image to the canvas (crisp outlines)."""
    import numpy as np
    from PIL import Image

    from apps.desktop.app import CANVAS, rendered
    from pg_edge.task_text import DetectedObject
    from pg_edge.model_tasks import TaskResult

    image = Image.new("RGB", (1024, 768), (255, 255, 255))  # twice the canvas: shown at 0.5
    mask = np.zeros((768, 1024), bool)
    mask[200:400, 300:700] = True
    obj = DetectedObject("cat", (300.0, 200.0, 700.0, 400.0), (0, 0, 0, 0), None, mask)
    result = TaskResult("segment", "segment cat", "", (1024, 768), None, [obj])
    out = np.asarray(rendered(image, result))
    assert out.shape == (CANVAS[1], CANVAS[0], 3)
    assert tuple(out[150, 150]) == color_for(0)  # left edge of the box at x = 300 * 0.5
    tint = out[150, 250].astype(int)  # inside the mask: white tinted towards the colour
    assert (tint < 255).any() and tuple(tint) != color_for(0)
    assert tuple(out[50, 50]) == (255, 255, 255)  # outside: untouched
