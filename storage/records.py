"""Durable records of the message store and their CBOR encoding.

What it does:

* Defines the slotted dataclasses the broker persists: ``StoredMessage``,
  ``StoredSubscription``, ``StoredWill``, ``SessionRecord`` and ``InflightRecord``.
  They are frozen, but for the two built for every stored message
  (``StoredMessage``, ``InflightRecord``): a frozen one cost 0.74 us to build, a
  plain one 0.18 us (6 fields). Those two are hashable all the same, and nothing
  changes a record once built.
* Encodes each to CBOR (``encode_*``) and back (``decode_*``). Every record is a
  CBOR map with short text keys; fields equal to their default are left out, so
  the common record is small and a field added later (with a default) decodes
  from old data. Unknown keys are ignored on decode.
* ``Properties`` (MQTT 5.0) are stored as a map keyed by the MQTT property
  identifier (0x01 payload format indicator, 0x26 user property, ...): the
  identifiers are fixed by the standard, so the encoding does not depend on
  Python attribute names. Only non-default properties are written; a record
  without properties decodes to the shared ``NO_PROPERTIES``.
* Defines the store's exceptions (``StoreError`` and subclasses) so that record
  decoding can raise ``StoreCorrupt`` without importing LMDB.

Invariants:

* ``decode_x(encode_x(r)) == r`` for every valid record ``r``.
* A decode of anything that is not a well-formed record of the expected shape
  (bad CBOR, wrong types, missing fields) raises ``StoreCorrupt`` and nothing
  else.

What it does not do:

* No I/O and no LMDB: keys, tables and transactions live in ``lmdb_store.py``.
* No validation of MQTT semantics (topic syntax, QoS ranges beyond type checks);
  the broker validates before it stores.
* The schema version is kept in the store's meta table, not in each record.

Two row formats (the shard schema, ``lmdb_store.SCHEMA_VERSION``, tells which one a
store writes; readers accept both):

* CBOR maps (above): every record of schema 1, and still what sessions, meta values
  and retained messages are written as.
* Packed rows, schema 2 and 3, for the two rows written per message on the hot path.
  They start with a format byte that no CBOR map starts with (maps are 0xA0-0xBF),
  so a decoder tells the formats apart by the first byte:

  - a message row (``pack_message``): ``0x01, flags (u8: 1 retain, 2 expiry,
    4 properties), qos (u8), topic length (u32), topic (UTF-8)``, then the expiry
    (f64) if flag 2, then the properties (u32 length + the CBOR map above) if flag
    4, then the payload: the rest of the row;
  - an inflight row (``pack_inflight``): ``0x01, qos (u8), state (u8), msg_id
    (u64, 0 = none)``, 11 bytes;
  - an inflight row that holds its message (schema 3, ``hold_message``): ``0x02``
    and the same three fields, then the packed message row. A message whose only
    reference is one inflight row needs no message row of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

import cbor2

from shardbroker.protocol.packets import NO_PROPERTIES, PROPERTY_TABLE, Properties, PropertyKind

__all__ = [
    "AWAIT_PUBACK",
    "AWAIT_PUBCOMP",
    "AWAIT_PUBREC",
    "EXPIRY_NEVER",
    "PROPERTY_IDS",
    "InflightRecord",
    "SessionRecord",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoredMessage",
    "StoredSubscription",
    "StoredWill",
    "decode_inflight",
    "decode_inflight_row",
    "decode_message",
    "decode_properties",
    "decode_session",
    "decode_value",
    "encode_inflight",
    "encode_message",
    "encode_properties",
    "encode_session",
    "encode_value",
    "hold_message",
    "inflight_msg_id",
    "message_topic_payload",
    "pack_inflight",
    "pack_message",
    "plain_inflight",
]


class StoreError(Exception):
    """The store cannot do what was asked; the message is one line for people."""


class StoreCorrupt(StoreError):
    """Stored bytes do not decode to the record that should be there."""


class StoreFull(StoreError):
    """The map cannot grow further (max_map_size) or the disk is full."""


EXPIRY_NEVER: Final = 0xFFFFFFFF
"""Session expiry interval meaning "never expires"."""

AWAIT_PUBACK: Final = 1
AWAIT_PUBREC: Final = 2
AWAIT_PUBCOMP: Final = 3


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module docstring
class StoredMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    expires_at: float | None = None  # wall-clock unix time, None = never

    # Written out rather than generated: compiled (``shardbroker/_compiled.py``), an explicit
    # __init__ is native code, a dataclass-generated one is interpreted.
    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties,
                 expires_at: float | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    topic_filter: str  # as subscribed, incl. "$share/g/..." prefix
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None


@dataclass(frozen=True, slots=True)
class StoredWill:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    delay: int = 0  # will delay interval, seconds


@dataclass(frozen=True, slots=True)
class SessionRecord:
    client_id: str
    protocol_version: int
    expiry_interval: int  # seconds; 0xFFFFFFFF = never
    disconnected_at: float | None  # wall clock; None while connected
    subscriptions: tuple[StoredSubscription, ...] = ()
    will: StoredWill | None = None


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module docstring
class InflightRecord:
    msg_id: int | None  # None once only PUBCOMP is awaited (message no longer needed)
    qos: int
    state: int  # AWAIT_PUBACK, AWAIT_PUBREC or AWAIT_PUBCOMP

    def __init__(self, msg_id: int | None, qos: int, state: int) -> None:
        self.msg_id = msg_id  # explicit, as ``StoredMessage.__init__`` says why
        self.qos = qos
        self.state = state


# --------------------------------------------------------------------------- properties

_INT, _STR, _BYTES, _INTS, _PAIRS = "int", "str", "bytes", "ints", "pairs"

_STORED_KIND: Final = {
    PropertyKind.BYTE: _INT, PropertyKind.U16: _INT, PropertyKind.U32: _INT, PropertyKind.VBI: _INTS,
    PropertyKind.STR: _STR, PropertyKind.BIN: _BYTES, PropertyKind.PAIR: _PAIRS,
}
PROPERTY_IDS: Final[tuple[tuple[str, int, str], ...]] = tuple(
    (name, ident, _STORED_KIND[kind]) for ident, name, kind in PROPERTY_TABLE)
"""(attribute of ``Properties``, MQTT property identifier, value kind)."""

_BY_ID: Final = {pid: (name, kind) for name, pid, kind in PROPERTY_IDS}
_PROPERTY_DEFAULTS: Final = {f.name: f.default for f in fields(Properties)}


def _corrupt(what: str, problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"corrupt {what} record: {problem}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_properties(props: Properties) -> dict[int, Any]:
    """The CBOR-ready map of the non-default properties (empty for ``NO_PROPERTIES``)."""
    out: dict[int, Any] = {}
    if props is NO_PROPERTIES or props == NO_PROPERTIES:
        return out
    for name, pid, kind in PROPERTY_IDS:
        value = getattr(props, name)
        if value == _PROPERTY_DEFAULTS[name]:
            continue
        if kind == _INTS:
            out[pid] = list(value)
        elif kind == _PAIRS:
            out[pid] = [[k, v] for k, v in value]
        else:
            out[pid] = value
    return out


def decode_properties(raw: object, what: str = "properties") -> Properties:
    """Inverse of ``encode_properties``; unknown identifiers are ignored."""
    if not isinstance(raw, Mapping):
        raise _corrupt(what, "properties are not a map")
    if not raw:
        return NO_PROPERTIES
    kwargs: dict[str, Any] = {}
    for pid, value in raw.items():
        entry = _BY_ID.get(pid) if _is_int(pid) else None
        if entry is None:
            continue  # written by a later version with a property we do not know
        name, kind = entry
        if kind == _INT:
            ok = _is_int(value)
        elif kind == _STR:
            ok = isinstance(value, str)
        elif kind == _BYTES:
            ok = isinstance(value, bytes)
        elif kind == _INTS:
            ok = isinstance(value, list) and all(_is_int(v) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
                for p in value
            )
            value = tuple((p[0], p[1]) for p in value) if ok else value
        if not ok:
            raise _corrupt(what, f"property 0x{pid:02X} has a value of the wrong type")
        kwargs[name] = value
    return Properties(**kwargs) if kwargs else NO_PROPERTIES


# --------------------------------------------------------------------------- helpers


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _corrupt(what, f"undecodable CBOR ({exc.__class__.__name__})") from None


def _map(data: bytes, what: str) -> Mapping[Any, Any]:
    raw = _loads(data, what)
    if not isinstance(raw, Mapping):
        raise _corrupt(what, "not a CBOR map")
    return raw


def _field(raw: Mapping[Any, Any], key: str, kind: type, what: str, default: Any = ...) -> Any:
    """``raw[key]`` checked to be an instance of ``kind`` (``int`` excludes ``bool``)."""
    if key not in raw:
        if default is ...:
            raise _corrupt(what, f"field {key!r} missing")
        return default
    value = raw[key]
    if kind is float:
        ok = (isinstance(value, (int, float))) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _corrupt(what, f"field {key!r} has type {type(value).__name__}")
    return value


def encode_value(value: object) -> bytes:
    """CBOR for a meta value (any CBOR-serialisable Python value)."""
    return cbor2.dumps(value)


def decode_value(data: bytes, what: str = "meta") -> object:
    result: object = _loads(data, what)
    return result


# --------------------------------------------------------------------------- messages


def _message_map(msg: StoredMessage | StoredWill) -> dict[str, Any]:
    out: dict[str, Any] = {"t": msg.topic, "p": bytes(msg.payload), "q": msg.qos}
    if msg.retain:
        out["r"] = True
    props = encode_properties(msg.properties)
    if props:
        out["pr"] = props
    return out


def encode_message(msg: StoredMessage) -> bytes:
    """``{"t": topic, "p": payload, "q": qos, "r"?: True, "pr"?: props, "x"?: expires_at}``."""
    out = _message_map(msg)
    if msg.expires_at is not None:
        out["x"] = float(msg.expires_at)
    return cbor2.dumps(out)


def _decode_message_map(raw: Mapping[Any, Any], what: str) -> tuple[str, bytes, int, bool, Properties]:
    return (
        _field(raw, "t", str, what),
        _field(raw, "p", bytes, what),
        _field(raw, "q", int, what),
        _field(raw, "r", bool, what, False),
        decode_properties(raw["pr"], what) if "pr" in raw else NO_PROPERTIES,
    )


_PACKED: Final = 0x01  # first byte of a packed message row or inflight row (schema 2)
_HOLDS: Final = 0x02  # first byte of an inflight row that holds its message (schema 3)
_MSG_HEAD: Final = struct.Struct(">BBBI")  # format, flags, qos, topic length
_F64: Final = struct.Struct(">d")
_U32: Final = struct.Struct(">I")
_RETAIN, _EXPIRY, _PROPS = 1, 2, 4
_INFLIGHT_ROW: Final = struct.Struct(">BBBQ")  # format, qos, state, msg_id (0 = none)


def pack_message(msg: StoredMessage) -> bytes:
    """The packed message row (schema 2; see the module docstring)."""
    topic = msg.topic.encode()
    flags = _RETAIN if msg.retain else 0
    if msg.expires_at is None and msg.properties is NO_PROPERTIES:  # the common row, in one go
        return _MSG_HEAD.pack(_PACKED, flags, msg.qos, len(topic)) + topic + msg.payload
    parts = [b"", topic]
    if msg.expires_at is not None:
        flags |= _EXPIRY
        parts.append(_F64.pack(msg.expires_at))
    if msg.properties is not NO_PROPERTIES:
        props = encode_properties(msg.properties)
        if props:
            flags |= _PROPS
            data = cbor2.dumps(props)
            parts += (_U32.pack(len(data)), data)
    parts[0] = _MSG_HEAD.pack(_PACKED, flags, msg.qos, len(topic))
    parts.append(msg.payload)
    return b"".join(parts)


def _unpack_message(data: bytes, start: int = 0) -> StoredMessage:
    try:
        _, flags, qos, n = _MSG_HEAD.unpack_from(data, start)
        at = start + _MSG_HEAD.size
        if flags & ~(_RETAIN | _EXPIRY | _PROPS) or at + n > len(data):
            raise _corrupt("message", "bad packed header")
        topic = data[at:at + n].decode()
        at += n
        expires_at = None
        if flags & _EXPIRY:
            expires_at = _F64.unpack_from(data, at)[0]
            at += 8
        props = NO_PROPERTIES
        if flags & _PROPS:
            size = _U32.unpack_from(data, at)[0]
            at += 4
            if at + size > len(data):
                raise _corrupt("message", "properties overrun the row")
            props = decode_properties(_loads(data[at:at + size], "message"), "message")
            at += size
    except (struct.error, UnicodeDecodeError):
        raise _corrupt("message", "truncated or undecodable packed row") from None
    return StoredMessage(topic, data[at:], qos, bool(flags & _RETAIN), props, expires_at)


def decode_message(data: bytes) -> StoredMessage:
    """A packed message row or a CBOR message map."""
    if data[:1] == b"\x01":
        return _unpack_message(data)
    raw = _map(data, "message")
    topic, payload, qos, retain, props = _decode_message_map(raw, "message")
    expires_at = _field(raw, "x", float, "message", None)
    return StoredMessage(topic, payload, qos, retain, props, expires_at)


def message_topic_payload(data: bytes) -> tuple[str, bytes]:
    """The topic and payload of a message row, without the rest (``RetainedStore.digest``
    reads every retained row: a third of the time of ``decode_message``)."""
    if data[:1] == b"\x01":
        msg = _unpack_message(data)
        return msg.topic, msg.payload
    raw = _map(data, "message")
    topic, payload = raw.get("t"), raw.get("p")
    if type(topic) is not str or type(payload) is not bytes:
        raise _corrupt("message", "no topic (text) or payload (bytes)")
    return topic, payload


# --------------------------------------------------------------------------- sessions


def _encode_subscription(sub: StoredSubscription) -> dict[str, Any]:
    out: dict[str, Any] = {"f": sub.topic_filter, "q": sub.qos}
    if sub.no_local:
        out["nl"] = True
    if sub.retain_as_published:
        out["rap"] = True
    if sub.retain_handling:
        out["rh"] = sub.retain_handling
    if sub.subscription_id is not None:
        out["id"] = sub.subscription_id
    return out


def _decode_subscription(raw: object) -> StoredSubscription:
    what = "subscription"
    if not isinstance(raw, Mapping):
        raise _corrupt(what, "not a map")
    return StoredSubscription(
        topic_filter=_field(raw, "f", str, what),
        qos=_field(raw, "q", int, what),
        no_local=_field(raw, "nl", bool, what, False),
        retain_as_published=_field(raw, "rap", bool, what, False),
        retain_handling=_field(raw, "rh", int, what, 0),
        subscription_id=_field(raw, "id", int, what, None),
    )


def encode_session(rec: SessionRecord) -> bytes:
    """``{"c": client_id, "v": version, "e": expiry, "d"?: disconnected_at, "s"?: [sub], "w"?: will}``.

    A subscription is ``{"f": filter, "q": qos, "nl"?, "rap"?, "rh"?, "id"?}``; a will is a
    message map plus ``"dl"?: delay``.
    """
    out: dict[str, Any] = {"c": rec.client_id, "v": rec.protocol_version, "e": rec.expiry_interval}
    if rec.disconnected_at is not None:
        out["d"] = float(rec.disconnected_at)
    if rec.subscriptions:
        out["s"] = [_encode_subscription(s) for s in rec.subscriptions]
    if rec.will is not None:
        will = _message_map(rec.will)
        if rec.will.delay:
            will["dl"] = rec.will.delay
        out["w"] = will
    return cbor2.dumps(out)


def decode_session(data: bytes) -> SessionRecord:
    what = "session"
    raw = _map(data, what)
    subs_raw = _field(raw, "s", list, what, [])
    will: StoredWill | None = None
    if "w" in raw:
        will_raw = raw["w"]
        if not isinstance(will_raw, Mapping):
            raise _corrupt(what, "will is not a map")
        topic, payload, qos, retain, props = _decode_message_map(will_raw, "will")
        will = StoredWill(topic, payload, qos, retain, props, _field(will_raw, "dl", int, "will", 0))
    return SessionRecord(
        client_id=_field(raw, "c", str, what),
        protocol_version=_field(raw, "v", int, what),
        expiry_interval=_field(raw, "e", int, what),
        disconnected_at=_field(raw, "d", float, what, None),
        subscriptions=tuple(_decode_subscription(s) for s in subs_raw),
        will=will,
    )


# --------------------------------------------------------------------------- inflight


def encode_inflight(rec: InflightRecord) -> bytes:
    """``{"m"?: msg_id, "q": qos, "s": state}`` (no ``"m"`` once the message is released)."""
    out: dict[str, Any] = {"q": rec.qos, "s": rec.state}
    if rec.msg_id is not None:
        out["m"] = rec.msg_id
    return cbor2.dumps(out)


def pack_inflight(rec: InflightRecord) -> bytes:
    """The packed inflight row (schema 2): format 0x01, qos, state, msg_id (0 = none)."""
    return _INFLIGHT_ROW.pack(_PACKED, rec.qos, rec.state, rec.msg_id or 0)


def hold_message(row: bytes, message_row: bytes) -> bytes:
    """The inflight row ``row`` (a ``pack_inflight`` row) holding ``message_row`` (a ``pack_message`` row)."""
    return b"\x02" + row[1:_INFLIGHT_ROW.size] + message_row


def plain_inflight(row: bytes) -> bytes:
    """A packed inflight row without the message it may hold."""
    return b"\x01" + row[1:_INFLIGHT_ROW.size] if row[:1] == b"\x02" else row


def inflight_msg_id(data: bytes) -> int | None:
    """The msg_id an inflight row names (or holds), without decoding more of it."""
    if len(data) >= _INFLIGHT_ROW.size and data[0] in (_PACKED, _HOLDS):
        return _INFLIGHT_ROW.unpack_from(data)[3] or None
    return decode_inflight(data).msg_id


def decode_inflight_row(data: bytes) -> tuple[InflightRecord, StoredMessage | None]:
    """The record, and the message if the row holds it (else None)."""
    rec = decode_inflight(data)
    if data[:1] != b"\x02":
        return rec, None
    if rec.msg_id is None:
        raise _corrupt("inflight", "row holds a message but names none")
    return rec, _unpack_message(data, _INFLIGHT_ROW.size)


def decode_inflight(data: bytes) -> InflightRecord:
    """A packed inflight row (a message it holds is not decoded) or a CBOR map."""
    what = "inflight"
    if data[:1] in (b"\x01", b"\x02"):
        size = len(data)
        if size < _INFLIGHT_ROW.size or (data[0] == _PACKED and size != _INFLIGHT_ROW.size) or (
                data[0] == _HOLDS and size < _INFLIGHT_ROW.size + _MSG_HEAD.size):
            raise _corrupt(what, f"packed row of {size} bytes")
        _, qos, state, msg_id = _INFLIGHT_ROW.unpack_from(data)
        return InflightRecord(msg_id or None, qos, state)
    raw = _map(data, what)
    return InflightRecord(
        msg_id=_field(raw, "m", int, what, None),
        qos=_field(raw, "q", int, what),
        state=_field(raw, "s", int, what),
    )
