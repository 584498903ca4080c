"""MQTT wire codec: packets (``packets.py``) to bytes and back, plus stream framing.

One codec serves MQTT 3.1 (protocol level 3, name "MQIsdp"), 3.1.1 (level 4,
"MQTT") and 5.0 (level 5, "MQTT"); the version is a parameter of every call
except CONNECT, whose bytes name their own version.

Public API
    ``encode(packet, version)``         whole packet bytes, fixed header included
    ``decode(first_byte, body, version)`` one packet from its first byte and body
    ``connect_version(body)``           peek the protocol level of a CONNECT body
    ``PacketReader``                    incremental framing: feed bytes, get packets
    ``encode_publish(...)``             the PUBLISH hot path without a ``Publish``
    ``encode_ack(ptype, packet_id)``    PUBACK/PUBREC/PUBREL/PUBCOMP, Success, no properties
    ``encode_properties(props, ptype)`` a 5.0 property block (length included)
    ``decode_properties(data, ptype)``  its inverse
    ``encode_remaining_length(n)``      a Variable Byte Integer
    ``disallowed_code_point(s)``        a control character or non-character in ``s`` (1.5.4)

Invariants
    * ``decode`` and ``PacketReader.feed``/``feed_raw`` raise ``ProtocolError`` and
      nothing else, whatever the input bytes. ``reason`` is the 5.0 reason code
      to report: 0x81 malformed, 0x82 protocol error, 0x84 unsupported protocol
      version, 0x85 client identifier not valid (``strict_utf8`` only), 0x95 packet
      too large.
    * With ``strict_utf8`` (``decode``, ``PacketReader``) every UTF-8 string a packet
      carries (client identifier, will topic, user name, topic name, topic filters, 5.0
      string properties and user properties) is refused if it holds a code point 1.5.4
      says SHOULD NOT be sent: U+0001..U+001F, U+007F..U+009F, the non-characters. The
      client identifier gets 0x85 ([MQTT-3.1.3-8]), any other string 0x81 (1.5.4 "MAY
      treat it as a Malformed Packet"; 3.1.1 1.5.3 "MAY close the Network Connection").
      Without it only U+0000 is refused ([MQTT-1.5.4-2]). Topic names found clean are
      remembered (a bounded set, the module's only state), so a PUBLISH usually pays a
      set lookup for it, not a scan.
    * ``decode(b[0], body, v) == p`` for ``b = encode(p, v)`` whenever ``p`` only
      uses what version ``v`` can carry (before 5.0: no properties, no reason
      codes except the CONNACK return code, no 5.0 subscription options).
    * Packets without 5.0 properties share the ``NO_PROPERTIES`` instance.
    * Each validity check cites the statement of the specification it enforces:
      ``[MQTT-x.y.z-n]`` numbers are those of 5.0 unless marked "3.1.1".
    * ``PacketReader.feed`` switches to the protocol level of a CONNECT it
      decodes, so packets pipelined behind a 5.0 CONNECT are read as 5.0.

Deliberate leniencies
    * 3.1 (level 3) only: PUBREL/SUBSCRIBE/UNSUBSCRIBE may carry the DUP bit
      (3.1 defines it for them), and a CONNECT whose user name / password flags
      are set but whose payload ends before those fields reads them as absent.
    * A non-minimal Remaining Length ([MQTT-1.5.5-1]) is refused in 5.0 only;
      3.1.1 has no such rule.

Not done here
    * Topic name / topic filter semantics (wildcards, ``$share``, empty topics,
      topic aliases), client identifier rules, session or flow-control state,
      and checks that depend on what the peer negotiated (maximum QoS, receive
      maximum...). Those belong to the broker; this module only checks that the
      bytes are a well-formed packet of the given version.
    * ``encode`` trusts its input: it raises ``ValueError`` (or ``TypeError`` for
      a non-packet) only for values the wire format cannot carry (an over-long
      string, a packet identifier out of range, a QoS of 3, a 5.0 property not
      allowed in that packet type, AUTH before 5.0). It does not look for U+0000
      in strings.
    * No I/O: ``PacketReader`` only buffers bytes handed to it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from types import MemberDescriptorType
from typing import Any, Final

from . import reasons
from .errors import ProtocolError, malformed, protocol_error
from .packets import (
    MQTT_3_1,
    MQTT_5,
    NO_PROPERTIES,
    PROPERTY_TABLE,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PropertyKind,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

__all__ = [
    "MAX_REMAINING_LENGTH",
    "WILL_PROPERTIES",
    "PacketReader",
    "connect_version",
    "decode",
    "decode_properties",
    "encode",
    "encode_ack",
    "encode_properties",
    "encode_publish",
    "encode_remaining_length",
]

#: Largest value a 4-byte Variable Byte Integer can carry (1.5.5).
MAX_REMAINING_LENGTH: Final = 268_435_455
#: ``packet_type`` for ``encode_properties`` meaning the Will Properties of a CONNECT.
WILL_PROPERTIES: Final = 0

_PACK_B = struct.Struct("!B").pack
_PACK_H = struct.Struct("!H").pack
_PACK_BB = struct.Struct("!BB").pack
_PACK_BH = struct.Struct("!BH").pack
_PACK_BI = struct.Struct("!BI").pack
_PACK_BBH = struct.Struct("!BBH").pack
_PACK_BBHB = struct.Struct("!BBHB").pack
_UNPACK_I = struct.Struct("!I").unpack_from

# Single-byte values, shared (bytes((n,)) allocates).
_BYTE: Final = tuple(bytes((i,)) for i in range(256))

_PUBLISH: Final = int(PacketType.PUBLISH)
_CONNECT: Final = int(PacketType.CONNECT)
_SUBSCRIBE: Final = int(PacketType.SUBSCRIBE)


# ---------------------------------------------------------------------------
# Variable Byte Integer (1.5.5)
# ---------------------------------------------------------------------------


def encode_remaining_length(n: int) -> bytes:
    """Encode ``n`` (0..268435455) as an MQTT Variable Byte Integer."""
    if 0 <= n < 0x80:
        return _BYTE[n]
    if n < 0 or n > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _read_vbi(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a Variable Byte Integer at ``pos``; it must end before ``end``."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            raise malformed("truncated variable byte integer")
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if i and not b:
                # [MQTT-1.5.5-1] The encoded value MUST use the minimum number of bytes.
                raise malformed("variable byte integer not minimally encoded")
            return value, pos + i + 1
        shift += 7
    # 1.5.5: at most four bytes; a fifth continuation makes the packet malformed.
    raise malformed("variable byte integer longer than 4 bytes")


def _header(first: int, n: int) -> bytes:
    if n < 0x80:
        return _PACK_BB(first, n)
    return _BYTE[first] + encode_remaining_length(n)


# ---------------------------------------------------------------------------
# Primitive fields
# ---------------------------------------------------------------------------


# 1.5.4 (3.1.1: 1.5.3) "The data SHOULD NOT include encodings of the Unicode code points
# listed below": U+0001..U+001F and U+007F..U+009F (control characters) and the
# non-characters (U+FDD0..U+FDEF, and U+nFFFE, U+nFFFF in each of the 17 planes). 5.0: "If a
# receiver ... receives an MQTT Control Packet containing any of them it MAY treat it as a
# Malformed Packet"; 3.1.1: "it MAY close the Network Connection". U+0000 is refused always.
# Two patterns: a character class with astral code points is several times slower to search.
_DISALLOWED_BMP: Final = re.compile("[\x01-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff]").search
_NONCHARACTERS_ASTRAL: Final = re.compile(
    "[" + "".join(chr((plane << 16) | low) for plane in range(1, 17) for low in (0xFFFE, 0xFFFF)) + "]"
).search
#: Topic names already found free of them: a bounded memo, so that the PUBLISH path pays a set
#: lookup, not a scan, for the topics a broker sees again and again.
_CLEAN_TOPICS: Final[set[str]] = set()
_CLEAN_TOPICS_KEPT: Final = 10000


def disallowed_code_point(s: str) -> int | None:
    """A code point of ``s`` that 1.5.4 says SHOULD NOT be sent (a control character or a
    non-character), or None. A string of printable characters has none (non-characters are
    unassigned, so never printable): that test is the cheap one."""
    if s.isprintable():
        return None
    m = _DISALLOWED_BMP(s)
    if m is None and max(s) > "\uffff":
        m = _NONCHARACTERS_ASTRAL(s)
    return None if m is None else ord(m.group())


def _disallowed(what: str, code_point: int) -> ProtocolError:
    # 1.5.4 "MAY treat it as a Malformed Packet" (3.1.1 1.5.3: "MAY close the Network
    # Connection"); the message names the code point, never the character itself.
    return malformed(f"{what} contains U+{code_point:04X}, a control character or non-character")


def _check_topic(topic: str) -> None:
    """``strict_utf8`` for a PUBLISH topic name, through the memo of clean ones."""
    bad = disallowed_code_point(topic)
    if bad is not None:
        raise _disallowed("topic", bad)
    if len(_CLEAN_TOPICS) >= _CLEAN_TOPICS_KEPT:
        _CLEAN_TOPICS.clear()
    _CLEAN_TOPICS.add(topic)


def _read_str(buf: bytes, pos: int, end: int, strict: bool = False,
              what: str = "string") -> tuple[str, int]:
    """A UTF-8 Encoded String (1.5.4): 2-byte length then well-formed UTF-8.

    ``strict`` also refuses the code points that 1.5.4 says SHOULD NOT be sent (0x81).
    """
    start = pos + 2
    if start > end:
        raise malformed("truncated string length")
    stop = start + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise malformed("string longer than its packet")
    try:
        # Python's strict UTF-8 decoder rejects overlong forms and encoded
        # surrogates: [MQTT-1.5.4-1] (3.1.1: [MQTT-1.5.3-1]).
        s = buf[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("string is not well-formed UTF-8") from None
    if "\x00" in s:
        # [MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-2]) MUST NOT include U+0000.
        raise malformed(f"{what} contains U+0000")
    if strict and (bad := disallowed_code_point(s)) is not None:
        raise _disallowed(what, bad)
    return s, stop


def _read_bin(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """Binary Data (1.5.6): 2-byte length then that many bytes."""
    start = pos + 2
    if start > end:
        raise malformed("truncated binary data length")
    stop = start + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise malformed("binary data longer than its packet")
    return buf[start:stop], stop


def _read_u16(buf: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise malformed("truncated two byte integer")
    return (buf[pos] << 8) | buf[pos + 1]


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _PACK_H(len(b)) + b


def _enc_bin(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _PACK_H(len(b)) + bytes(b)


def _check_pid(pid: int, version: int) -> int:
    if not pid:
        # [MQTT-2.2.1-3] (3.1.1: [MQTT-2.3.1-1]) packet identifiers are non-zero.
        if version >= MQTT_5:
            raise protocol_error("packet identifier 0")
        raise malformed("packet identifier 0")
    return pid


def _enc_pid(pid: int | None) -> bytes:
    if pid is None or not 0 < pid <= 0xFFFF:
        raise ValueError(f"packet identifier must be 1..65535, got {pid!r}")
    return _PACK_H(pid)


# ---------------------------------------------------------------------------
# Properties (5.0 section 2.2.2)
# ---------------------------------------------------------------------------

_K_BYTE, _K_U16, _K_U32, _K_VBI, _K_STR, _K_BIN, _K_PAIR = (int(k) for k in PropertyKind)

# identifier -> (Properties field, kind), from the one table in ``packets.py``.
_PROPS: Final[dict[int, tuple[str, int]]] = {ident: (name, int(kind)) for ident, name, kind in PROPERTY_TABLE}
_PROP_ORDER: Final = tuple((ident, name, kind) for ident, (name, kind) in sorted(_PROPS.items()))

# Which properties each packet type may carry (table 2-4). Key 0 = Will Properties.
_ALLOWED: Final[dict[int, frozenset[int]]] = {
    WILL_PROPERTIES: frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26}),
    PacketType.CONNECT: frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27}),
    PacketType.CONNACK: frozenset({
        0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27,
        0x28, 0x29, 0x2A,
    }),
    PacketType.PUBLISH: frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26}),
    PacketType.PUBACK: frozenset({0x1F, 0x26}),
    PacketType.PUBREC: frozenset({0x1F, 0x26}),
    PacketType.PUBREL: frozenset({0x1F, 0x26}),
    PacketType.PUBCOMP: frozenset({0x1F, 0x26}),
    PacketType.SUBSCRIBE: frozenset({0x0B, 0x26}),
    PacketType.SUBACK: frozenset({0x1F, 0x26}),
    PacketType.UNSUBSCRIBE: frozenset({0x26}),
    PacketType.UNSUBACK: frozenset({0x1F, 0x26}),
    PacketType.DISCONNECT: frozenset({0x11, 0x1C, 0x1F, 0x26}),
    PacketType.AUTH: frozenset({0x15, 0x16, 0x1F, 0x26}),
}

# "It is a Protocol Error to ... have a value other than 0 or 1": 3.1.2.11.6 (0x19),
# 3.1.2.11.7 (0x17), 3.2.2.3.4 (0x24), 3.2.2.3.5 (0x25), 3.2.2.3.11-13 (0x28-0x2A);
# and 3.3.2.3.2 defines only 0 and 1 for the Payload Format Indicator (0x01).
_ZERO_OR_ONE: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
# "It is a Protocol Error ... for it to have the value 0": Receive Maximum
# (3.1.2.11.3, 3.2.2.3.3), Maximum Packet Size (3.1.2.11.4, 3.2.2.3.6) and the
# Subscription Identifier (3.3.2.3.8, 3.8.2.1.2).
_NON_ZERO: Final = frozenset({0x0B, 0x21, 0x27})


def _later(late: list[ProtocolError] | None, error: ProtocolError) -> None:
    """A Protocol Error found while a packet is read: raised at once when ``late`` is None, else
    kept in ``late`` for the decoder to raise once the whole packet has parsed. 1.2: a Protocol
    Error is "detected after the packet has been parsed"; a packet that also does not parse
    further on is a Malformed Packet (0x81), not a Protocol Error."""
    if late is None:
        raise error
    if not late:
        late.append(error)


def _decode_properties(buf: bytes, pos: int, end: int, ptype: int, strict: bool,
                       late: list[ProtocolError] | None = None) -> tuple[Properties, int]:
    """Read a property block (length + properties) at ``pos``; 2.2.2. The Protocol Errors it
    finds (a property repeated, a value the property's section forbids) go to ``late`` when
    given (see ``_later``); the malformations are raised."""
    if pos >= end:
        # [MQTT-2.2.2-1] no properties is a Property Length of zero, not nothing.
        raise malformed("missing property length")
    plen = buf[pos]
    if plen < 0x80:
        pos += 1
    else:
        plen, pos = _read_vbi(buf, pos, end)
    if not plen:
        return NO_PROPERTIES, pos
    pend = pos + plen
    if pend > end:
        raise malformed("property length exceeds packet")
    allowed = _ALLOWED[ptype]
    kw: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    while pos < pend:
        ident = buf[pos]
        pos += 1
        spec = _PROPS.get(ident)  # identifiers are VBIs; all defined ones are < 0x80
        if spec is None:
            # 2.2.2.2: an identifier not in table 2-4 cannot be parsed.
            raise malformed(f"unknown property identifier 0x{ident:02X}")
        if ident not in allowed:
            # 2.2.2.2 "... packet which contains a property not allowed for it
            # is a Malformed Packet" (property table per packet type).
            raise malformed(f"property 0x{ident:02X} not allowed in this packet")
        name, kind = spec
        value: Any
        if kind == _K_BYTE:
            if pos >= pend:
                raise malformed("truncated property")
            value = buf[pos]
            pos += 1
        elif kind == _K_U16:
            if pos + 2 > pend:
                raise malformed("truncated property")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif kind == _K_U32:
            if pos + 4 > pend:
                raise malformed("truncated property")
            value = _UNPACK_I(buf, pos)[0]
            pos += 4
        elif kind == _K_STR:
            value, pos = _read_str(buf, pos, pend, strict, name)
        elif kind == _K_BIN:
            value, pos = _read_bin(buf, pos, pend)
        elif kind == _K_PAIR:
            # 1.5.7 UTF-8 String Pair; [MQTT-1.5.7-1] both strings well-formed.
            key, pos = _read_str(buf, pos, pend, strict, "user property")
            val, pos = _read_str(buf, pos, pend, strict, "user property")
            users.append((key, val))  # 3.3.2.3.7: may repeat; order kept
            continue
        else:  # _K_VBI: the Subscription Identifier
            value, pos = _read_vbi(buf, pos, pend)
            if not value:
                _later(late, protocol_error("subscription identifier 0"))  # 3.3.2.3.8, 3.8.2.1.2
            if sub_ids and ptype != _PUBLISH:
                # 3.8.2.1.2 "It is a Protocol Error to include the Subscription
                # Identifier more than once" in SUBSCRIBE; PUBLISH may repeat it.
                _later(late, protocol_error("subscription identifier included more than once"))
            sub_ids.append(value)
            continue
        if name in kw:
            # 2.2.2.2 / each property section: "It is a Protocol Error to include
            # <property> more than once".
            _later(late, protocol_error(f"property 0x{ident:02X} included more than once"))
        elif ident in _ZERO_OR_ONE and value > 1:
            _later(late, protocol_error(f"property 0x{ident:02X} must be 0 or 1"))
        elif ident in _NON_ZERO and not value:
            _later(late, protocol_error(f"property 0x{ident:02X} must not be 0"))
        kw[name] = value
    if users:
        kw["user_properties"] = tuple(users)
    if sub_ids:
        kw["subscription_identifiers"] = tuple(sub_ids)
    return Properties(**kw), pos


_ACK_FIRST: Final[dict[int, int]] = {PacketType.PUBACK: 0x40, PacketType.PUBREC: 0x50, PacketType.PUBREL: 0x62,
                     PacketType.PUBCOMP: 0x70}


def encode_ack(packet_type: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP with reason Success and no properties: the same four
    bytes in every version (5.0 omits a Success reason code without properties, 3.3.4 /
    3.4.2.1 / 3.6.2.1 / 3.7.2.1). The hot path of ``encode`` for these packets."""
    return _PACK_BBH(_ACK_FIRST[packet_type], 2, packet_id) if 0 < packet_id <= 0xFFFF else _enc_pid(packet_id)


def decode_properties(data: bytes, packet_type: int) -> Properties:
    """Decode a whole 5.0 property block (Property Length included) as ``packet_type`` carries it."""
    props, end = _decode_properties(data, 0, len(data), packet_type, False)
    if end != len(data):
        raise malformed("bytes after the property block")
    return props


def encode_properties(props: Properties, packet_type: int) -> bytes:
    """Encode a 5.0 property block, Property Length included.

    ``packet_type`` is a ``PacketType`` or ``WILL_PROPERTIES``. A property not
    allowed in that packet type raises ``ValueError``.
    """
    if props is NO_PROPERTIES:
        return b"\x00"
    allowed = _ALLOWED[packet_type]
    parts: list[bytes] = []
    append = parts.append
    for ident, name, kind in _PROP_ORDER:
        value = getattr(props, name)
        if value is None or value == ():
            continue  # absent (None), or an empty tuple for the repeatable ones
        if ident not in allowed:
            raise ValueError(f"property {name} not allowed in packet type {packet_type}")
        if kind == _K_BYTE:
            append(_PACK_BB(ident, value))
        elif kind == _K_U16:
            append(_PACK_BH(ident, value))
        elif kind == _K_U32:
            append(_PACK_BI(ident, value))
        elif kind == _K_STR:
            append(_BYTE[ident] + _enc_str(value))
        elif kind == _K_BIN:
            append(_BYTE[ident] + _enc_bin(value))
        elif kind == _K_PAIR:
            for key, val in value:
                append(b"\x26" + _enc_str(key) + _enc_str(val))
        else:
            for sid in value:
                if not 0 < sid <= MAX_REMAINING_LENGTH:
                    raise ValueError(f"subscription identifier out of range: {sid}")
                append(b"\x0b" + encode_remaining_length(sid))
    body = b"".join(parts)
    return encode_remaining_length(len(body)) + body


# ---------------------------------------------------------------------------
# Reason codes (5.0): "The Client or Server sending the <X> packet MUST use one
# of the <X> Reason Codes". A code outside the packet's table parses fine but
# breaks that rule, so it is a Protocol Error.
# ---------------------------------------------------------------------------

_CONNACK_CODES: Final = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
    0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
})  # [MQTT-3.2.2-8]
_PUBACK_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES: Final = frozenset({0x00, 0x92})
_SUBACK_CODES: Final = frozenset({
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
})  # [MQTT-3.9.3-2]
_UNSUBACK_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})  # [MQTT-3.11.3-2]
_DISCONNECT_CODES: Final = frozenset({
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
    0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
})  # [MQTT-3.14.2-1]
_AUTH_CODES: Final = frozenset({0x00, 0x18, 0x19})  # [MQTT-3.15.2-1]
_V3_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})  # 3.1.1 [MQTT-3.9.3-2]


