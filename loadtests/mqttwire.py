"""A tiny, independent MQTT 3.1.1 / 5.0 packet encoder and frame splitter.

Used only by the load generator (``loadtests.bench``). It deliberately does not
import anything from ``shardbroker``: a benchmark must not share the codec of
the broker it measures.

Only what a load generator needs is here: CONNECT, SUBSCRIBE, PUBLISH, the
QoS acknowledgements, PINGREQ and DISCONNECT are encoded; incoming frames are
split by :func:`split_frames` (or by the inlined loops in ``bench.py``, which
are the same logic specialised for speed).

Protocol levels: ``4`` is MQTT 3.1.1, ``5`` is MQTT 5.0.
"""

from __future__ import annotations

import socket
import struct
from collections import deque

# Packet types (high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# 2-byte big-endian packet identifiers 0..65535, precomputed (index = id).
PID_BYTES = [i.to_bytes(2, "big") for i in range(65536)]

# MQTT 5 property identifiers that the generator reads or writes.
PROP_SESSION_EXPIRY = 0x11
PROP_RECEIVE_MAXIMUM = 0x21


def varint(n: int) -> bytes:
    """MQTT variable byte integer (remaining length, property lengths)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(value, position after it) of the variable byte integer at ``pos``."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def utf8(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    if len(b) > 65535:
        raise ValueError("string too long")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def connect(client_id: str, *, proto: int = 4, clean: bool = True, keepalive: int = 60,
            session_expiry: int = 0, username: str | None = None, password: str | None = None) -> bytes:
    """CONNECT. ``session_expiry`` is an MQTT 5 property (ignored for 3.1.1)."""
    flags = 0x02 if clean else 0x00
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = utf8("MQTT") + bytes((proto, flags)) + struct.pack("!H", keepalive)
    if proto == 5:
        props = b""
        if session_expiry:
            props += bytes((PROP_SESSION_EXPIRY,)) + struct.pack("!I", session_expiry)
        body += varint(len(props)) + props
    body += utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return _packet(0x10, body)


def subscribe(packet_id: int, filters: list[tuple[str, int]], *, proto: int = 4) -> bytes:
    body = PID_BYTES[packet_id]
    if proto == 5:
        body += b"\x00"
    for topic, qos in filters:
        body += utf8(topic) + bytes((qos,))
    return _packet(0x82, body)


def publish(topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 0,
            proto: int = 4, retain: bool = False, dup: bool = False) -> bytes:
    prefix, mid = publish_parts(topic, len(payload), qos=qos, proto=proto, retain=retain, dup=dup)
    if qos:
        return prefix + PID_BYTES[packet_id] + mid + payload
    return prefix + mid + payload


def publish_parts(topic: str | bytes, payload_len: int, *, qos: int = 0, proto: int = 4,
                  retain: bool = False, dup: bool = False) -> tuple[bytes, bytes]:
    """Template for fast PUBLISH encoding: ``(prefix, mid)``.

    A packet is ``prefix + PID_BYTES[id] + mid + payload`` for QoS 1/2 and
    ``prefix + mid + payload`` for QoS 0 (``mid`` is the MQTT 5 empty
    property list, or empty for 3.1.1). The payload length must be the one
    given here, since the remaining length is baked into ``prefix``.
    """
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    t = utf8(topic)
    mid = b"\x00" if proto == 5 else b""
    remaining = len(t) + (2 if qos else 0) + len(mid) + payload_len
    return bytes((first,)) + varint(remaining) + t, mid


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + PID_BYTES[packet_id]


def pubrec(packet_id: int) -> bytes:
    return b"\x50\x02" + PID_BYTES[packet_id]


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + PID_BYTES[packet_id]


def pubcomp(packet_id: int) -> bytes:
    return b"\x70\x02" + PID_BYTES[packet_id]


def frame_head(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(position of the body, body length) of the packet starting at ``pos``, or None while its
    fixed header is not all there (a remaining length of more than 4 bytes is malformed:
    ``ValueError``)."""
    try:
        length, body = read_varint(buf, pos + 1)
    except IndexError:
        return None
    if body - pos > 5:
        raise ValueError("malformed remaining length")
    return body, length


def split_frames(buf: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Split complete frames off the front of ``buf``.

    Returns ``([(first_byte, body), ...], consumed)``; the caller keeps
    ``buf[consumed:]`` for the next read. Raises ``ValueError`` on a malformed
    remaining length.
    """
    frames: list[tuple[int, bytes]] = []
    i, n = 0, len(buf)
    while i + 2 <= n:
        first = buf[i]
        rl = buf[i + 1]
        j = i + 2
        if rl & 0x80:
            rl &= 0x7F
            shift = 7
            while True:
                if j >= n:
                    return frames, i
                b = buf[j]
                j += 1
                rl |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed remaining length")
        end = j + rl
        if end > n:
            break
        frames.append((first, bytes(buf[j:end])))
        i = end
    return frames, i


def connack_result(body: bytes, proto: int) -> tuple[int, dict[int, int]]:
    """``(return/reason code, {property id: int value})`` of a CONNACK body.

    Only integer properties that the generator cares about are decoded.
    """
    if len(body) < 2:
        raise ValueError("short CONNACK")
    code = body[1]
    props: dict[int, int] = {}
    if proto == 5 and len(body) > 2:
        plen, j = read_varint(body, 2)
        end = j + plen
        while j < end:
            pid = body[j]
            j += 1
            if pid in (0x24, 0x25, 0x28, 0x29, 0x2A, 0x01, 0x17, 0x19):  # 1-byte values
                props[pid] = body[j]
                j += 1
            elif pid in (0x21, 0x22, 0x13):  # 2-byte integers
                props[pid] = struct.unpack_from("!H", body, j)[0]
                j += 2
            elif pid in (0x11, 0x27):  # 4-byte integers
                props[pid] = struct.unpack_from("!I", body, j)[0]
                j += 4
            elif pid == 0x26:  # user property: two strings
                for _ in range(2):
                    (ln,) = struct.unpack_from("!H", body, j)
                    j += 2 + ln
            elif pid in (0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):  # strings / binary
                (ln,) = struct.unpack_from("!H", body, j)
                j += 2 + ln
            else:  # unknown: stop reading properties
                break
    return code, props


class Wire:
    """One blocking MQTT 3.1.1 (or 5.0) client on raw bytes: CONNECT at once, then whole packets
    (``packet``: first byte and body). With ``refuse``, a 3.1.1 CONNACK that refuses raises;
    without, the caller reads ``connack`` (flags, code)."""

    def __init__(self, port: int, client_id: str, proto: int = 4, host: str = "127.0.0.1", *,
                 clean: bool = True, timeout: float = 5.0, refuse: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.frames: deque[tuple[int, bytes]] = deque()
        self.sock.sendall(connect(client_id, proto=proto, clean=clean))
        first, self.connack = self.packet()
        if first >> 4 != 2 or (refuse and self.connack[1] != 0 and proto != 5):
            raise RuntimeError(f"CONNACK {self.connack!r}")

    def packet(self) -> tuple[int, bytes]:
        while not self.frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("closed")
            self.buf += chunk
            frames, used = split_frames(self.buf)
            del self.buf[:used]
            self.frames.extend(frames)
        return self.frames.popleft()

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()
