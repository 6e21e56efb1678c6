"""The HTTP/1.1 wire of `pg-edge serve`: request heads read strictly, under one deadline.

    reader = DeadlineReader(sock); rfile = io.BufferedReader(reader)
    reader.deadline = time.monotonic() + 30        # every read below waits at most until then
    head = read_head(rfile)                        # Head(method, target, version, headers) or WireError
    n = body_length(head.headers)                  # strict Content-Length, or WireError

What is accepted (anything else is a WireError carrying the status to answer, and the
connection is closed after it, because where the next request starts is no longer known):
- request line `METHOD /path HTTP/1.0|1.1`: a token method, an origin-form target (starts with
  `/`) of at most MAX_LINE bytes (414 past it), versions 1.0 and 1.1 only (505 for HTTP/2+);
  up to two empty lines before it are skipped (RFC 9112 2.2);
- header lines `Name: value`: a token name with no space before the colon, no line folding,
  no control bytes but tab in the value; at most MAX_HEADERS lines and MAX_HEAD bytes in all
  (431 past them); a second Host or Content-Length header is refused;
- the body: `Content-Length` as ASCII digits only (no sign, no `_`, no list); any
  `Transfer-Encoding` is refused with 411 (chunked bodies are not read), so the length of a
  body is never ambiguous.
"""
from __future__ import annotations

import io
import re
import socket
import time
from dataclasses import dataclass
from http.client import HTTPMessage

MAX_LINE = 8192  # request line and each header line, in bytes
MAX_HEADERS = 64
MAX_HEAD = 32 * 1024  # the whole head
MAX_LENGTH_DIGITS = 15  # a Content-Length longer than this is past any body limit anyway

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form: visible ASCII, no spaces
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes other than tab
SINGLE = ("host", "content-length", "transfer-encoding", "authorization", "origin", "content-type")


class WireError(Exception):
    """A request that cannot be read as HTTP/1.1: answer `status` and close."""

    def __init__(self, status: int, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class RequestTimeout(Exception):
    """The deadline passed before the request (head or body) had arrived."""


@dataclass
class Head:
    method: str
    target: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: HTTPMessage
    raw_line: str  # the request line as received (latin-1), for logs


class DeadlineReader(io.RawIOBase):
    """A socket's input where each read waits at most until `deadline` (time.monotonic(); None:
    no limit). The deadline covers many reads, so a client sending a byte at a time still
    meets it, unlike a per-read socket timeout."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout()
            self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise RequestTimeout() from None


def _line(rfile, status: int, what: str) -> bytes | None:
    """One line with its ending removed; None at the end of input; WireError past MAX_LINE."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        if len(line) > MAX_LINE:
            raise WireError(status, f"the {what} is longer than {MAX_LINE} bytes",
                            "uri_too_long" if status == 414 else "header_too_large")
        raise WireError(400, "the request ended in the middle of its head", "incomplete_request")
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\r" in line:
        raise WireError(400, f"a bare CR in the {what}")
    return line


def read_head(rfile) -> Head | None:
    """The request line and headers from a buffered reader; None when the input ends before a
    request starts (the client closed an idle connection)."""
    line = _line(rfile, 414, "request line")
    for _ in range(2):  # tolerated empty lines before the request line
        if line == b"":
            line = _line(rfile, 414, "request line")
    if line is None:
        return None
    words = line.split(b" ")
    if len(words) != 3 or not TOKEN.fullmatch(words[0]):
        raise WireError(400, "the request line must be 'METHOD /path HTTP/1.1'")
    method, target, version = words
    if not re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
        raise WireError(400, "the request line must end in HTTP/1.0 or HTTP/1.1")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise WireError(505, f"{version.decode()} is not supported; use HTTP/1.1", "http_version_not_supported")
    if not TARGET.fullmatch(target):
        raise WireError(400, "the request target must be a path starting with '/'")

    headers, size, seen = HTTPMessage(), len(line) + 2, set()
    while True:
        hline = _line(rfile, 431, "header line")
        if hline is None:
            raise WireError(400, "the request ended in the middle of its head", "incomplete_request")
        if not hline:
            break
        size += len(hline) + 2
        if size > MAX_HEAD:
            raise WireError(431, f"the request head is longer than {MAX_HEAD} bytes", "header_too_large")
        if len(headers) >= MAX_HEADERS:
            raise WireError(431, f"more than {MAX_HEADERS} header lines", "header_too_large")
        if hline[:1] in (b" ", b"\t"):
            raise WireError(400, "folded header lines are not accepted")
        name, colon, value = hline.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise WireError(400, "a header line must be 'Name: value' (no space before the colon)")
        value = value.strip(b" \t")
        if BAD_VALUE.search(value):
            raise WireError(400, f"control bytes in the {name.decode()} header")
        key = name.decode("ascii").lower()
        if key in SINGLE and key in seen:
            raise WireError(400, f"more than one {name.decode()} header")
        seen.add(key)
        headers[name.decode("ascii")] = value.decode("latin-1")
    return Head(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers,
                line.decode("latin-1"))


def body_length(headers: HTTPMessage) -> int | None:
    """The body's length from Content-Length (None when absent); WireError when it is not plain
    digits or a Transfer-Encoding is present."""
    if headers.get("Transfer-Encoding") is not None:
        raise WireError(411, "send the request body with a Content-Length (Transfer-Encoding is "
                        "not accepted)", "length_required")
    value = headers.get("Content-Length")
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise WireError(400, f"Content-Length must be a number of bytes, got {printable(value)!r}",
                        "invalid_content_length")
    if len(value.lstrip("0")) > MAX_LENGTH_DIGITS:
        raise WireError(413, "the request body is too large", "request_too_large")
    return int(value)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}
_CONTROL[ord("\\")] = "\\\\"


def printable(text: str) -> str:
    """text with control characters (and backslashes) escaped: safe for a terminal or a log."""
    return text.translate(_CONTROL)
