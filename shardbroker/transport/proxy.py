"""The PROXY protocol, version 2: the real client address in front of the bytes a load
balancer or proxy passes on (HAProxy's ``send-proxy-v2``, AWS NLB, Traefik, nginx).

A listener with ``proxy_protocol = true`` requires the header on every connection, before
TLS or MQTT; one without it is closed. The header says who the client is, so only turn it
on for a listener that only the proxy can reach. Version 1 (text) is not read.

A cluster node that relays a client to the node that serves it (``process/acceptor.py``) puts
a header made by ``encode`` in front of the client's bytes: the owner learns the client's
address from it, and knows the connection is relayed (it does not relay it again).

Pure: ``parse`` looks at bytes and ``encode`` makes them; the acceptor peeks them from the socket, so that it takes
exactly the header and leaves the TLS or MQTT bytes behind it in the kernel.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER = 16  # signature, version/command, family/protocol, length
MAX_LENGTH = 16 + 4096  # a header with more TLVs than this is refused

__all__ = ["HEADER", "ProxyError", "encode", "parse", "split_address"]


class ProxyError(ValueError):
    """Bytes that are not a PROXY protocol v2 header."""


def parse(data: bytes) -> tuple[int, str | None] | None:
    """``(header length, "host:port" of the client or None for a LOCAL connection)``, or None
    while the header is not complete; ``ProxyError`` for anything else."""
    if len(data) < HEADER:
        if not SIGNATURE.startswith(data[:12]):
            raise ProxyError("no PROXY protocol v2 signature")
        return None
    if data[:12] != SIGNATURE:
        raise ProxyError("no PROXY protocol v2 signature")
    ver_cmd, fam, length = data[12], data[13], struct.unpack_from(">H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"PROXY protocol version {ver_cmd >> 4}, not 2")
    total = HEADER + length
    if total > MAX_LENGTH:
        raise ProxyError(f"PROXY header of {total} bytes")
    if len(data) < total:
        return None
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return total, None
    if command != 1:
        raise ProxyError(f"PROXY command {command}")
    body = data[HEADER:total]
    if fam == 0x11 and len(body) >= 12:  # TCP over IPv4
        host = str(ipaddress.IPv4Address(body[0:4]))
        port = struct.unpack_from(">H", body, 8)[0]
        return total, f"{host}:{port}"
    if fam == 0x21 and len(body) >= 36:  # TCP over IPv6
        host = str(ipaddress.IPv6Address(body[0:16]))
        port = struct.unpack_from(">H", body, 32)[0]
        return total, f"[{host}]:{port}"
    if fam == 0x00:  # UNSPEC: no address to give
        return total, None
    raise ProxyError(f"PROXY address family 0x{fam:02X} is not TCP over IPv4 or IPv6")


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ``ValueError`` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def encode(source: str, destination: str) -> bytes:
    """A PROXY v2 header (command PROXY, TCP) saying the connection comes from ``source``
    and goes to ``destination`` (both ``host:port``, IP addresses); when they are not both
    IPv4 or both IPv6 addresses, an UNSPEC header (no address: the receiver keeps the TCP
    peer's)."""
    try:
        src_host, src_port = split_address(source)
        dst_host, dst_port = split_address(destination)
        src, dst = ipaddress.ip_address(src_host), ipaddress.ip_address(dst_host)
    except ValueError:
        return SIGNATURE + bytes((0x21, 0x00)) + struct.pack(">H", 0)
    if src.version != dst.version:
        return SIGNATURE + bytes((0x21, 0x00)) + struct.pack(">H", 0)
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack(">HH", src_port, dst_port)
    return SIGNATURE + bytes((0x21, fam)) + struct.pack(">H", len(body)) + body
