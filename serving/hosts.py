"""Which `Host` headers the server answers (DNS rebinding).

A web page can make a browser send requests to a server on the user's loopback address
by pointing a name it controls at 127.0.0.1; the browser then sends `Host: that.name`.
So a server bound to loopback answers only loopback names and addresses (localhost,
127.0.0.1, [::1], ...), plus what `--allowed-hosts` adds. Bound elsewhere, it answers any
Host unless `--allowed-hosts` lists the names clients use (`*.example.com` matches
subdomains, `*` anything). Refusals are OpenAI-shaped 400s naming the header and the flag.
"""

from __future__ import annotations

import ipaddress

from .protocol import send_error

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hosts_to_answer(bind_host: str, option: str | None) -> list[str] | None:
    """The Host names to answer for a server bound to `bind_host` with `--allowed-hosts
    option` (comma-separated); None: any."""
    names = [n.strip().lower() for n in (option or "").split(",") if n.strip()]
    if "*" in names:
        return None
    if is_loopback(bind_host):
        return list(LOOPBACK_NAMES) + names
    return names or None


def host_name(header: str) -> str:
    """`Host` header value -> the name or address, without port, brackets or final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def _matches(name: str, allowed: list[str], loopback_ips: bool) -> bool:
    if loopback_ips and is_loopback(name):
        return True
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


class HostCheck:
    """Pure ASGI: 400 for a request whose Host header is not allowed. A request without a
    Host header (HTTP/1.0) passes: browsers always send one."""

    def __init__(self, app, allowed: list[str], bind_host: str):
        self.app, self.allowed, self.bind_host = app, allowed, bind_host
        self.loopback = is_loopback(bind_host)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                           if k == b"host"), None)
            if header is not None and not _matches(host_name(header), self.allowed,
                                                   self.loopback):
                where = "loopback" if self.loopback else self.bind_host
                await send_error(send, 400, f"Host header {header[:100]!r} is not allowed: this "
                                 f"server listens on {where} and answers "
                                 f"{', '.join(self.allowed)}"
                                 f"{' and loopback addresses' if self.loopback else ''}; start "
                                 f"it with --allowed-hosts NAME to answer other names",
                                 "invalid_request_error", "host_not_allowed")
                return
        await self.app(scope, receive, send)
