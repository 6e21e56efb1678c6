"""Image URLs of a request -> encoded bytes -> size from the header -> decoded PIL image.

Allowed always: `data:image/...;base64,...` URLs. Refused unless the server was started with the
matching flag: http(s) URLs (`--allow-remote-images`: the server would fetch whatever a client
names; the download within `fetch_seconds` in all, each read, the connection and each redirect
waiting at most READ_TIMEOUT_S) and server-side paths or file:// URLs (`--allow-files DIR`:
only regular files inside DIR; a name that cannot be read, such as a symlink loop, a NUL byte
or a name too long, is one 400 that shows nothing of the server's folders).

    data = image_bytes(url, policy, "image_url")   # ApiError for a refused or unreadable URL
    pixels = header_pixels(data, "image_url")      # from the header: a bad image is a 400 now
    image = decode(data, "image_url")              # the pixels: only once admitted (gate.py)
"""
from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pg_edge.errors import PgEdgeError
from pg_edge.inputs.images import FORMATS, max_image_pixels
from pg_edge.inputs.images import load_image
from pg_edge.checkpoint.safetensors_check import open_regular

from .openai_format import ApiError, bad

READ_TIMEOUT_S = 5  # the longest wait for any one read of a remote image


@dataclass
class ImagePolicy:
    allow_remote: bool = False
    files_root: Path | None = None  # server-side files allowed inside this folder only
    max_bytes: int = 20 * 2**20
    fetch_seconds: float = 30.0  # a whole remote fetch (checked between reads of <= READ_TIMEOUT_S)


def decode(data: bytes, param: str) -> Image.Image:
    """The decoded image (pg_edge.inputs.images: pixel limit, formats, first frame, EXIF)."""
    try:
        return load_image(data)
    except PgEdgeError as err:
        raise bad(f"{param}: {err}", param, "invalid_image") from None


def header_pixels(data: bytes, param: str) -> int:
    """width x height read from the image's header (nothing decoded); a header Pillow cannot
    read, or an image past the pixel limit, is the 400 that decoding would give."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
    except Exception:  # Pillow raises many kinds: decode() names the problem
        w = h = 0
    if w < 1 or h < 1 or w * h > max_image_pixels():
        decode(data, param)  # raises the one-line error (or, against expectation, succeeds)
    return max(w * h, 1)


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad(f"{param}: a data URL needs a ',' before its data", param, "invalid_image_url")
    fields = head.split(";")
    if not fields[0].lower().startswith("image/"):
        raise bad(f"{param}: the data URL's type is {fields[0] or 'missing'!r}, not image/*", param,
                  "invalid_image_url")
    if "base64" not in (f.lower() for f in fields[1:]):
        raise bad(f"{param}: the data URL must be base64 encoded (data:image/png;base64,...)", param,
                  "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param}: the data URL's base64 data is invalid", param, "invalid_image_url") from None


def _remote(url: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise bad(f"{param}: remote image URLs are refused by this server (start it with "
                  "--allow-remote-images, or send the image as a base64 data URL)", param, "remote_url_refused")
    deadline = time.monotonic() + policy.fetch_seconds
    try:
        with urllib.request.urlopen(url, timeout=min(READ_TIMEOUT_S, policy.fetch_seconds)) as resp:
            data = bytearray()
            while len(data) <= policy.max_bytes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete within {policy.fetch_seconds:g} s")
                block = resp.read1(min(2**16, policy.max_bytes + 1 - len(data)))
                if not block:
                    break
                data += block
    except Exception as err:  # urllib raises many kinds; all mean "could not fetch"
        raise bad(f"{param}: cannot fetch {url}: {err}", param, "invalid_image_url") from None
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"{param}: the image at {url} is over {policy.max_bytes} bytes", param=param)
    return bytes(data)


def _local(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.files_root is None:
        raise bad(f"{param}: server-side file paths are refused by this server (start it with "
                  "--allow-files DIR, or send the image as a base64 data URL)", param, "file_path_refused")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        root = policy.files_root.resolve()
        target = (root / path).resolve()
        inside = root == target or root in target.parents
        data = None
        if inside and target.is_file():
            with open_regular(target) as f:  # a FIFO or device is refused, never read
                data = f.read(policy.max_bytes + 1)
    except (OSError, ValueError, RuntimeError, PgEdgeError):
        # a symlink loop, a NUL byte, a name too long, a file gone or unreadable: one sentence
        # naming only what the client sent (never the server's own folders)
        raise bad(f"{param}: cannot read the file {shown!r} in the folder this server may read", param,
                  "invalid_image_url") from None
    if not inside:
        raise bad(f"{param}: {shown} is outside the folder this server may read", param, "file_path_refused")
    if data is None:
        raise bad(f"{param}: no such file {shown}", param, "invalid_image_url")
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"{param}: {shown} is over {policy.max_bytes} bytes", param=param)
    return data


def image_bytes(url, policy: ImagePolicy, param: str = "image_url") -> bytes:
    """An image URL (data:, http(s):, file: or a path) -> the encoded image, or ApiError."""
    if not isinstance(url, str) or not url:
        raise bad(f"{param} must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _data_url(url, param)
    if scheme in ("http", "https"):
        return _remote(url, policy, param)
    if scheme in ("file", ""):
        return _local(url, policy, param)
    raise bad(f"{param}: unsupported URL scheme {scheme!r} (use a data:image/...;base64 URL)",
              param, "invalid_image_url")
