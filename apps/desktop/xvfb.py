"""Driving the desktop example in a real X window without a screen: Xvfb, xdotool, screenshots.

Used by tests/apps/test_desktop.py and docs/figures/make_desktop_screenshot.py (Linux; needs the
Debian packages xvfb and xdotool, see .ci/apt-packages.txt).

    with Xvfb() as display:              # ":N", a free display number Xvfb chose itself
        root = tkinter.Tk(screenName=display)
        ...
        click(display, x, y)             # a real pointer click, through the X server
        shot = screenshot(display)       # PIL image of the whole screen
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
from contextlib import contextmanager

from PIL import Image, ImageGrab

SCREEN = "1024x768x24"


def missing_tools() -> list[str]:
    return [t for t in ("Xvfb", "xdotool") if shutil.which(t) is None]


@contextmanager
def Xvfb(screen: str = SCREEN, timeout: float = 10.0):
    """Start Xvfb on a display number it picks (-displayfd), yield ":N", stop it after."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", screen,
                             "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        number = os.read(read_fd, 64).decode().strip() if ready else ""
        if not number.isdigit():
            raise RuntimeError(f"Xvfb did not start within {timeout} s (exit code {proc.poll()})")
        yield f":{number}"
    finally:
        os.close(read_fd)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def xdotool(display: str, *args: str) -> None:
    subprocess.run(["xdotool", *args], check=True, timeout=10,
                   env={**os.environ, "DISPLAY": display})


def click(display: str, x: int, y: int) -> None:
    """Move the pointer to screen (x, y) and click button 1."""
    xdotool(display, "mousemove", "--sync", str(x), str(y), "click", "1")


def click_widget(display: str, widget) -> None:
    """Click the centre of a Tk widget."""
    widget.update_idletasks()
    click(display, widget.winfo_rootx() + widget.winfo_width() // 2,
          widget.winfo_rooty() + widget.winfo_height() // 2)


def screenshot(display: str, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The screen (or box = left, top, right, bottom of it) as an RGB image."""
    shot = ImageGrab.grab(xdisplay=display).convert("RGB")
    return shot.crop(box) if box else shot
