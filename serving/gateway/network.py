"""Who is asking, and who can reach us: the addresses the authentication-off guard judges.

Authentication off (`gateway.auth: false`) is for local experiments only, so it is refused twice:
- where the front door would listen on a network address: `detops deploy up` / `rollout` (nginx's
  `deploy.host`) and each service worker at its start (the addresses its own socket listens on);
- per request, on the original client's address: behind the deployment's nginx every TCP peer is
  127.0.0.1, so the client is read from `X-Forwarded-For`, which nginx sets to the address it accepted
  (deploy/nginx.py). The header is believed only when the TCP peer is one of `gateway.trusted_proxies`
  (loopback by default: the project's own nginx), and then its right-most address that is not itself a
  trusted proxy is the client; from any other peer it is ignored, so a client cannot name itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from pipelines.config.gateway import GatewayConfig
from pipelines.errors import DetopsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> list[Network]:
    """`gateway.trusted_proxies` as networks."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in trusted)


def client_address(scope: dict[str, Any], trusted: Sequence[Network]) -> str:
    """The original client's address of an ASGI request: the TCP peer, unless the peer is a trusted
    proxy, in which case the right-most `X-Forwarded-For` entry that is not a trusted proxy ("" when
    the peer is unknown; an unparsable entry is returned as it is and judged as not loopback)."""
    peer = (scope.get("client") or ("",))[0]
    if not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for key, value in scope.get("headers", ()) if key.lower() == b"x-forwarded-for"
            for h in value.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def loopback_address(address: str) -> bool:
    """Whether `address` (an IP, optionally with its port; no name lookup on the request path) is loopback."""
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or a name resolved here) means this machine only; `0.0.0.0`, `::`
    and anything unresolvable are not."""
    ip = _ip(host)
    if ip is not None:
        return ip.is_loopback
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(resolved) and all(_ip(a) is not None and _ip(a).is_loopback for a in resolved)  # type: ignore[union-attr]


def listening_addresses() -> list[str]:
    """The addresses this process's TCP sockets listen on (a BentoML worker inherits its server's)."""
    import psutil

    return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.laddr})


def refuse_auth_off_exposed(cfg: GatewayConfig, addresses: Iterable[str], where: str) -> None:
    """DetopsError (one line) when authentication is off and any of `addresses`, where `where` says
    they come from, is not loopback."""
    if cfg.auth:
        return
    exposed = [a for a in addresses if not is_loopback(a)]
    if exposed:
        raise DetopsError(f"authentication is off (gateway.auth: false) but {where} listens on "
                          f"{', '.join(exposed)}, a network address: turn authentication on or listen on 127.0.0.1")
