"""Hostile and unusual images (pg_edge.inputs.images): each generated here, each with the outcome
pg_edge promises: decoded correctly, or refused with one ImageError sentence, never a traceback,
a hang or gigabytes of memory."""
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pg_edge.inputs import images
from pg_edge.errors import ImageError
from pg_edge.inputs.images import load_image, preprocess_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, w: int, h: int, colour_type: int = 0) -> Path:
    """A valid PNG of w x h zero pixels, compressed row by row (never held in memory whole)."""
    channels = {0: 1, 6: 4}[colour_type]
    z = zlib.compressobj(6)
    row = b"\0" * (1 + w * channels)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def ztxt_bomb(path: Path) -> Path:
    """A 4x4 PNG with a zTXt chunk that inflates to 200 MB."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    png = buf.getvalue()
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * 200_000_000, 9))
    path.write_bytes(png[:33] + text + png[33:])  # right after IHDR
    return path


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_pixel_bombs_are_refused_before_decoding_with_small_peak_memory(tmp_path):
    """11000^2 grey (121 M pixels), 14000^2 RGBA (the issue's 762 KB file) and 15000^2 (past
    Pillow's own hard limit, twice ours): all refused from the header; a FIFO is refused at once."""
    files = [bomb_png(tmp_path / "a.png", 11000, 11000), bomb_png(tmp_path / "b.png", 14000, 14000, 6),
             bomb_png(tmp_path / "c.png", 15000, 15000)]
    assert os.path.getsize(files[1]) < 1_000_000
    os.mkfifo(tmp_path / "fifo.png")
    files.append(tmp_path / "fifo.png")
    script = textwrap.dedent("""
        import resource, sys
        from pg_edge.errors import ImageError
        from pg_edge.inputs.images import load_image, preprocess_image
        preprocess_image(__import__("numpy").zeros((8, 8, 3), "uint8"), 4)  # warm up every import
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for f in sys.argv[1:]:
            try:
                load_image(f)
                print("LOADED", f)
            except ImageError as err:
                print("REFUSED", err)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("PEAK_KB", after - before)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, text=True,
                         timeout=60, env=env)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == 4, lines
    assert "121,000,000 pixels" in refused[0] and "100,000,000" in refused[0]
    assert "196,000,000 pixels" in refused[1]
    assert "limit" in refused[2]
    assert "not a regular file" in refused[3]
    peak_kb = int(lines[-1].split()[1])
    assert peak_kb < 50_000, f"peak memory grew by {peak_kb} KB"  # decoding even one would take 121+ MB


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, pg_edge refuses
def test_pixel_limit_is_configurable(tmp_path):
    f = save(Image.new("RGB", (50, 40)), tmp_path / "x.png")
    old = images.max_image_pixels()
    try:
        images.set_max_image_pixels(1999)
        with pytest.raises(ImageError, match="2,000 pixels, past the limit of 1,999"):
            load_image(f)
        with pytest.raises(ImageError, match="limit"):
            load_image(np.zeros((50, 40, 3), np.uint8))  # arrays and PIL images too
        images.set_max_image_pixels(2000)
        assert load_image(f).size == (50, 40)
    finally:
        images.set_max_image_pixels(old)


def test_metadata_bomb_truncated_and_foreign_files_are_refused(tmp_path):
    cases = {
        "ztxt.png": ztxt_bomb(tmp_path / "ztxt.png"),
        "empty.png": save_bytes(tmp_path / "empty.png", b""),
        "text.jpg": save_bytes(tmp_path / "text.jpg", b"not a jpeg at all"),
        "image.eps": save(Image.new("RGB", (8, 8)), tmp_path / "image.eps"),  # would run Ghostscript
    }
    png = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
               tmp_path / "full.png")
    cases["truncated.png"] = save_bytes(tmp_path / "truncated.png", png.read_bytes()[:-300])
    jpg = save(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)),
               tmp_path / "full.jpg", quality=90)
    cases["truncated.jpg"] = save_bytes(tmp_path / "truncated.jpg", jpg.read_bytes()[:400])
    for name, path in cases.items():
        with pytest.raises(ImageError) as err:
            load_image(path)
        msg = str(err.value)
        assert name in msg and "\n" not in msg, msg
    with pytest.raises(ImageError, match="Decompressed data too large"):
        load_image(cases["ztxt.png"].read_bytes())  # the same through the bytes path


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unusual_modes_and_shapes_decode_as_documented(tmp_path):
    rng = np.random.default_rng(2)
    # CMYK JPEG: Pillow's conversion to RGB.
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    x = preprocess_image(save(cmyk, tmp_path / "cmyk.jpg", quality=100), 8)
    assert x[..., 0].mean() > 0.9 and x[..., 1].mean() < -0.9
    # 16-bit grey: scaled to 8 bits (a plain convert("RGB") would clip 32896 to white).
    g16 = Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))
    x = preprocess_image(save(g16, tmp_path / "g16.png"), 4)
    np.testing.assert_allclose(x, (128 / 255 - 0.5) / 0.5, atol=1e-6)
    # Palette with a transparent index: composited onto white.
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0] * 256)
    x = preprocess_image(save(p, tmp_path / "p.png", transparency=0), 4)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)
    # Animated GIF: the first frame (red), not the second (blue).
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    x = preprocess_image(gif, 4)
    assert x[..., 0].mean() > 0.9 and x[..., 2].mean() < -0.9
    # EXIF orientation 6 (stored 20x10, shown rotated 90 degrees): the upright 10x20 image.
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = save(Image.new("RGB", (20, 10)), tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(rot).size == (10, 20)
    assert load_image(rot.read_bytes()).size == (10, 20)
    # 1x1 and extreme aspect ratios: a square resize, finite values.
    for w, h in ((1, 1), (1, 20000), (20000, 1)):
        arr = rng.integers(0, 255, (h, w, 3), np.uint8)
        x = preprocess_image(save(Image.fromarray(arr), tmp_path / f"{w}x{h}.png"), 8)
        assert x.shape == (8, 8, 3) and np.isfinite(x).all()


def test_bad_in_memory_images_are_refused():
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 2), np.uint8),
                Image.new("RGB", (0, 5)), 3.5, None):
        with pytest.raises(ImageError):
            load_image(bad)
