"""Who the client is behind a trusted HTTP proxy: ``X-Forwarded-For`` and ``Forwarded: for=``.

A ``ws`` or ``wss`` listener with ``trusted_proxies`` believes these headers of a WebSocket
opening request when the request comes from a trusted proxy (the TCP peer, or the PROXY
protocol's address). Each proxy appends the address it got the request from, so the chain
reads client first, nearest proxy last; the client is the rightmost address in it that is not
itself a trusted proxy (the leftmost one when they all are). Anything to the left of that
could have been written by the client and is never believed. From an untrusted peer the
headers are ignored.

``X-Forwarded-For`` (what nginx, HAProxy and most load balancers write) is read when the
request has it; else ``Forwarded`` (RFC 7239). A value that does not parse, or names a hop
by something other than an IP address (``unknown``, an obfuscated ``_name``), is a
``ForwardedError``: the caller keeps the peer's address.

Pure: strings in, an address out; no sockets, no logging.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Hop = tuple[IPAddress, int]  # an address and its port (0: not given)

MAX_HOPS = 64  # a longer chain is refused as malformed

__all__ = ["ForwardedError", "Hop", "Network", "format_hop", "host_of", "networks", "parse_hop", "resolve", "trusted"]


class ForwardedError(ValueError):
    """A forwarding header whose value cannot be used."""


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """The networks of a listener's ``trusted_proxies`` (checked by the configuration already)."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, seen on dual-stack sockets) as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_hop(text: str) -> Hop:
    """``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]`` or ``[2001:db8::1]:80``."""
    text = text.strip()
    port = "0"
    try:
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ForwardedError(f"bad address {text!r}")
            port = rest[1:] or "0"
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        else:
            host = text
        ip = ipaddress.ip_address(host)
        number = int(port) if port.isdigit() else -1
    except ValueError:
        raise ForwardedError(f"bad address {text!r}") from None
    if not 0 <= number <= 65535:
        raise ForwardedError(f"bad port in {text!r}")
    return _plain(ip), number


def format_hop(hop: Hop) -> str:
    """``host:port`` as the rest of the broker writes a peer (``[v6]:port``; port 0: unknown)."""
    ip, port = hop
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def host_of(peer: str) -> str:
    """The host part of ``host:port``, ``[v6]:port`` or ``v6:port`` (the key of per-address limits)."""
    if peer.startswith("["):
        return peer[1:].partition("]")[0]
    return peer.rpartition(":")[0] or peer


def _split(value: str, sep: str) -> list[str]:
    """``value`` split at ``sep`` outside double-quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        raise ForwardedError(f"unterminated quoted string in {value!r}")
    parts.append("".join(current))
    return parts


def _forwarded_for(element: str) -> str:
    """The ``for=`` value of one ``Forwarded`` element, unquoted."""
    found = None
    for pair in _split(element, ";"):
        name, eq, value = pair.strip().partition("=")
        if not eq:
            raise ForwardedError(f"bad Forwarded pair {pair.strip()!r}")
        if name.strip().lower() == "for":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace("\\", "")
            found = value
    if found is None:
        raise ForwardedError(f"a Forwarded element without for=: {element.strip()!r}")
    return found


def chain(x_forwarded_for: Sequence[str], forwarded: Sequence[str]) -> list[Hop]:
    """The hops the request's headers list, client first (each a header's values in order);
    ``[]`` without either header."""
    if x_forwarded_for:
        texts = [t for value in x_forwarded_for for t in value.split(",")]
    elif forwarded:
        texts = [_forwarded_for(e) for value in forwarded for e in _split(value, ",")]
    else:
        return []
    if len(texts) > MAX_HOPS:
        raise ForwardedError(f"{len(texts)} hops")
    return [parse_hop(t) for t in texts]


def resolve(peer: str, proxies: Sequence[Network], x_forwarded_for: Sequence[str],
            forwarded: Sequence[str]) -> Hop | None:
    """The client's address when ``peer`` (``host:port``) is one of the trusted ``proxies`` and
    the request says whom it forwards; None when the headers are not to be used.
    ``ForwardedError`` for a header from a trusted proxy that cannot be used."""
    if not proxies or not trusted(host_of(peer), proxies):
        return None
    hops = chain(x_forwarded_for, forwarded)
    if not hops:
        return None
    for hop in reversed(hops):
        if not _trusted(hop[0], proxies):
            return hop
    return hops[0]


def trusted(host: str, networks: Sequence[Network]) -> bool:
    """Whether ``host`` (an address as text) is in one of ``networks``."""
    try:
        ip = _plain(ipaddress.ip_address(host))
    except ValueError:
        return False
    return _trusted(ip, networks)


def _trusted(ip: IPAddress, networks: Sequence[Network]) -> bool:
    return any(ip in net for net in networks)
