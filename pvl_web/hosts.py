"""The Host check of `pvl-search serve`: a guard against DNS rebinding.

A web page on another site can make the browser point one of its own names at 127.0.0.1
(DNS rebinding); the browser then counts this server as that site's origin and lets the page
read answers, videos included. The one thing such a request cannot hide is the `Host` header:
it names the attacker's name. So a request is answered only when its Host (any port) is:

- a loopback name or address: localhost, 127.0.0.1 (any 127.x), ::1;
- the address the server listens on (`--host`); listening on every interface (0.0.0.0, ::),
  any IP address, since an address cannot be rebound;
- a name given with `--allowed-host` (`*`: any Host, e.g. behind a proxy that checks it).

Anything else gets 403 with a one-line reason. The token (pvl_web.auth) still guards every
address but loopback: this check comes on top of it, not instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pvl_web.auth import is_loopback

ANY_HOST = "*"
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})  # listening on every interface
ECHO_CHARS = 80  # the refusal shows at most this much of the Host it refuses


def host_name(value: str) -> str:
    """The name or address in a Host header value or a --host/--allowed-host value, without
    its port or IPv6 brackets, lower case ('[::1]:8000' -> '::1', 'LocalHost.:80' -> 'localhost')."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6] or [v6]:port
        end = value.find("]")
        return value[1:end] if end > 0 else ""  # unbalanced: no name
    if value.count(":") == 1:  # name:port (a bare IPv6 address has more than one colon)
        value = value.partition(":")[0]
    return value.rstrip(".")  # 'localhost.' is the same name


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedHosts:
    """What a request's Host may name (see the module docstring)."""

    names: frozenset[str]  # host_name() forms: the bound address and the --allowed-host names
    any_address: bool = False  # listening on every interface: any IP address
    anything: bool = False  # '*' given: no check

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> AllowedHosts:
        """The Hosts a server listening on `host` answers, plus the `extra` names (a port in
        them is ignored); ValueError for an extra that names no host."""
        names = {host_name(host)}
        for value in extra:
            value, name = value.strip(), host_name(value)
            if value != ANY_HOST and (not name or re.search(r"[\s/@,*]", value)):  # a URL, a list, a pattern
                raise ValueError(f"--allowed-host {value!r}: not a host name (e.g. search.example or 192.168.1.5)")
            names.add(name)
        return cls(frozenset(names), any_address=host_name(host) in WILDCARD_ADDRESSES,
                   anything=ANY_HOST in names)

    def allows(self, host: str | None) -> bool:
        """Whether a request whose Host header is `host` (None: none sent) is answered."""
        if self.anything:
            return True
        name = host_name(host or "")
        if not name:
            return False  # every browser sends a Host: no reason to answer without one
        return is_loopback(name) or name in self.names or (self.any_address and _is_address(name))


class HostGate:
    """ASGI middleware: a request whose Host is not allowed gets 403 and a one-line reason."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events carry no request
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if self.allowed.allows(host):
            await self.app(scope, receive, send)
            return
        shown = host if host is None or len(host) <= ECHO_CHARS else host[:ECHO_CHARS] + "..."
        reason = "no Host header" if not host else f"Host {shown!r} is not a name of this server"
        response = JSONResponse(
            {"detail": f"{reason}: it answers localhost, its own address and the names given with "
                       "--allowed-host (a guard against DNS rebinding)"},
            status_code=403,
        )
        await response(scope, receive, send)