def _check_reason(code: int, allowed: frozenset[int], what: str) -> int:
    if code not in allowed:
        raise protocol_error(f"reason code 0x{code:02X} not allowed in {what}")
    return code


# ---------------------------------------------------------------------------
# Decoders: (first byte, buffer, body start, body end, version) -> Packet.
# They read only buf[pos:end]; the buffer may hold other packets around it.
# ---------------------------------------------------------------------------

_Decoder = Callable[[int, bytes, int, int, int, bool], Packet]


def _bad_flags(name: str) -> ProtocolError:
    # [MQTT-2.1.3-1] (3.1.1: [MQTT-2.2.2-1], [MQTT-2.2.2-2]) reserved fixed
    # header flags MUST have the listed value; anything else is malformed.
    return malformed(f"invalid fixed header flags for {name}")


def _protocol_of(buf: bytes, pos: int, end: int) -> tuple[str, int, int]:
    """Protocol name and level at the start of a CONNECT body: (name, level, next pos)."""
    if pos + 2 > end:
        raise malformed("CONNECT too short")
    nlen = (buf[pos] << 8) | buf[pos + 1]
    if pos + 3 + nlen > end:
        raise malformed("CONNECT too short")
    raw = buf[pos + 2 : pos + 2 + nlen]
    level = buf[pos + 2 + nlen]
    # [MQTT-3.1.2-1] name "MQTT" (3.1: "MQIsdp"); [MQTT-3.1.2-2] (3.1.1 also
    # [MQTT-3.1.2-2]) unsupported protocol level -> 0x84 / return code 0x01.
    if raw == b"MQTT":
        if level != 4 and level != 5:
            raise ProtocolError(reasons.UNSUPPORTED_PROTOCOL_VERSION,
                                f"unsupported protocol level {level}")
        return "MQTT", level, pos + 3 + nlen
    if raw == b"MQIsdp" and level == MQTT_3_1:
        return "MQIsdp", level, pos + 3 + nlen
    raise ProtocolError(reasons.UNSUPPORTED_PROTOCOL_VERSION,
                        f"unsupported protocol {raw[:16]!r} level {level}")


