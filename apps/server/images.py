"""Image URLs of a request -> decoded PIL images, under the server's policy.

Allowed always: `data:image/...;base64,...` URLs. Refused unless the server was started with the
matching flag: http(s) URLs (`--allow-remote-images`: the server would fetch whatever a client
names) and server-side paths or file:// URLs (`--allow-files DIR`: only files inside DIR).
Images are decoded here, in the request's thread, so a bad one is answered before the request
waits for the model.
"""
from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pg_edge.errors import PgEdgeError
from pg_edge.processor import load_image

from .openai_format import ApiError, bad

REMOTE_TIMEOUT_S = 10


@dataclass
class ImagePolicy:
    allow_remote: bool = False
    files_root: Path | None = None  # server-side files allowed inside this folder only
    max_bytes: int = 20 * 2**20


def _decode(data: bytes, param: str) -> Image.Image:
    try:
        return load_image(data)
    except PgEdgeError as err:
        raise bad(f"{param}: {err}", param, "invalid_image") from None


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
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as resp:
            data = resp.read(policy.max_bytes + 1)
    except Exception as err:  # urllib raises many kinds; all mean "could not fetch"
        raise bad(f"{param}: cannot fetch {url}: {err}", param, "invalid_image_url") from None
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"{param}: the image at {url} is over {policy.max_bytes} bytes", param=param)
    return data


def _local(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.files_root is None:
        raise bad(f"{param}: server-side file paths are refused by this server (start it with "
                  "--allow-files DIR, or send the image as a base64 data URL)", param, "file_path_refused")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = policy.files_root.resolve()
    target = (root / path).resolve()
    if root != target and root not in target.parents:
        raise bad(f"{param}: {path} is outside the folder this server may read ({root})", param,
                  "file_path_refused")
    if not target.is_file():
        raise bad(f"{param}: no such file {path}", param, "invalid_image_url")
    if target.stat().st_size > policy.max_bytes:
        raise ApiError(413, f"{param}: {path} is over {policy.max_bytes} bytes", param=param)
    return target.read_bytes()


def fetch_image(url, policy: ImagePolicy, param: str = "image_url") -> Image.Image:
    """An image URL (data:, http(s):, file: or a path) -> decoded PIL image, or ApiError."""
    if not isinstance(url, str) or not url:
        raise bad(f"{param} must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _data_url(url, param)
    elif scheme in ("http", "https"):
        data = _remote(url, policy, param)
    elif scheme in ("file", ""):
        data = _local(url, policy, param)
    else:
        raise bad(f"{param}: unsupported URL scheme {scheme!r} (use a data:image/...;base64 URL)",
                  param, "invalid_image_url")
    return _decode(data, param)
