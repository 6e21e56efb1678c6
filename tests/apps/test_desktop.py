"""The desktop example (apps/desktop) in a real X window under Xvfb, driven with real pointer
clicks (xdotool), on the built-in demo model: a caption, a detection whose boxes are checked on
a screenshot, and Stop ending a long generation.

For Stop, the token generator (`generate_step`) is replaced by a slow endless fixed sequence
(the demo model ends its answers within a few tokens); the worker, streaming decoder, parser,
drawing and window are the real ones. With PG_EDGE_WRITE_FIGURES=1 the test also writes the
screenshot shown in the README (docs/figures/desktop_detect.png).
"""
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import pg_edge
from pg_edge.tasks import calls
from pg_edge.tasks.draw import color_for, line_width

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Xvfb is the Linux way to get a screen")

FIGURE = Path(__file__).resolve().parents[2] / "docs" / "figures" / "desktop_detect.png"


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


def test_desktop_window(monkeypatch):
    from apps.desktop.xvfb import Xvfb, click_widget, missing_tools, screenshot

    assert not missing_tools(), f"install {missing_tools()} (listed in .ci/apt-packages.txt)"
    import tkinter as tk

    from apps.desktop.app import App

    from PIL import Image

    from pg_edge.demo import SAMPLES

    pg = pg_edge.load("demo")
    shapes = Image.open(SAMPLES[-1]).convert("RGB")  # 224 x 224: shown at its own size
    objects = "circle ; square ; triangle"
    with Xvfb() as display:
        root = tk.Tk(screenName=display)
        try:
            app = App(root, pg=pg, image=shapes, gen={"max_tokens": 96})
            pump(root, lambda: root.winfo_viewable() and app.canvas.winfo_width() > 1)

            # 1. caption, clicked in the window: the model's text, as the API gives it.
            click_widget(display, app.run_button)
            pump(root, lambda: app.result is not None and not app.busy)
            assert app.result == calls.caption(pg, shapes, max_tokens=96).text
            assert app.result.startswith("a ")
            assert app.status.cget("text").startswith("done")

            # 2. detect: pick the task, type the objects, run it with clicks; the boxes the
            # model gives (the same as the API's) are drawn on the screen.
            click_widget(display, app.task_buttons["detect"])
            pump(root, lambda: app.text_var.get() == "cat")
            app.text_var.set(objects)
            origin = app.canvas.winfo_rootx(), app.canvas.winfo_rooty()  # the image's top-left pixel
            before = screenshot(display)
            click_widget(display, app.run_button)
            pump(root, lambda: not app.busy and not isinstance(app.result, str))
            root.update()
            want = calls.detect(pg, shapes, objects, max_tokens=96)
            assert [(o.label, o.box) for o in app.result.objects] == [(o.label, o.box) for o in want.objects]
            assert app.result.objects, f"the demo model found nothing: {app.result.text!r}"
            obj = app.result.objects[0]
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            shot = screenshot(display)
            color, lw = color_for(0), line_width(shapes.size)
            rows = (y1 + lw, y2 - lw)
            assert edge_share(shot, origin, x1, *rows, color) > 0.9  # left edge, outer pixel
            assert edge_share(before, origin, x1, *rows, color) < 0.05  # not there before
            window = (root.winfo_rootx(), root.winfo_rooty(),
                      root.winfo_rootx() + root.winfo_width(), root.winfo_rooty() + root.winfo_height())
            if os.environ.get("PG_EDGE_WRITE_FIGURES"):
                screenshot(display, window).save(FIGURE)

            # 3. Stop: a generation of 400 slow tokens (8 s; the demo model's context is 512)
            # ends when Stop is clicked.
            endless = (pg.tokenizer.encode(" circle") * 400)[:400]
            monkeypatch.setattr("pg_edge.generate.generate_step", scripted(endless, delay=0.02))
            app.gen = {"max_tokens": len(endless)}
            click_widget(display, app.task_buttons["caption"])
            pump(root, lambda: app.task.get() == "caption")
            click_widget(display, app.run_button)
            pump(root, lambda: app.busy and app.answer.get("1.0", "end").count("circle") > 5)
            t0 = time.monotonic()
            click_widget(display, app.stop_button)
            pump(root, lambda: not app.busy, timeout=10)
            assert time.monotonic() - t0 < 5
            assert app.status.cget("text").startswith("stopped")
            assert 5 < app.result.count("circle") < len(endless) // 2
            assert app.run_button.cget("state") == "normal"
        finally:
            root.destroy()


def test_rendered_scales_boxes_and_masks_to_the_canvas():
    """Boxes and masks are drawn after scaling the image to the canvas (crisp outlines)."""
    import numpy as np
    from PIL import Image

    from apps.desktop.app import CANVAS, rendered
    from pg_edge.tasks.parse import DetectedObject
    from pg_edge.tasks.calls import TaskResult

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
