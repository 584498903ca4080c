"""Independent MQTT packet builders, a small parser and a blocking raw client.

Written from the MQTT 3.1 / 3.1.1 / 5.0 specifications for black-box tests. It must
never import ``shardbroker``: it exists to check the broker's codec from the outside,
so a bug shared by both sides cannot hide.

Builders return complete packets (fixed header included) as ``bytes``. Strings may be
given as ``bytes`` to inject invalid UTF-8. Properties are passed pre-encoded: join
``prop_*`` results, e.g. ``props=prop_u32(SESSION_EXPIRY_INTERVAL, 60) + prop_pair(USER_PROPERTY, "k", "v")``;
the builder adds the property length.

Decoders return plain values; 5.0 properties become a dict of id -> value, except User
Property (id -> list of (name, value) in order) and Subscription Identifier (id -> list).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# ---------------------------------------------------------------------------
# Packet types (2.1.2)

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# ---------------------------------------------------------------------------
# 5.0 property identifiers (2.2.2.2)

PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_IDENTIFIER = 0x0B
SESSION_EXPIRY_INTERVAL = 0x11
ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTHENTICATION_METHOD = 0x15
AUTHENTICATION_DATA = 0x16
REQUEST_PROBLEM_INFORMATION = 0x17
WILL_DELAY_INTERVAL = 0x18
REQUEST_RESPONSE_INFORMATION = 0x19
RESPONSE_INFORMATION = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

# How each property's value is encoded on the wire.
_U8, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = "u8", "u16", "u32", "varint", "str", "bin", "pair"
PROPERTY_TYPES = {
    0x01: _U8, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32,
    0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _U8, 0x18: _U32, 0x19: _U8,
    0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _U8,
    0x25: _U8, 0x26: _PAIR, 0x27: _U32, 0x28: _U8, 0x29: _U8, 0x2A: _U8,
}
# Properties that may appear more than once; decoded into lists.
MULTI_PROPERTIES = {USER_PROPERTY, SUBSCRIPTION_IDENTIFIER}

# ---------------------------------------------------------------------------
# Reason codes used by the tests (2.4)

RC_SUCCESS = 0x00
RC_DISCONNECT_WITH_WILL = 0x04
RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_UNSPECIFIED_ERROR = 0x80
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_IMPLEMENTATION_SPECIFIC_ERROR = 0x83
RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
RC_CLIENT_IDENTIFIER_NOT_VALID = 0x85
RC_BAD_USERNAME_OR_PASSWORD = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_BAD_AUTHENTICATION_METHOD = 0x8C
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_IDENTIFIER_NOT_FOUND = 0x92
RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93
RC_TOPIC_ALIAS_INVALID = 0x94
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99

# 3.1.1 CONNACK return codes (3.2.2.3)
V3_ACCEPTED = 0
V3_UNACCEPTABLE_PROTOCOL_VERSION = 1
V3_IDENTIFIER_REJECTED = 2

# ---------------------------------------------------------------------------
# Primitive encoders (1.5)


def varint(n: int) -> bytes:
    """Variable Byte Integer (1.5.5 / 2.2.3): 7 bits per byte, low group first."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def mqtt_str(s: str | bytes) -> bytes:
    """UTF-8 Encoded String: 2-byte length then the bytes. ``bytes`` pass through raw."""
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return u16(len(b)) + b


def mqtt_bin(b: bytes | str) -> bytes:
    """Binary Data: 2-byte length then the bytes."""
    b = b.encode("utf-8") if isinstance(b, str) else bytes(b)
    return u16(len(b)) + b


def fixed(packet_type: int, flags: int, body: bytes) -> bytes:
    """A whole packet: first byte (type << 4 | flags), remaining length, body."""
    return bytes([(packet_type << 4) | (flags & 0x0F)]) + varint(len(body)) + body


# ---------------------------------------------------------------------------
# 5.0 property encoders. Each returns id + value; join them and pass as props=.


def prop_u8(pid: int, v: int) -> bytes:
    return varint(pid) + bytes([v])


def prop_u16(pid: int, v: int) -> bytes:
    return varint(pid) + u16(v)


def prop_u32(pid: int, v: int) -> bytes:
    return varint(pid) + u32(v)


def prop_varint(pid: int, v: int) -> bytes:
    return varint(pid) + varint(v)


def prop_str(pid: int, s: str | bytes) -> bytes:
    return varint(pid) + mqtt_str(s)


