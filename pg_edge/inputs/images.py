"""Opening user images safely: a pixel limit checked before decoding, a fixed list of formats,
regular files only, metadata bombs refused, modes normalised.

What happens to each kind of image (see docs/hardening.md for the full table):
- more than `max_image_pixels()` pixels (default 100 million, `PG_EDGE_MAX_IMAGE_PIXELS` or
  `set_max_image_pixels` change it): refused from the header, before any pixel is decoded,
  so a 700 KB PNG claiming 14000x14000 costs nothing;
- formats: PNG, JPEG (and MPO), GIF, WebP, BMP, TIFF, PPM/PGM, TGA, ICO and, where Pillow has it,
  AVIF; others (EPS, which runs Ghostscript, PSD, ...) are refused;
- text/ICC chunks that decompress past Pillow's 1 MB limit (a "zTXt bomb"), truncated files and
  undecodable data: refused with one sentence;
- animated GIF/PNG/WebP: the first frame; multi-page TIFF: the first page;
- EXIF orientation: applied to files and bytes (an upright photo, as transformers' `load_image`
  and every viewer show it; boxes and masks are in that upright image's pixels); a PIL image
  or array handed over by an app is used as it is;
- 16-bit and 32-bit grey (`I;16*`, `I`, `F`): scaled to 8 bits (a plain convert would clip
  them to white); CMYK and YCbCr: Pillow's conversion to RGB (ICC profiles are not applied);
  palette and transparency: composited onto white (`to_rgb`);
- 1x1 images and extreme aspect ratios (1x20000): accepted; the model input is a square resize.

`preprocess_image` then does what Hugging Face's SiglipImageProcessor (PIL backend) does, step for
step, so pixels agree within float rounding: transparency composited onto white, RGB, square
resize with PIL bicubic (no aspect ratio kept), x/255 in float64 then float32,
(x - 0.5) / 0.5 -> [-1, 1]. Output is NHWC (MLX convolution layout), not HF's NCHW.

This module imports no MLX: the NumPy reference path and the tools share it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

DEFAULT_MAX_PIXELS = 100_000_000
Image.init()  # register every plugin, then keep the ones listed (AVIF only where Pillow has it)
FORMATS = tuple(f for f in ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "AVIF")
                if f in Image.OPEN)
_limit = [int(os.environ.get("PG_EDGE_MAX_IMAGE_PIXELS") or DEFAULT_MAX_PIXELS)]


def max_image_pixels() -> int:
    return _limit[0]


def set_max_image_pixels(n: int) -> None:
    """Change the pixel limit for this process (an app that handles huge scans may raise it)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ImageError(f"the pixel limit must be a positive integer, got {n!r}")
    _limit[0] = n
    _sync_pillow()


def _sync_pillow() -> None:
    # Pillow warns past its MAX_IMAGE_PIXELS and refuses past twice that, inside Image.open;
    # keep its limit at ours so its refusal never fires first with a different number.
    Image.MAX_IMAGE_PIXELS = _limit[0]


_sync_pillow()


def _too_big(w: int, h: int, name: str) -> ImageError:
    return ImageError(f"image {name} is {w}x{h} = {w * h:,} pixels, past the limit of {_limit[0]:,}; "
                      "use a smaller image (or raise pg_edge.set_max_image_pixels)")


def check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image {name} is empty ({w}x{h})")
    if w * h > _limit[0]:
        raise _too_big(w, h, name)


def check_header(path: str | os.PathLike, name: str) -> tuple[int, int]:
    """(width, height) of an image file from its header alone: a regular file, a supported
    format, within the pixel limit; ImageError otherwise. Nothing is decoded."""
    from ..checkpoint.safetensors_check import open_regular

    if not Path(path).exists():
        raise ImageError(f"image not found: {name}")
    try:
        fp = open_regular(path)
    except Exception as err:  # CheckpointError from open_regular: say "image" instead
        raise ImageError(f"cannot read image {name}: {str(err).split(': ', 1)[-1]}") from None
    try:
        with Image.open(fp, formats=FORMATS) as img:
            check_size(img, name)
            return img.size
    except Image.DecompressionBombError:
        raise ImageError(f"image {name} is larger than the limit of {_limit[0]:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not an image in a supported format "
                         f"({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"cannot read image {name}: {str(err)[:200] or type(err).__name__}") from None
    finally:
        fp.close()


def open_image(image, name: str) -> Image.Image:
    """Path or bytes -> a decoded PIL image (first frame, EXIF orientation applied)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(image))
    else:
        from ..checkpoint.safetensors_check import open_regular

        path = Path(image)
        if not path.exists():
            raise ImageError(f"image not found: {image}")
        try:
            fp = open_regular(path)
        except Exception as err:  # CheckpointError from open_regular: say "image" instead
            raise ImageError(f"cannot read image {name}: {str(err).split(': ', 1)[-1]}") from None
    try:
        img = Image.open(fp, formats=FORMATS)  # reads the header only
        check_size(img, name)  # from the header: nothing decoded yet
        img.load()
        img = _upright(img)
        return normalise_mode(img, name)
    except Image.DecompressionBombError:
        raise ImageError(f"image {name} is larger than the limit of {_limit[0]:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not an image in a supported format "
                         f"({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        # Pillow: truncated data (OSError), text/ICC bombs (ValueError), broken headers (SyntaxError)
        raise ImageError(f"cannot read image {name}: {str(err)[:200] or type(err).__name__}") from None
    finally:
        if not isinstance(image, (bytes, bytearray, memoryview)):
            fp.close()


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF is metadata, not pixels: never fail the image for it
        return img


def normalise_mode(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Modes `to_rgb` cannot turn into RGB faithfully -> 8-bit ones ("L")."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img)
        if img.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535 and a.max() > 255):
            a = np.round(a.astype(np.float64) / 257.0)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    if img.mode not in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
        raise ImageError(f"image {name} has colour mode {img.mode}, which pg_edge does not convert; "
                         "save it as RGB")
    return img


def from_array(a: np.ndarray) -> Image.Image:
    """HxW or HxWxC (C in 1, 3, 4) uint8 array -> PIL image, within the pixel limit."""
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageError(f"image array must be uint8 HxW or HxWxC with C 1, 3 or 4; got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    if w < 1 or h < 1:
        raise ImageError(f"image <array> is empty ({w}x{h})")
    if w * h > _limit[0]:  # from the shape: nothing copied yet (a broadcast view costs no memory)
        raise _too_big(w, h, "<array>")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return Image.fromarray(np.ascontiguousarray(a))


ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def load_image(image: ImageInput) -> Image.Image:
    """A path, raw bytes, a PIL image or an HWC uint8 array -> PIL image (not yet RGB).

    Files and bytes go through `open_image`: pixel limit checked before decoding, known
    formats only, first frame, EXIF orientation applied, 16-bit grey scaled to 8 bits."""
    if isinstance(image, Image.Image):
        check_size(image, "<PIL image>")
        return normalise_mode(image, "<PIL image>")
    if isinstance(image, np.ndarray):
        return from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return open_image(image, "<bytes>")
    if not isinstance(image, (str, os.PathLike)):
        raise ImageError(f"an image must be a path, bytes, a PIL image or a uint8 array, got {type(image).__name__}")
    return open_image(image, str(image))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (what transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(image: ImageInput, size: int) -> np.ndarray:
    """Any image -> float32[size, size, 3] in [-1, 1]."""
    img = to_rgb(load_image(image))
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)
