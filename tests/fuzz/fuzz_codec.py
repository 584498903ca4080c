"""Fuzz target: the MQTT codec on arbitrary bytes, in every protocol version.

Input: byte 0 picks the connection's protocol level (bits 0-1: 3.1, 3.1.1, 5.0, 5.0) and the
maximum packet size (bits 2-3); byte 1 seeds where the stream is cut; the rest is what a
client sent. Properties checked:

* ``PacketReader.feed`` returns packets, keeps bytes for later, or raises ``ProtocolError``:
  nothing else escapes (``errors.py``, ``codec.py`` invariants);
* it gives the same packets, the same error and the same pending bytes whether the stream
  comes whole, one byte at a time or cut anywhere else;
* it never keeps more than a packet's header or ``max_packet_size`` bytes;
* ``feed_raw`` frames the first packet as ``feed`` does, and ``decode`` of it agrees;
* every decoded packet encodes for the version it was read in, and decodes back equal; its
  encoding is stable (encoding the decoded copy gives the same bytes);
* what a server sends (PUBLISH, the acknowledgements, CONNACK, SUBACK, UNSUBACK, DISCONNECT,
  AUTH), once the codec decodes it, reads the same with the independent parser of
  ``tests/mqttbytes.py``, framed by it too.

Run longer by hand (new inputs go to the first directory, which must exist; the seeds are read
from the second): ``mkdir -p /tmp/codec-corpus``, then
``python tests/fuzz/fuzz_codec.py -max_total_time=600 /tmp/codec-corpus tests/fuzz/corpus/codec``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from harness import chunks, fuzz, instrumented

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mqttbytes as mb

with instrumented(__name__ == "__main__"):
    from shardbroker.protocol import codec
    from shardbroker.protocol.errors import ProtocolError
    from shardbroker.protocol.packets import (
        MQTT_3_1,
        MQTT_3_1_1,
        MQTT_5,
        PROPERTY_TABLE,
        Auth,
        ConnAck,
        Connect,
        Disconnect,
        Packet,
        Properties,
        PubAck,
        PubComp,
        Publish,
        PubRec,
        PubRel,
        SubAck,
        UnsubAck,
    )

VERSIONS = (MQTT_3_1, MQTT_3_1_1, MQTT_5, MQTT_5)
MAX_SIZES = (codec.MAX_REMAINING_LENGTH, 64, 300, 4096)
#: A fixed header: first byte and a Remaining Length of at most four bytes.
MAX_HEADER = 5

Outcome = tuple[list[Packet], tuple[int, str] | None, bytes]


def read(pieces: list[bytes], version: int, max_size: int) -> Outcome:
    """Feed ``pieces`` to a new reader: (packets, (reason, message) of the error, pending)."""
    reader = codec.PacketReader(version, max_size)
    packets: list[Packet] = []
    error: ProtocolError | None = None
    for piece in pieces:
        try:
            packets += reader.feed(piece)
        except ProtocolError as exc:
            error = exc
            break
        if reader.error is not None:
            error = reader.error
            break
        pending = reader.pending()
        assert len(pending) <= max(MAX_HEADER, max_size), (
            f"reader keeps {len(pending)} bytes, max_packet_size {max_size}")
    if error is not None:
        return packets, (error.reason, error.message), b""
    return packets, None, reader.pending()


def round_trip(packet: Packet, version: int) -> None:
    """``packet`` was decoded at ``version``: it encodes, and decodes back to itself."""
    try:
        data = codec.encode(packet, version)
    except (ValueError, TypeError) as exc:
        raise AssertionError(f"decoded {packet!r} does not encode for {version}: {exc}") from exc
    reader = codec.PacketReader(version)
    try:
        again = reader.feed(data)
    except ProtocolError as exc:
        raise AssertionError(f"{packet!r} encodes to {data.hex()}, which does not decode: "
                             f"{exc!r}") from exc
    assert again == [packet], f"{packet!r} -> {data.hex()} -> {again!r}"
    assert reader.pending() == b""
    assert codec.encode(again[0], version) == data, f"encoding of {packet!r} is not stable"


def _props(props: Properties) -> dict[int, Any]:
    """``props`` as ``mqttbytes`` gives them: identifier -> value, a list for the repeatable."""
    out: dict[int, Any] = {}
    for ident, name, _kind in PROPERTY_TABLE:
        value = getattr(props, name)
        if value is None or value == ():
            continue
        out[ident] = list(value) if isinstance(value, tuple) else value
    return out


def independent(packet: Packet, flags: int, body: bytes, version: int) -> None:
    """``packet`` (decoded by the codec at ``version``) is what ``mqttbytes`` reads too."""
    got: tuple[Any, ...]
    want: tuple[Any, ...]
    try:
        if isinstance(packet, Publish):
            p = mb.parse_publish(flags, body, version)
            got = (p.topic, p.payload, p.qos, p.pid, p.props, p.retain, p.dup)
            want = (packet.topic, packet.payload, packet.qos, packet.packet_id,
                    _props(packet.properties), packet.retain, packet.dup)
        elif isinstance(packet, PubAck | PubRec | PubRel | PubComp):
            a = mb.parse_ack(body, version)
            got = (a.pid, a.reason, a.props)
            want = (packet.packet_id, packet.reason_code, _props(packet.properties))
        elif isinstance(packet, ConnAck) and version != MQTT_3_1:  # 3.1: the first byte is unused
            c = mb.parse_connack(body, version)
            got = (c.session_present, c.rc, c.props)
            want = (packet.session_present, packet.reason_code, _props(packet.properties))
        elif isinstance(packet, SubAck | UnsubAck):
            parse = mb.parse_suback if isinstance(packet, SubAck) else mb.parse_unsuback
            s = parse(body, version)
            got = (s.pid, s.codes, s.props)
            want = (packet.packet_id, list(packet.reason_codes), _props(packet.properties))
        elif isinstance(packet, Disconnect | Auth) and version == MQTT_5:
            d = mb.parse_disconnect(body, version)
            got = (d.reason, d.props)
            want = (packet.reason_code, _props(packet.properties))
        else:
            return
    except mb.MalformedError as exc:
        raise AssertionError(f"the codec read {packet!r}, mqttbytes refuses {body.hex()}: "
                             f"{exc}") from exc
    assert got == want, f"{body.hex()} at {version}: codec {want!r}, mqttbytes {got!r}"


def check(data: bytes) -> Outcome | None:
    """Check one input; return what the whole stream reads as (for the seed tests)."""
    if len(data) < 2:
        return None
    version = VERSIONS[data[0] & 3]
    max_size = MAX_SIZES[(data[0] >> 2) & 3]
    stream = data[2:]

    whole = read([stream], version, max_size)
    for pieces in (chunks(stream, data[1] or 1), chunks(stream, 0)):
        split = read(pieces, version, max_size)
        assert split == whole, f"split at {[len(p) for p in pieces][:40]}: {split!r} != {whole!r}"

    packets, error, _pending = whole
    pos = 0
    for packet in packets:
        round_trip(packet, version)
        first = stream[pos]
        length, start = mb.decode_varint(stream, pos + 1)
        pos = start + length
        independent(packet, first & 0x0F, stream[start:pos], version)
        if isinstance(packet, Connect):
            version = packet.protocol_version  # the reader reads on in the CONNECT's version

    # feed_raw frames the first packet as feed does (it never decodes, so it raises only
    # framing errors and does not switch versions: compare the first packet only).
    first_version = VERSIONS[data[0] & 3]
    raw_reader = codec.PacketReader(first_version, max_size)
    try:
        raw = raw_reader.feed_raw(stream)
    except ProtocolError as exc:
        assert not packets and error == (exc.reason, exc.message), (
            f"feed_raw: {exc!r}; feed: {whole!r}")
        return whole
    if not raw:
        assert not packets and error is None, f"feed: {whole!r}, feed_raw: nothing yet"
        return whole
    first, body = raw[0]
    try:
        decoded = codec.decode(first, body, first_version)
    except ProtocolError as exc:
        assert not packets and error == (exc.reason, exc.message), (
            f"decode of the first raw packet: {exc!r}; feed: {error!r}")
        return whole
    assert packets and packets[0] == decoded, f"feed: {packets[:1]!r}, decode: {decoded!r}"
    return whole


if __name__ == "__main__":
    fuzz(check)
