"""Which Host and Origin headers `pg-edge serve` answers: the defence against DNS rebinding.

A web page on evil.example can point its name at 127.0.0.1 and then drive this server from the
visitor's browser as a same-origin page; the browser still sends `Host: evil.example:8080`. So
a request is answered only when its Host names this machine by a loopback name (`localhost`,
127.0.0.0/8, `[::1]`, with any port), or the address or name the server is bound to (`--host`;
an IP literal cannot be rebound), or a name given with `--allowed-host NAME` (`*` allows any).
A request without Host (HTTP/1.0) is accepted: browsers always send one.

Browsers send `Origin` on cross-site requests and on every POST; when it is present its host
must pass the same test (`Origin: null`, from sandboxed pages and files, never does), so a
foreign page cannot use the server even when its Host would pass.

    policy = HostPolicy(bound="127.0.0.1", allowed=("myhost.lan",))
    policy.check(headers)      # ApiError 400 (malformed) / 403 (foreign), else None
"""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from .openai_format import ApiError

HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def is_loopback_name(name: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed); name lower-case, no port."""
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _forbidden(what: str, value: str) -> ApiError:
    return ApiError(403, f"this server answers only requests for this machine, not {what} {value!r} "
                    "(start pg-edge serve with --allowed-host NAME to allow another name)",
                    type="permission_error", code="host_not_allowed")


class HostPolicy:
    def __init__(self, bound: str = "127.0.0.1", allowed=()):
        self.allowed = {a.lower().strip("[]").rstrip(".") for a in allowed}
        self.any = "*" in self.allowed
        try:  # the address or name the server is bound to (not 0.0.0.0 / ::): clients may use it
            ip = ipaddress.ip_address(bound.strip("[]"))
            if not ip.is_unspecified:
                self.allowed.add(ip.compressed)
        except ValueError:
            if bound:
                self.allowed.add(bound.lower().rstrip("."))

    def allows(self, name: str) -> bool:
        """name: a host without its port (brackets around IPv6 allowed), any case."""
        name = name.lower()
        if self.any or is_loopback_name(name):
            return True
        return name.strip("[]").rstrip(".") in self.allowed

    def check(self, headers) -> None:
        host = headers.get("Host")
        if host is not None:
            m = HOST.fullmatch(host)
            if not m:
                raise ApiError(400, f"malformed Host header {host!r}", code="invalid_host")
            if not self.allows(m.group(1)):
                raise _forbidden("Host", host)
        origin = headers.get("Origin")
        if origin is not None and not self.any:
            try:
                name = urlsplit(origin).hostname if origin.startswith(("http://", "https://")) else None
            except ValueError:
                name = None
            if not name or not self.allows(name):
                raise _forbidden("Origin", origin)