def connect_version(body: bytes | memoryview) -> int:
    """The protocol level (3, 4 or 5) named by a CONNECT body.

    Raises ``ProtocolError(0x84)`` for an unknown name/level pair and
    ``ProtocolError(0x81)`` if the body is too short to say.
    """
    buf = bytes(body)
    return _protocol_of(buf, 0, len(buf))[1]


def _dec_connect(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Connect:
    if first != 0x10:
        raise _bad_flags("CONNECT")
    name, level, pos = _protocol_of(buf, pos, end)
    if pos + 3 > end:
        raise malformed("CONNECT too short")
    flags = buf[pos]
    keepalive = (buf[pos + 1] << 8) | buf[pos + 2]
    pos += 3
    if flags & 0x01:
        raise malformed("reserved connect flag set")  # [MQTT-3.1.2-3]
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        # [MQTT-3.1.2-11], [MQTT-3.1.2-13] (3.1.1: [MQTT-3.1.2-11], -13, -15)
        raise malformed("will QoS/retain set without will flag")
    if will_qos == 3:
        raise malformed("will QoS 3")  # [MQTT-3.1.2-12] (3.1.1: [MQTT-3.1.2-14])
    user_flag = flags & 0x80
    pass_flag = flags & 0x40
    if pass_flag and not user_flag and level < MQTT_5:
        raise malformed("password flag without user name flag")  # 3.1.1 [MQTT-3.1.2-22]
    props = NO_PROPERTIES
    late: list[ProtocolError] = []  # Protocol Errors, raised once the whole packet has parsed
    if level >= MQTT_5:
        props, pos = _decode_properties(buf, pos, end, _CONNECT, strict, late)
    # [MQTT-3.1.3-3] the ClientID MUST be present; [MQTT-3.1.3-4] UTF-8. Its
    # length and content are the broker's business ([MQTT-3.1.3-5], -6).
    client_id, pos = _read_str(buf, pos, end, False, "client identifier")
    will = None
    if will_flag:
        # [MQTT-3.1.2-9] Will Properties, Will Topic and Will Payload MUST be present.
        wprops = NO_PROPERTIES
        if level >= MQTT_5:
            wprops, pos = _decode_properties(buf, pos, end, WILL_PROPERTIES, strict, late)
        wtopic, pos = _read_str(buf, pos, end, strict, "will topic")  # [MQTT-3.1.3-11]
        wpayload, pos = _read_bin(buf, pos, end)
        will = Will(wtopic, wpayload, will_qos, will_retain, wprops)
    username = None
    # 3.1 only: some old clients set the flags but leave the field out; like
    # other brokers, treat a missing trailing field as absent there.
    lax = level == MQTT_3_1
    if user_flag and not (lax and pos == end):
        username, pos = _read_str(buf, pos, end, strict, "user name")  # [MQTT-3.1.2-17], [MQTT-3.1.3-12]
    password = None
    if pass_flag and not (lax and pos == end):
        password, pos = _read_bin(buf, pos, end)  # [MQTT-3.1.2-19]
    if pos != end:
        # [MQTT-3.1.2-16], [MQTT-3.1.2-18]: nothing follows but flagged fields;
        # [MQTT-3.1.4-1] the packet must match the format exactly.
        raise malformed("unexpected bytes after CONNECT payload")
    if late:
        raise late[0]
    if props.authentication_data is not None and props.authentication_method is None:
        # 3.1.2.11.10 "It is a Protocol Error to include Authentication Data if there is no
        # Authentication Method" (checked once the whole packet has parsed, 1.2).
        raise protocol_error("authentication data without authentication method")
    if strict and (bad := disallowed_code_point(client_id)) is not None:
        # 1.5.4: code points that SHOULD NOT be sent. [MQTT-3.1.3-5] the Server MUST allow
        # 0-9a-zA-Z and MAY allow more; this it rejects: [MQTT-3.1.3-8] "it MAY respond ...
        # with a CONNACK using Reason Code 0x85 (Client Identifier not valid)" (3.1.1
        # [MQTT-3.1.3-9]: return code 0x02, Identifier rejected). Checked last, so that a
        # packet malformed elsewhere is reported as malformed.
        raise ProtocolError(reasons.CLIENT_IDENTIFIER_NOT_VALID,
                            f"client identifier contains U+{bad:04X}, a control character or non-character")
    return Connect(client_id, level, bool(flags & 0x02), keepalive, username, password, will,
                   props, name)


def _dec_connack(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> ConnAck:
    if first != 0x20:
        raise _bad_flags("CONNACK")
    if version < MQTT_5:
        if end - pos != 2:
            raise malformed("CONNACK must have 2 bytes")
        ack = buf[pos]
        if version == MQTT_3_1:
            # 3.1: the first byte is reserved and unused (no session present).
            return ConnAck(False, buf[pos + 1])
        if ack & 0xFE:
            raise malformed("reserved connect acknowledge flags set")  # 3.1.1 §3.2.2.1
        return ConnAck(bool(ack), buf[pos + 1])
    if end - pos < 3:
        raise malformed("CONNACK too short")
    ack = buf[pos]
    if ack & 0xFE:
        raise malformed("reserved connect acknowledge flags set")  # [MQTT-3.2.2-1]
    code = _check_reason(buf[pos + 1], _CONNACK_CODES, "CONNACK")
    props, pos = _decode_properties(buf, pos + 2, end, PacketType.CONNACK, strict)
    if pos != end:
        raise malformed("unexpected bytes after CONNACK properties")
    return ConnAck(bool(ack), code, props)


# Fast construction of Publish: the dataclass __init__ of a frozen slotted class
# goes through object.__setattr__ per field; the slot descriptors are twice as
# fast. Only used while Publish has no __post_init__, and only when it is a plain
# slotted class: compiled (``shardbroker/_compiled.py``), it is a native class whose
# constructor sets its fields directly, and it has no slot descriptors.
_PUBLISH_FIELDS: Final = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")


def _slot_setters() -> tuple[Callable[[object, object], None], ...]:
    attrs = dict(vars(Publish))
    if hasattr(Publish, "__post_init__") or not all(
            isinstance(attrs.get(name), MemberDescriptorType) for name in _PUBLISH_FIELDS):
        return ()
    return tuple(attrs[name].__set__ for name in _PUBLISH_FIELDS)


def _never(obj: object, value: object) -> None:
    raise AssertionError("Publish has no slot descriptors")


_new = object.__new__
_SETTERS: Final = _slot_setters()
_FAST_PUBLISH: Final = bool(_SETTERS)
_set_topic, _set_payload, _set_qos, _set_retain, _set_dup, _set_pid, _set_props = (
    _SETTERS or (_never,) * len(_PUBLISH_FIELDS))


def _dec_publish(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Publish:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if not qos and first & 0x08:
        raise malformed("PUBLISH QoS 0 with DUP set")  # [MQTT-3.3.1-2]
    start = pos + 2
    if start > end:
        raise malformed("truncated topic length")
    stop = start + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise malformed("topic longer than its packet")
    try:
        topic = buf[start:stop].decode("utf-8")  # [MQTT-3.3.2-1], [MQTT-1.5.4-1]
    except UnicodeDecodeError:
        raise malformed("topic is not well-formed UTF-8") from None
    if "\x00" in topic:
        raise malformed("topic contains U+0000")  # [MQTT-1.5.4-2]
    if strict and topic not in _CLEAN_TOPICS:
        _check_topic(topic)  # 1.5.4 SHOULD NOT / MAY treat as malformed
    pos = stop
    pid: int | None = None
    if qos:
        if pos + 2 > end:
            raise malformed("truncated packet identifier")
        pid = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
    props = NO_PROPERTIES
    if version >= MQTT_5:
        if pos >= end:
            raise malformed("missing property length")  # [MQTT-2.2.2-1]
        if buf[pos]:
            late: list[ProtocolError] = []
            props, pos = _decode_properties(buf, pos, end, _PUBLISH, strict, late)
            if late:
                raise late[0]  # the payload always parses: the packet has parsed
        else:
            pos += 1
    if pid == 0:
        _check_pid(0, version)  # once the packet has parsed (the payload always does)
    if _FAST_PUBLISH:
        p: Publish = _new(Publish)
        _set_topic(p, topic)
        _set_payload(p, buf[pos:end])
        _set_qos(p, qos)
        _set_retain(p, first & 1 == 1)
        _set_dup(p, first & 8 == 8)
        _set_pid(p, pid)
        _set_props(p, props)
        return p
    return Publish(topic, buf[pos:end], qos, first & 1 == 1, first & 8 == 8, pid, props)


def _make_ack_decoder(
    cls: type[PubAck | PubRec | PubRel | PubComp],
    ptype: PacketType,
    expected_first: int,
    codes: frozenset[int],
) -> _Decoder:
    name = ptype.name
    # 3.1 defines DUP for PUBREL (flags 0010 or 1010); nothing else may vary.
    v3_alt = expected_first | 0x08 if expected_first & 0x02 else -1

    def dec(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Packet:
        # [MQTT-3.6.1-1] PUBREL flags 0010; others 0000 ([MQTT-2.1.3-1]).
        if first != expected_first and not (version == MQTT_3_1 and first == v3_alt):
            raise _bad_flags(name)
        n = end - pos
        if n < 2:
            raise malformed(f"{name} too short")
        pid = (buf[pos] << 8) | buf[pos + 1]
        if version < MQTT_5:
            if n != 2:
                raise malformed(f"{name} must have 2 bytes")
            return cls(_check_pid(pid, version))
        if n == 2:
            # 3.4.2.1 "The Reason Code and Property Length can be omitted if the
            # Reason Code is 0x00 and there are no Properties" (remaining length 2).
            return cls(_check_pid(pid, version))
        code = buf[pos + 2]
        props = NO_PROPERTIES
        if n > 3:
            # 3.4.2.2 "If the Remaining Length is less than 4 there is no
            # Property Length and the value of 0 is used".
            late: list[ProtocolError] = []
            props, pos = _decode_properties(buf, pos + 3, end, ptype, strict, late)
            if pos != end:
                raise malformed(f"unexpected bytes after {name} properties")
            if late:
                raise late[0]
        # The Protocol Errors, once the packet has parsed: [MQTT-3.4.2-1] etc.
        return cls(_check_pid(pid, version), _check_reason(code, codes, name), props)

    return dec


def _dec_subscribe(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Subscribe:
    if first != 0x82 and not (version == MQTT_3_1 and first == 0x8A):
        # [MQTT-3.8.1-1] flags MUST be 0010 (3.1 also allows DUP).
        raise _bad_flags("SUBSCRIBE")
    pid = _read_u16(buf, pos, end)
    pos += 2
    props = NO_PROPERTIES
    v5 = version >= MQTT_5
    found: list[ProtocolError] = []  # Protocol Errors, raised once the whole packet has parsed
    if v5:
        props, pos = _decode_properties(buf, pos, end, _SUBSCRIBE, strict, found)
    subs: list[Subscription] = []
    late: ProtocolError | None = found[0] if found else None
    while pos < end:
        topic_filter, pos = _read_str(buf, pos, end, strict, "topic filter")  # [MQTT-3.8.3-1]
        if not topic_filter:
            raise malformed("empty topic filter")  # [MQTT-4.7.3-1]
        if pos >= end:
            raise malformed("missing subscription options")
        opts = buf[pos]
        pos += 1
        qos = opts & 0x03
        if v5:
            if opts & 0xC0:
                raise malformed("reserved subscription option bits set")  # [MQTT-3.8.3-5]
            retain_handling = (opts >> 4) & 0x03
            if late is None and qos == 3:
                # 3.8.3.1 "It is a Protocol Error if the Maximum QoS field has the value 3".
                late = protocol_error("subscription maximum QoS 3")
            if late is None and retain_handling == 3:
                # 3.8.3.1 "It is a Protocol Error to send a Retain Handling value of 3".
                late = protocol_error("retain handling 3")
            subs.append(Subscription(topic_filter, qos, bool(opts & 0x04), bool(opts & 0x08),
                                     retain_handling))
        else:
            if qos == 3:
                # 3.1.1 [MQTT-3.8.3-4] "The Server MUST treat a SUBSCRIBE packet as malformed ...
                # if any of Reserved bits in the payload are non-zero, or QoS is not 0,1 or 2".
                raise malformed("subscription QoS 3")
            if opts & 0xFC:
                raise malformed("reserved subscription option bits set")  # 3.1.1 [MQTT-3.8.3-4]
            subs.append(Subscription(topic_filter, qos))
    _check_pid(pid, version)
    if late is not None:
        # A Protocol Error is found in a packet that parses (1.2): a malformed entry after it
        # is reported as such.
        raise late
    if not subs:
        # [MQTT-3.8.3-2] (3.1.1: [MQTT-3.8.3-3]) at least one subscription.
        raise protocol_error("SUBSCRIBE without subscriptions")
    return Subscribe(pid, tuple(subs), props)


def _dec_suback(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> SubAck:
    if first != 0x90:
        raise _bad_flags("SUBACK")
    pid = _check_pid(_read_u16(buf, pos, end), version)
    pos += 2
    props = NO_PROPERTIES
    if version >= MQTT_5:
        props, pos = _decode_properties(buf, pos, end, PacketType.SUBACK, strict)
        allowed = _SUBACK_CODES
    else:
        allowed = _V3_SUBACK_CODES
    codes = tuple(buf[pos:end])
    for code in codes:
        _check_reason(code, allowed, "SUBACK")  # [MQTT-3.9.3-2] (both versions)
    return SubAck(pid, codes, props)


def _dec_unsubscribe(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Unsubscribe:
    if first != 0xA2 and not (version == MQTT_3_1 and first == 0xAA):
        # [MQTT-3.10.1-1] flags MUST be 0010 (3.1 also allows DUP).
        raise _bad_flags("UNSUBSCRIBE")
    pid = _read_u16(buf, pos, end)
    pos += 2
    props = NO_PROPERTIES
    late: list[ProtocolError] = []  # Protocol Errors, raised once the whole packet has parsed
    if version >= MQTT_5:
        props, pos = _decode_properties(buf, pos, end, PacketType.UNSUBSCRIBE, strict, late)
    filters: list[str] = []
    while pos < end:
        topic_filter, pos = _read_str(buf, pos, end, strict, "topic filter")  # [MQTT-3.10.3-1]
        if not topic_filter:
            raise malformed("empty topic filter")  # [MQTT-4.7.3-1]
        filters.append(topic_filter)
    _check_pid(pid, version)  # once the packet has parsed
    if late:
        raise late[0]
    if not filters:
        raise protocol_error("UNSUBSCRIBE without topic filters")  # [MQTT-3.10.3-2]
    return Unsubscribe(pid, tuple(filters), props)


def _dec_unsuback(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> UnsubAck:
    if first != 0xB0:
        raise _bad_flags("UNSUBACK")
    pid = _check_pid(_read_u16(buf, pos, end), version)
    if version < MQTT_5:
        if end - pos != 2:
            raise malformed("UNSUBACK must have 2 bytes")  # 3.1.1 §3.11: no payload
        return UnsubAck(pid)
    props, pos = _decode_properties(buf, pos + 2, end, PacketType.UNSUBACK, strict)
    codes = tuple(buf[pos:end])
    for code in codes:
        _check_reason(code, _UNSUBACK_CODES, "UNSUBACK")  # [MQTT-3.11.3-2]
    return UnsubAck(pid, codes, props)


_PINGREQ = PingReq()
_PINGRESP = PingResp()


def _dec_pingreq(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> PingReq:
    if first != 0xC0:
        raise _bad_flags("PINGREQ")
    if end != pos:
        raise malformed("PINGREQ with a body")  # 3.12.2 / 3.12.3: none
    return _PINGREQ


def _dec_pingresp(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> PingResp:
    if first != 0xD0:
        raise _bad_flags("PINGRESP")
    if end != pos:
        raise malformed("PINGRESP with a body")  # 3.13.2 / 3.13.3: none
    return _PINGRESP


_DISCONNECT = Disconnect()
_AUTH = Auth()


def _dec_disconnect(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Disconnect:
    if first != 0xE0:
        raise _bad_flags("DISCONNECT")  # [MQTT-3.14.1-1]
    if version < MQTT_5:
        if end != pos:
            raise malformed("DISCONNECT with a body")  # 3.1.1 §3.14.2 / 3.14.3: none
        return _DISCONNECT
    if end == pos:
        return _DISCONNECT  # 3.14.2.1 "If the Remaining Length is less than 1 ... 0x00"
    code = buf[pos]
    if end - pos == 1:  # 3.14.2.2 "less than 2, a value of 0 is used"
        return Disconnect(_check_reason(code, _DISCONNECT_CODES, "DISCONNECT"))  # [MQTT-3.14.2-1]
    late: list[ProtocolError] = []
    props, pos = _decode_properties(buf, pos + 1, end, PacketType.DISCONNECT, strict, late)
    if pos != end:
        raise malformed("unexpected bytes after DISCONNECT properties")
    if late:
        raise late[0]
    return Disconnect(_check_reason(code, _DISCONNECT_CODES, "DISCONNECT"), props)


def _dec_auth(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Auth:
    if version < MQTT_5:
        # 3.1.1 §2.2.1 table 2.1: packet type 15 is "Reserved / Forbidden".
        raise malformed("packet type 15 is reserved before MQTT 5")
    if first != 0xF0:
        raise _bad_flags("AUTH")  # [MQTT-3.15.1-1]
    if end == pos:
        # 3.15.2.1 "can be omitted if the Reason Code is 0x00 and there are no Properties".
        return _AUTH
    code = buf[pos]
    if end - pos == 1:
        return Auth(_check_reason(code, _AUTH_CODES, "AUTH"))  # [MQTT-3.15.2-1]
    late: list[ProtocolError] = []
    props, pos = _decode_properties(buf, pos + 1, end, PacketType.AUTH, strict, late)
    if pos != end:
        raise malformed("unexpected bytes after AUTH properties")
    if late:
        raise late[0]
    return Auth(_check_reason(code, _AUTH_CODES, "AUTH"), props)


def _dec_reserved(first: int, buf: bytes, pos: int, end: int, version: int, strict: bool) -> Packet:
    # 2.1.2 table 2-1 (3.1.1 §2.2.1): packet type 0 is "Reserved / Forbidden".
    raise malformed("packet type 0 is reserved")


_DECODERS: Final[tuple[_Decoder, ...]] = (
    _dec_reserved,
    _dec_connect,
    _dec_connack,
    _dec_publish,
    _make_ack_decoder(PubAck, PacketType.PUBACK, 0x40, _PUBACK_CODES),
    _make_ack_decoder(PubRec, PacketType.PUBREC, 0x50, _PUBACK_CODES),
    _make_ack_decoder(PubRel, PacketType.PUBREL, 0x62, _PUBREL_CODES),
    _make_ack_decoder(PubComp, PacketType.PUBCOMP, 0x70, _PUBREL_CODES),
    _dec_subscribe,
    _dec_suback,
    _dec_unsubscribe,
    _dec_unsuback,
    _dec_pingreq,
    _dec_pingresp,
    _dec_disconnect,
    _dec_auth,
)


def decode(first_byte: int, body: bytes | memoryview, version: int, strict_utf8: bool = False) -> Packet:
    """Decode one packet from its fixed-header first byte and its body.

    ``version`` (3, 4 or 5) is that of the connection; a CONNECT carries its own.
    ``strict_utf8`` refuses control characters and non-characters in strings (1.5.4,
    see ``disallowed_code_point``): 0x85 in a CONNECT's client identifier, 0x81 elsewhere.
    Raises ``ProtocolError`` (only) for any malformed or illegal input.
    """
    if not 0 <= first_byte <= 0xFF:
        raise malformed("first byte out of range")
    buf = body if type(body) is bytes else bytes(body)
    return _DECODERS[first_byte >> 4](first_byte, buf, 0, len(buf), version, strict_utf8)


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------


def encode_publish(
    topic_bytes: bytes,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    properties_bytes: bytes = b"",
) -> bytes:
    """A whole PUBLISH packet from ready-made parts (the forwarding hot path).

    ``topic_bytes`` is the UTF-8 topic name. ``properties_bytes`` is the 5.0
    property block *including* its Property Length (``b"\\x00"`` for none, see
    ``encode_properties``) and must be ``b""`` for 3.1/3.1.1. ``packet_id`` is
    required for QoS 1/2 and ignored for QoS 0.
    """
    tlen = len(topic_bytes)
    if tlen > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"invalid QoS {qos}")
        first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
        if packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"packet identifier must be 1..65535, got {packet_id!r}")
        rl = 4 + tlen + len(properties_bytes) + len(payload)
        if rl < 0x80:
            return b"".join((_PACK_BBH(first, rl, tlen), topic_bytes, _PACK_H(packet_id),
                             properties_bytes, payload))
        return b"".join((_header(first, rl), _PACK_H(tlen), topic_bytes, _PACK_H(packet_id),
                         properties_bytes, payload))
    # [MQTT-3.3.1-2] DUP is 0 for QoS 0; [MQTT-2.2.1-2] and no packet identifier.
    first = 0x31 if retain else 0x30
    rl = 2 + tlen + len(properties_bytes) + len(payload)
    if rl < 0x80:
        return b"".join((_PACK_BBH(first, rl, tlen), topic_bytes, properties_bytes, payload))
    return b"".join((_header(first, rl), _PACK_H(tlen), topic_bytes, properties_bytes, payload))


def _enc_publish(p: Publish, version: int) -> bytes:
    if version >= MQTT_5:
        props = p.properties
        pb = b"\x00" if props is NO_PROPERTIES else encode_properties(props, _PUBLISH)
    else:
        pb = b""
    return encode_publish(p.topic.encode("utf-8"), p.payload, p.qos, p.retain, p.dup,
                          p.packet_id, pb)


def _packet(first: int, body: bytes) -> bytes:
    return _header(first, len(body)) + body


def _enc_connect(p: Connect, version: int) -> bytes:
    # The CONNECT's own protocol_version/protocol_name decide the format.
    v5 = p.protocol_version >= MQTT_5
    flags = 0x02 if p.clean_start else 0
    parts = [_enc_str(p.protocol_name), b"", b"", _PACK_H(p.keepalive)]
    if v5:
        parts.append(encode_properties(p.properties, _CONNECT))
    parts.append(_enc_str(p.client_id))
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"invalid will QoS {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if v5:
            parts.append(encode_properties(will.properties, WILL_PROPERTIES))
        parts.append(_enc_str(will.topic))
        parts.append(_enc_bin(will.payload))
    if p.username is not None:
        flags |= 0x80
        parts.append(_enc_str(p.username))
    if p.password is not None:
        flags |= 0x40
        parts.append(_enc_bin(p.password))
    parts[1] = _PACK_B(p.protocol_version)
    parts[2] = _BYTE[flags]
    return _packet(0x10, b"".join(parts))


def _enc_connack(p: ConnAck, version: int) -> bytes:
    if version < MQTT_5:
        # 3.1 has no session present flag (the byte is reserved).
        ack = 1 if p.session_present and version != MQTT_3_1 else 0
        return _PACK_BBH(0x20, 2, (ack << 8) | p.reason_code)
    body = _PACK_BB(1 if p.session_present else 0, p.reason_code) + encode_properties(
        p.properties, PacketType.CONNACK)
    return _packet(0x20, body)


def _make_ack_encoder(first: int, ptype: PacketType) -> Callable[[Any, int], bytes]:
    def enc(p: PubAck | PubRec | PubRel | PubComp, version: int) -> bytes:
        pid = p.packet_id
        if not 0 < pid <= 0xFFFF:
            raise ValueError(f"packet identifier must be 1..65535, got {pid!r}")
        if version < MQTT_5 or (not p.reason_code and p.properties is NO_PROPERTIES):
            return _PACK_BBH(first, 2, pid)
        if p.properties is NO_PROPERTIES:
            return _PACK_BBHB(first, 3, pid, p.reason_code)
        pb = encode_properties(p.properties, ptype)
        if pb == b"\x00":
            return _PACK_BBHB(first, 3, pid, p.reason_code) if p.reason_code else _PACK_BBH(
                first, 2, pid)
        return _packet(first, _PACK_H(pid) + _PACK_B(p.reason_code) + pb)

    return enc


def _enc_subscribe(p: Subscribe, version: int) -> bytes:
    v5 = version >= MQTT_5
    parts = [_enc_pid(p.packet_id)]
    if v5:
        parts.append(encode_properties(p.properties, _SUBSCRIBE))
    for s in p.subscriptions:
        if s.qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {s.qos}")
        opts = s.qos
        if v5:
            if s.retain_handling not in (0, 1, 2):
                raise ValueError(f"invalid retain handling {s.retain_handling}")
            opts |= ((0x04 if s.no_local else 0) | (0x08 if s.retain_as_published else 0)
                     | (s.retain_handling << 4))
        parts.append(_enc_str(s.topic_filter))
        parts.append(_BYTE[opts])
    return _packet(0x82, b"".join(parts))


def _enc_suback(p: SubAck, version: int) -> bytes:
    body = _enc_pid(p.packet_id)
    if version >= MQTT_5:
        body += encode_properties(p.properties, PacketType.SUBACK)
    return _packet(0x90, body + bytes(p.reason_codes))


def _enc_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    parts = [_enc_pid(p.packet_id)]
    if version >= MQTT_5:
        parts.append(encode_properties(p.properties, PacketType.UNSUBSCRIBE))
    parts.extend(_enc_str(f) for f in p.topic_filters)
    return _packet(0xA2, b"".join(parts))


def _enc_unsuback(p: UnsubAck, version: int) -> bytes:
    body = _enc_pid(p.packet_id)
    if version < MQTT_5:
        return _packet(0xB0, body)  # 3.1.1: no payload
    body += encode_properties(p.properties, PacketType.UNSUBACK) + bytes(p.reason_codes)
    return _packet(0xB0, body)


def _enc_pingreq(p: PingReq, version: int) -> bytes:
    return b"\xc0\x00"


def _enc_pingresp(p: PingResp, version: int) -> bytes:
    return b"\xd0\x00"


def _enc_reason_props(first: int, ptype: PacketType, code: int, props: Properties) -> bytes:
    """DISCONNECT / AUTH in 5.0: reason code and properties, each omitted when it can be."""
    if props is NO_PROPERTIES:
        return bytes((first, 1, code)) if code else _PACK_BB(first, 0)
    pb = encode_properties(props, ptype)
    if pb == b"\x00":
        return _enc_reason_props(first, ptype, code, NO_PROPERTIES)
    return _packet(first, _PACK_B(code) + pb)


def _enc_disconnect(p: Disconnect, version: int) -> bytes:
    if version < MQTT_5:
        return b"\xe0\x00"
    return _enc_reason_props(0xE0, PacketType.DISCONNECT, p.reason_code, p.properties)


def _enc_auth(p: Auth, version: int) -> bytes:
    if version < MQTT_5:
        raise ValueError("AUTH does not exist before MQTT 5")
    return _enc_reason_props(0xF0, PacketType.AUTH, p.reason_code, p.properties)


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Publish: _enc_publish,
    PubAck: _make_ack_encoder(0x40, PacketType.PUBACK),
    PubRec: _make_ack_encoder(0x50, PacketType.PUBREC),
    PubRel: _make_ack_encoder(0x62, PacketType.PUBREL),
    PubComp: _make_ack_encoder(0x70, PacketType.PUBCOMP),
    Connect: _enc_connect,
    ConnAck: _enc_connack,
    Subscribe: _enc_subscribe,
    SubAck: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    UnsubAck: _enc_unsuback,
    PingReq: _enc_pingreq,
    PingResp: _enc_pingresp,
    Disconnect: _enc_disconnect,
    Auth: _enc_auth,
}


def encode(packet: Packet, version: int) -> bytes:
    """The full bytes (fixed header included) of ``packet`` for protocol ``version``.

    Before 5.0 reason codes (except the CONNACK return code, written as given)
    and properties are left out. In 5.0 the short forms are used where allowed.
    A CONNECT is encoded for its own ``protocol_version``.
    """
    enc = _ENCODERS.get(type(packet))
    if enc is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    try:
        return enc(packet, version)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot encode {type(packet).__name__}: {exc}") from None


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


class PacketReader:
    """Incremental framing: feed bytes, get whole packets. Loop-free, no I/O.

    ``version`` is the connection's protocol level; after decoding a CONNECT
    ``feed`` adopts the CONNECT's level for the packets that follow (the
    connection may set it too). ``max_packet_size`` bounds the total size
    (fixed header + remaining length): a larger packet raises
    ``ProtocolError(0x95)`` as soon as its fixed header is read. ``strict_utf8`` is
    passed to ``decode``.

    ``server``: the reader is a server's, which refuses the packet types a client never
    sends (CONNACK, SUBACK, UNSUBACK, PINGRESP; the reserved 0, and 15 before 5.0) at their
    first byte, before their length or body is read or waited for (``_FORBIDDEN``).

    When bad bytes follow good packets in one ``feed``, the good packets are
    returned and the error is kept in ``error`` (and raised by the next
    ``feed``): the caller handles what came first, then the violation, in order.
    After a ``ProtocolError`` the reader's state is unspecified: close the
    connection.
    """

    __slots__ = ("_buf", "error", "max_packet_size", "server", "strict_utf8", "version")

    def __init__(self, version: int = 4, max_packet_size: int = MAX_REMAINING_LENGTH,
                 strict_utf8: bool = False, *, server: bool = False) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self.strict_utf8 = strict_utf8
        self.server = server
        self._buf: bytearray | None = None  # a packet's first bytes; None between packets (idle)
        self.error: ProtocolError | None = None

    def pending(self) -> bytes:
        """Bytes buffered but not yet a whole packet."""
        return bytes(self._buf or b"")

    def feed(self, data: bytes) -> list[Packet]:
        """Append ``data``; return every complete packet, decoded, in order."""
        return self._scan(data, True)

    def feed_raw(self, data: bytes) -> list[tuple[int, memoryview | bytes]]:
        """Like ``feed`` but return ``(first_byte, body)`` pairs without decoding."""
        return self._scan(data, False)

    def _too_large(self, total: int) -> ProtocolError:
        return ProtocolError(reasons.PACKET_TOO_LARGE,
                             f"packet of {total} bytes exceeds maximum {self.max_packet_size}")

    def _scan(self, data: bytes, decode_packets: bool) -> list[Any]:
        if self.error is not None:
            raise self.error
        pending = self._buf
        if pending:
            pending += data
            # Only copy the buffer once it holds at least one whole packet.
            n = len(pending)
            if n < 2:
                return []
            rl = pending[1]
            start = 2
            if rl >= 0x80:
                rl, start = _frame_length(pending, 1, n, self.version)
                if start < 0:
                    return []
            if start + rl > self.max_packet_size:
                raise self._too_large(start + rl)
            if start + rl > n:
                return []
            buf = bytes(pending)
            pending = self._buf = None
        elif type(data) is bytes:
            buf = data
        else:
            buf = bytes(data)
        out: list[Any] = []
        append = out.append
        n = len(buf)
        pos = 0
        version = self.version
        maxsize = self.max_packet_size
        decoders = _DECODERS
        forbidden = _FORBIDDEN[version >= MQTT_5] if self.server else _NOTHING_FORBIDDEN
        strict = self.strict_utf8
        try:
            while n - pos >= 2:
                first = buf[pos]
                if forbidden[first >> 4]:
                    raise _forbidden(first, version)
                rl = buf[pos + 1]
                if rl < 0x80:
                    start = pos + 2
                else:
                    rl, start = _frame_length(buf, pos + 1, n, version)
                    if start < 0:
                        break
                end = start + rl
                if end - pos > maxsize:
                    raise self._too_large(end - pos)
                if end > n:
                    break
                if decode_packets:
                    packet = decoders[first >> 4](first, buf, start, end, version, strict)
                    if first == 0x10:
                        version = self.version = packet.protocol_version  # type: ignore[union-attr]
                        if self.server:
                            forbidden = _FORBIDDEN[version >= MQTT_5]
                    append(packet)
                else:
                    append((first, buf[start:end]))
                pos = end
        except ProtocolError as exc:
            if not out:
                raise
            self.error = exc
            return out
        if pos < n:
            if pending is None:
                if forbidden[buf[pos] >> 4]:  # judged by its first byte alone, not after waiting for more
                    refused = _forbidden(buf[pos], version)
                    if not out:
                        raise refused
                    self.error = refused
                    return out
                self._buf = bytearray(memoryview(buf)[pos:])
            else:
                pending += memoryview(buf)[pos:]
        return out


_SERVER_NEVER_GETS = (PacketType.CONNACK, PacketType.SUBACK, PacketType.UNSUBACK, PacketType.PINGRESP)
_FORBIDDEN: Final = (  # by packet type, for a server's reader: before 5.0, and 5.0
    tuple(t in (0, 15) + _SERVER_NEVER_GETS for t in range(16)),
    tuple(t in (0,) + _SERVER_NEVER_GETS for t in range(16)),
)
_NOTHING_FORBIDDEN: Final = (False,) * 16


def _forbidden(first: int, version: int) -> ProtocolError:
    """A packet type a server never receives, judged by the first byte: a reserved type cannot
    be parsed (Malformed Packet, 2.1.2); a server's packet from a client is a Protocol Error
    (2.1.2 "Client to Server" direction; 4.13; 3.1.1 closes either way, 4.8)."""
    kind = first >> 4
    if kind in (0, 15):
        return malformed(f"packet type {kind} is reserved")
    return protocol_error(f"{PacketType(kind).name} from a client: only a server sends it")


def _frame_length(buf: bytes | bytearray, pos: int, n: int, version: int) -> tuple[int, int]:
    """Remaining length at ``pos``: (value, body start), or (-1, -1) if incomplete."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= n:
            return -1, -1
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if i and not b and version >= MQTT_5:
                # [MQTT-1.5.5-1] minimum number of bytes (no such rule before 5.0).
                raise malformed("remaining length not minimally encoded")
            return value, pos + i + 1
        shift += 7
    # 2.1.4 / 1.5.5: the Remaining Length is at most four bytes.
    raise malformed("remaining length longer than 4 bytes")