def prop_bin(pid: int, b: bytes | str) -> bytes:
    return varint(pid) + mqtt_bin(b)


def prop_pair(pid: int, k: str | bytes, v: str | bytes) -> bytes:
    return varint(pid) + mqtt_str(k) + mqtt_str(v)


def user_props(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(prop_pair(USER_PROPERTY, k, v) for k, v in pairs)


def props_block(props: bytes) -> bytes:
    """Property Length (varint) followed by the encoded properties."""
    return varint(len(props)) + props


# ---------------------------------------------------------------------------
# Packet builders


@dataclass
class Will:
    topic: str | bytes
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    props: bytes = b""  # 5.0 Will Properties, pre-encoded


def connect(
    client_id: str | bytes,
    version: int = 4,
    clean: bool = True,
    keepalive: int = 60,
    will: Will | None = None,
    username: str | bytes | None = None,
    password: bytes | str | None = None,
    props: bytes = b"",
    protocol_name: str | bytes | None = None,
    flags_override: int | None = None,
) -> bytes:
    """CONNECT (3.1). version 3 uses protocol name "MQIsdp", 4 and 5 use "MQTT"."""
    if protocol_name is None:
        protocol_name = "MQIsdp" if version == 3 else "MQTT"
    flags = 0
    if clean:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | ((will.qos & 3) << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    if flags_override is not None:
        flags = flags_override
    vh = mqtt_str(protocol_name) + bytes([version, flags]) + u16(keepalive)
    if version == 5:
        vh += props_block(props)
    payload = mqtt_str(client_id)
    if will is not None:
        if version == 5:
            payload += props_block(will.props)
        payload += mqtt_str(will.topic) + mqtt_bin(will.payload)
    if username is not None:
        payload += mqtt_str(username)
    if password is not None:
        payload += mqtt_bin(password)
    return fixed(CONNECT, 0, vh + payload)


def publish(
    topic: str | bytes,
    payload: bytes | str = b"",
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    pid: int | None = None,
    version: int = 4,
    props: bytes = b"",
) -> bytes:
    """PUBLISH (3.3). ``pid`` is required for qos > 0 (pass it explicitly; 0 is allowed
    here so malformed tests can send it)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    flags = (0x08 if dup else 0) | ((qos & 3) << 1) | (0x01 if retain else 0)
    body = mqtt_str(topic)
    if qos > 0 or pid is not None:
        if pid is None:
            raise ValueError("qos > 0 needs a packet id")
        body += u16(pid)
    if version == 5:
        body += props_block(props)
    return fixed(PUBLISH, flags, body + payload)


def _ack(packet_type: int, flags: int, pid: int, version: int, reason: int | None,
         props: bytes) -> bytes:
    body = u16(pid)
    if version == 5 and (reason is not None or props):
        body += bytes([reason or 0])
        if props:
            body += props_block(props)
    return fixed(packet_type, flags, body)


def puback(pid: int, version: int = 4, reason: int | None = None, props: bytes = b"") -> bytes:
    return _ack(PUBACK, 0, pid, version, reason, props)


def pubrec(pid: int, version: int = 4, reason: int | None = None, props: bytes = b"") -> bytes:
    return _ack(PUBREC, 0, pid, version, reason, props)


def pubrel(pid: int, version: int = 4, reason: int | None = None, props: bytes = b"") -> bytes:
    return _ack(PUBREL, 0x02, pid, version, reason, props)


def pubcomp(pid: int, version: int = 4, reason: int | None = None, props: bytes = b"") -> bytes:
    return _ack(PUBCOMP, 0, pid, version, reason, props)


def subopts(qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
            retain_handling: int = 0) -> int:
    """The 5.0 Subscription Options byte (3.8.3.1); in 3.1.1 only the QoS bits exist."""
    return ((qos & 3) | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0)
            | ((retain_handling & 3) << 4))


def subscribe(
    pid: int,
    topics: list[tuple[str | bytes, int]],
    version: int = 4,
    props: bytes = b"",
    flags: int = 0x02,
) -> bytes:
    """SUBSCRIBE (3.8): ``topics`` is a list of (filter, options byte)."""
    body = u16(pid)
    if version == 5:
        body += props_block(props)
    for flt, opts in topics:
        body += mqtt_str(flt) + bytes([opts])
    return fixed(SUBSCRIBE, flags, body)


def unsubscribe(pid: int, filters: list[str | bytes], version: int = 4, props: bytes = b"",
                flags: int = 0x02) -> bytes:
    body = u16(pid)
    if version == 5:
        body += props_block(props)
    for flt in filters:
        body += mqtt_str(flt)
    return fixed(UNSUBSCRIBE, flags, body)


def pingreq() -> bytes:
    return b"\xc0\x00"


def pingresp() -> bytes:
    return b"\xd0\x00"


def disconnect(version: int = 4, reason: int | None = None, props: bytes = b"") -> bytes:
    """DISCONNECT (3.14). In 5.0 the reason and properties are omitted when not given."""
    body = b""
    if version == 5 and (reason is not None or props):
        body = bytes([reason or 0])
        if props:
            body += props_block(props)
    return fixed(DISCONNECT, 0, body)


def auth(reason: int = 0x18, props: bytes = b"") -> bytes:
    """AUTH (3.15), 5.0 only."""
    body = bytes([reason]) + props_block(props)
    return fixed(AUTH, 0, body)


# ---------------------------------------------------------------------------
# Decoders


class MalformedError(ValueError):
    """The bytes the broker sent do not decode (a broker bug)."""


def decode_varint(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """(value, next position). At most 4 bytes."""
    value = 0
    mult = 1
    for i in range(4):
        if pos + i >= len(buf):
            raise MalformedError("truncated variable byte integer")
        byte = buf[pos + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, pos + i + 1
        mult *= 128
    raise MalformedError("variable byte integer longer than 4 bytes")


def _take(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(buf):
        raise MalformedError(f"need {n} bytes at {pos}, have {len(buf) - pos}")
    return bytes(buf[pos:pos + n]), pos + n


def decode_u16(buf: bytes, pos: int) -> tuple[int, int]:
    b, pos = _take(buf, pos, 2)
    return struct.unpack("!H", b)[0], pos


def decode_u32(buf: bytes, pos: int) -> tuple[int, int]:
    b, pos = _take(buf, pos, 4)
    return struct.unpack("!I", b)[0], pos


def decode_bin(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = decode_u16(buf, pos)
    return _take(buf, pos, n)


def decode_str(buf: bytes, pos: int) -> tuple[str, int]:
    b, pos = decode_bin(buf, pos)
    try:
        return b.decode("utf-8"), pos
    except UnicodeDecodeError as e:
        raise MalformedError(f"invalid UTF-8 string {b!r}") from e


def parse_props(buf: bytes, pos: int = 0) -> tuple[dict[int, Any], int]:
    """Decode a property block (length + properties) at ``pos``."""
    length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise MalformedError("property length beyond packet")
    out: dict[int, Any] = {}
    while pos < end:
        pid, pos = decode_varint(buf, pos)
        kind = PROPERTY_TYPES.get(pid)
        value: Any
        if kind == _U8:
            b, pos = _take(buf, pos, 1)
            value = b[0]
        elif kind == _U16:
            value, pos = decode_u16(buf, pos)
        elif kind == _U32:
            value, pos = decode_u32(buf, pos)
        elif kind == _VARINT:
            value, pos = decode_varint(buf, pos)
        elif kind == _STR:
            value, pos = decode_str(buf, pos)
        elif kind == _BIN:
            value, pos = decode_bin(buf, pos)
        elif kind == _PAIR:
            k, pos = decode_str(buf, pos)
            v, pos = decode_str(buf, pos)
            value = (k, v)
        else:
            raise MalformedError(f"unknown property id 0x{pid:02X}")
        if pid in MULTI_PROPERTIES:
            out.setdefault(pid, []).append(value)
        elif pid in out:
            raise MalformedError(f"property 0x{pid:02X} appears twice")
        else:
            out[pid] = value
    if pos != end:
        raise MalformedError("property block overran its length")
    return out, pos


class ConnAck(NamedTuple):
    session_present: bool
    rc: int
    props: dict[int, Any]


def parse_connack(body: bytes, version: int = 4) -> ConnAck:
    if len(body) < 2:
        raise MalformedError(f"CONNACK too short: {body!r}")
    if body[0] & 0xFE:
        raise MalformedError(f"CONNACK reserved flag bits set: {body[0]:#x}")
    props: dict[int, Any] = {}
    if version == 5 and len(body) > 2:
        props, pos = parse_props(body, 2)
        if pos != len(body):
            raise MalformedError("trailing bytes in CONNACK")
    elif version != 5 and len(body) != 2:
        raise MalformedError(f"3.1.1 CONNACK must have remaining length 2: {body!r}")
    return ConnAck(bool(body[0] & 1), body[1], props)


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    pid: int | None
    props: dict[int, Any]
    retain: bool
    dup: bool


def parse_publish(flags: int, body: bytes, version: int = 4) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedError("PUBLISH with QoS 3")
    topic, pos = decode_str(body, 0)
    pid = None
    if qos > 0:
        pid, pos = decode_u16(body, pos)
    props: dict[int, Any] = {}
    if version == 5:
        props, pos = parse_props(body, pos)
    return Publish(topic, bytes(body[pos:]), qos, pid, props, bool(flags & 1), bool(flags & 8))


class Ack(NamedTuple):
    pid: int
    reason: int
    props: dict[int, Any]


def parse_ack(body: bytes, version: int = 4) -> Ack:
    """PUBACK / PUBREC / PUBREL / PUBCOMP: pid, reason (0 if omitted), properties."""
    pid, pos = decode_u16(body, 0)
    reason = 0
    props: dict[int, Any] = {}
    if version == 5:
        if pos < len(body):
            reason = body[pos]
            pos += 1
        if pos < len(body):
            props, pos = parse_props(body, pos)
    if pos != len(body):
        raise MalformedError(f"trailing bytes in ack: {body!r}")
    return Ack(pid, reason, props)


class SubAck(NamedTuple):
    pid: int
    codes: list[int]
    props: dict[int, Any]


def parse_suback(body: bytes, version: int = 4) -> SubAck:
    """SUBACK (and UNSUBACK in 5.0): pid, per-filter codes, properties."""
    pid, pos = decode_u16(body, 0)
    props: dict[int, Any] = {}
    if version == 5:
        props, pos = parse_props(body, pos)
    return SubAck(pid, list(body[pos:]), props)


def parse_unsuback(body: bytes, version: int = 4) -> SubAck:
    if version != 5:
        if len(body) != 2:
            raise MalformedError(f"3.1.1 UNSUBACK must have remaining length 2: {body!r}")
        return SubAck(decode_u16(body, 0)[0], [], {})
    return parse_suback(body, version)


class Disconnect(NamedTuple):
    reason: int
    props: dict[int, Any]


def parse_disconnect(body: bytes, version: int = 5) -> Disconnect:
    if version != 5 or not body:
        return Disconnect(0, {})
    reason = body[0]
    props: dict[int, Any] = {}
    if len(body) > 1:
        props, _ = parse_props(body, 1)
    return Disconnect(reason, props)


def parse_auth(body: bytes) -> Disconnect:
    return parse_disconnect(body, 5)


def split_packets(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a byte string holding whole packets into (type, flags, body) tuples."""
    out = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        length, p = decode_varint(data, pos + 1)
        body, pos = _take(data, p, length)
        out.append((first >> 4, first & 0x0F, body))
    return out


# ---------------------------------------------------------------------------
# Raw blocking client


class ConnectionClosed(ConnectionError):
    """The server closed the connection while a packet was expected."""


class Timeout(AssertionError):
    """No (matching) packet arrived in time."""


Packet = tuple[int, int, bytes]


def describe(pkt: Packet | None) -> str:
    if pkt is None:
        return "nothing"
    t, f, b = pkt
    shown = b if len(b) <= 64 else b[:64] + b"..."
    return f"{PACKET_NAMES.get(t, t)}(flags={f:#x}, body={shown!r})"


@dataclass
class RawClient:
    """A blocking TCP client speaking raw MQTT bytes.

    Packets read while waiting for a specific type (``expect``) are kept and returned
    first by later reads, so nothing is lost. ``version`` (set by ``connect_mqtt``) is
    used by the convenience methods to build and parse version-specific packets.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    connect_timeout: float = 5.0
    version: int = 4
    sock: socket.socket | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _pending: deque[Packet] = field(default_factory=deque)
    closed: bool = False
    _next_pid: int = 0

    def __post_init__(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- bytes -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, returning False instead of raising if the server already closed."""
        try:
            self.send(data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.closed = True

    def abort(self) -> None:
        """Close abruptly (RST), as a crashing client would."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.close()

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer. False on timeout; raises ConnectionClosed on EOF."""
        assert self.sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            r, _, _ = select.select([self.sock], [], [], remaining)
        except (OSError, ValueError) as e:
            raise ConnectionClosed(str(e)) from e
        if not r:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise ConnectionClosed(str(e)) from e
        except OSError as e:
            raise ConnectionClosed(str(e)) from e
        if not chunk:
            raise ConnectionClosed("EOF")
        self._buf += chunk
        return True

    def _parse_one(self) -> Packet | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        length = 0
        mult = 1
        pos = 1
        while True:
            if pos >= len(buf):
                return None
            byte = buf[pos]
            length += (byte & 0x7F) * mult
            pos += 1
            if not byte & 0x80:
                break
            mult *= 128
            if pos > 4:
                raise MalformedError("server sent a remaining length longer than 4 bytes")
        if len(buf) < pos + length:
            return None
        first = buf[0]
        body = bytes(buf[pos:pos + length])
        del buf[:pos + length]
        return first >> 4, first & 0x0F, body

    def recv_packet(self, timeout: float = 5.0) -> Packet | None:
        """The next packet as (type, flags, body); None on timeout.

        Raises ConnectionClosed if the server closes the connection first."""
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._parse_one()
            if pkt is not None:
                return pkt
            if not self._fill(deadline):
                return None

    def expect(self, packet_type: int, timeout: float = 5.0, skip_publish: bool = False) -> Packet:
        """The next packet, which must be of ``packet_type``.

        With ``skip_publish``, PUBLISH packets arriving first are kept for later reads
        (for waiting on a SUBACK while retained messages may race it)."""
        deadline = time.monotonic() + timeout
        stash: list[Packet] = []
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    pkt = self.recv_packet(max(left, 0.0))
                except ConnectionClosed as e:
                    raise ConnectionClosed(
                        f"server closed the connection while {PACKET_NAMES[packet_type]} was "
                        f"expected ({e})") from None
                if pkt is None:
                    raise Timeout(f"expected {PACKET_NAMES[packet_type]}, got nothing in {timeout}s")
                if pkt[0] == packet_type:
                    return pkt
                if skip_publish and pkt[0] == PUBLISH:
                    stash.append(pkt)
                    continue
                raise AssertionError(f"expected {PACKET_NAMES[packet_type]}, got {describe(pkt)}")
        finally:
            self._pending.extendleft(reversed(stash))

    def expect_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within ``timeout``.

        Packets received before the close are kept in ``self.before_close``."""
        self.before_close: list[Packet] = list(self._pending)
        self._pending.clear()
        deadline = time.monotonic() + timeout
        try:
            while True:
                pkt = self._parse_one()
                if pkt is not None:
                    self.before_close.append(pkt)
                    continue
                if not self._fill(deadline):
                    return False
        except ConnectionClosed:
            self.closed = True
            return True

    def no_packet(self, timeout: float = 0.3) -> Packet | None:
        """None if nothing arrives within ``timeout``; otherwise the packet that did."""
        try:
            return self.recv_packet(timeout)
        except ConnectionClosed:
            return (-1, 0, b"connection closed")

    # -- MQTT conveniences --------------------------------------------------

    def next_pid(self) -> int:
        self._next_pid = self._next_pid % 65535 + 1
        return self._next_pid

    def connect_mqtt(self, client_id: str, version: int = 4, timeout: float = 5.0,
                     **kw: Any) -> ConnAck:
        """Send CONNECT and return the parsed CONNACK (whatever its code)."""
        self.version = version
        self.send(connect(client_id, version=version, **kw))
        _, _, body = self.expect(CONNACK, timeout)
        return parse_connack(body, version)

    def connack_rc(self, client_id: str, version: int = 4, timeout: float = 3.0) -> int:
        """A probe: CONNECT with a clean session, the CONNACK's code; an accepted client
        disconnects, and the connection is closed either way."""
        try:
            ack = self.connect_mqtt(client_id, version=version, clean=True, timeout=timeout)
            if ack.rc == 0:
                self.disconnect()
            return ack.rc
        finally:
            self.close()

    def subscribe(self, topics: list[tuple[str, int]] | str, qos: int = 0,
                  props: bytes = b"", timeout: float = 5.0) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK (PUBLISHes arriving first are kept).
        Returns the SUBACK codes."""
        if isinstance(topics, str):
            topics = [(topics, qos)]
        pid = self.next_pid()
        self.send(subscribe(pid, topics, version=self.version, props=props))
        _, _, body = self.expect(SUBACK, timeout, skip_publish=True)
        ack = parse_suback(body, self.version)
        assert ack.pid == pid, f"SUBACK pid {ack.pid} != {pid}"
        assert len(ack.codes) == len(topics), f"SUBACK has {ack.codes} for {len(topics)} filters"
        return ack.codes

    def unsubscribe(self, filters: list[str], timeout: float = 5.0) -> list[int]:
        pid = self.next_pid()
        self.send(unsubscribe(pid, filters, version=self.version))
        _, _, body = self.expect(UNSUBACK, timeout, skip_publish=True)
        ack = parse_unsuback(body, self.version)
        assert ack.pid == pid
        return ack.codes

    def publish(self, topic: str | bytes, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, props: bytes = b"", pid: int | None = None,
                timeout: float = 5.0) -> Ack | None:
        """PUBLISH and complete the QoS flow as the sender. Returns the final ack
        (PUBACK for 1, PUBCOMP for 2) or None for QoS 0. PUBLISHes arriving meanwhile
        are kept."""
        if qos > 0 and pid is None:
            pid = self.next_pid()
        self.send(publish(topic, payload, qos=qos, retain=retain, pid=pid,
                          version=self.version, props=props))
        if qos == 0:
            return None
        if qos == 1:
            _, _, body = self.expect(PUBACK, timeout, skip_publish=True)
            ack = parse_ack(body, self.version)
            assert ack.pid == pid, f"PUBACK pid {ack.pid} != {pid}"
            return ack
        _, _, body = self.expect(PUBREC, timeout, skip_publish=True)
        rec = parse_ack(body, self.version)
        assert rec.pid == pid, f"PUBREC pid {rec.pid} != {pid}"
        if rec.reason >= 0x80:
            return rec
        self.send(pubrel(pid, self.version))
        _, _, body = self.expect(PUBCOMP, timeout, skip_publish=True)
        comp = parse_ack(body, self.version)
        assert comp.pid == pid, f"PUBCOMP pid {comp.pid} != {pid}"
        return comp

    def recv_publish(self, timeout: float = 5.0, ack: bool = True) -> Publish:
        """The next packet, which must be a PUBLISH; with ``ack`` the QoS flow is
        completed as the receiver (PUBACK, or PUBREC / PUBREL / PUBCOMP)."""
        try:
            pkt = self.recv_packet(timeout)
        except ConnectionClosed as e:
            raise ConnectionClosed(f"server closed the connection while PUBLISH was expected ({e})") from None
        if pkt is None:
            raise Timeout(f"expected PUBLISH, got nothing in {timeout:.1f}s")
        if pkt[0] != PUBLISH:
            raise AssertionError(f"expected PUBLISH, got {describe(pkt)}")
        msg = parse_publish(pkt[1], pkt[2], self.version)
        if ack and msg.qos == 1:
            assert msg.pid is not None
            self.send(puback(msg.pid, self.version))
        elif ack and msg.qos == 2:
            assert msg.pid is not None
            self.send(pubrec(msg.pid, self.version))
            _, _, body = self.expect(PUBREL, timeout, skip_publish=True)
            rel = parse_ack(body, self.version)
            assert rel.pid == msg.pid, f"PUBREL pid {rel.pid} != {msg.pid}"
            self.send(pubcomp(msg.pid, self.version))
        return msg

    def recv_publishes(self, n: int, timeout: float = 5.0, ack: bool = True) -> list[Publish]:
        deadline = time.monotonic() + timeout
        return [self.recv_publish(max(deadline - time.monotonic(), 0.01), ack) for _ in range(n)]

    def drain_publishes(self, quiet: float = 0.3, ack: bool = True,
                        first_timeout: float | None = None) -> list[Publish]:
        """All PUBLISHes until nothing arrives for ``quiet`` seconds (the first may take
        up to ``first_timeout`` when something is expected)."""
        out: list[Publish] = []
        while True:
            pkt = self.recv_packet(first_timeout if (first_timeout and not out) else quiet)
            if pkt is None:
                return out
            if pkt[0] != PUBLISH:
                raise AssertionError(f"expected PUBLISH or silence, got {describe(pkt)}")
            self._pending.appendleft(pkt)
            out.append(self.recv_publish(quiet + 5, ack))

    def ping(self, timeout: float = 5.0) -> None:
        """PINGREQ / PINGRESP round trip (a barrier: everything sent before was read)."""
        self.send(pingreq())
        self.expect(PINGRESP, timeout, skip_publish=True)

    def disconnect(self, reason: int | None = None, props: bytes = b"", wait: float = 3.0) -> None:
        """Send DISCONNECT and, with ``wait``, wait until the server closes its side (so the
        broker has processed it before the test goes on), then close."""
        if self.try_send(disconnect(self.version, reason, props)) and wait:
            self.expect_closed(wait)
        self.close()
