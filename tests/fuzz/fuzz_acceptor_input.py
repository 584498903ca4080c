"""Fuzz target: what the acceptor parses of a new connection before any worker sees it.

The acceptor's order (``process/acceptor.py``): a PROXY protocol v2 header
(``transport.proxy.parse``) on listeners that want one, the WebSocket opening handshake and
frames (``transport.websocket.WsFramer``) on ``ws``/``wss`` listeners, then the CONNECT
(``PacketReader.feed_raw``, ``connect_version``, ``decode``). TLS has no parsing of its own
here: OpenSSL reads the records, and ``tls.identity`` reads a certificate OpenSSL verified.

Input: byte 0 says the listener (bit 0: PROXY header, bit 1: WebSocket, bits 2-3: maximum
packet size); byte 1 seeds where the stream is cut; the rest is what the client sent.
Properties checked:

* ``proxy.parse`` returns None (more bytes needed, only while fewer than ``MAX_LENGTH``
  bytes are there), raises ``ProxyError``, or gives a header length within the bytes and an
  address; every shorter prefix of a good header needs more bytes;
* ``WsFramer.feed`` returns ``(MQTT bytes, reply, over)`` and raises nothing; the protocol
  logs no internal error (a handshake or parser exception it caught); no MQTT bytes come
  out before the handshake is accepted; a handshake larger than ``MAX_REQUEST`` is refused;
  the MQTT bytes are the same however the stream is cut (up to the point where it is over);
* the CONNECT read raises ``ProtocolError`` only, and a decoded first packet is a CONNECT.

Run longer by hand (new inputs go to the first directory, which must exist; the seeds are read
from the second): ``mkdir -p /tmp/acceptor-corpus``, then
``python tests/fuzz/fuzz_acceptor_input.py -max_total_time=600 /tmp/acceptor-corpus tests/fuzz/corpus/acceptor_input``
"""

from __future__ import annotations

import logging

from harness import chunks, fuzz, instrumented

with instrumented(__name__ == "__main__"):
    from shardbroker.process.acceptor import _level
    from shardbroker.protocol import codec
    from shardbroker.protocol.errors import ProtocolError
    from shardbroker.protocol.packets import Connect
    from shardbroker.transport import proxy
    from shardbroker.transport.websocket import MAX_REQUEST, WsFramer

PATH = "/mqtt"
MAX_SIZES = (1_048_576, 64, 300, 4096)  # the first is limits.max_packet_size's default


class _Errors(logging.Handler):
    """Records at ERROR or above: the WebSocket protocol logs the exceptions it swallows."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        assert not self.records, "websockets caught an exception: " + "; ".join(
            r.getMessage() + (" " + repr(r.exc_info[1]) if r.exc_info else "") for r in self.records)


_PROTOCOL_LOG = logging.getLogger("shardbroker.transport.websocket.protocol")


def check_proxy(data: bytes) -> bytes | None:
    """The bytes after a complete PROXY header, or None when the acceptor would stop here."""
    seen = data[:proxy.MAX_LENGTH]  # what the acceptor peeks
    try:
        parsed = proxy.parse(seen)
    except proxy.ProxyError:
        return None
    if parsed is None:
        assert len(seen) < proxy.MAX_LENGTH, "a full peek still needs more bytes"
        return None
    length, peer = parsed
    assert proxy.HEADER <= length <= len(seen), f"header length {length} of {len(seen)} bytes"
    assert peer is None or peer.rpartition(":")[2].isdigit(), f"address {peer!r}"
    assert proxy.parse(seen[:length]) == parsed, "the header alone parses differently"
    for cut in {0, 1, 12, proxy.HEADER - 1, proxy.HEADER, length - 1}:
        if cut < length:
            assert proxy.parse(seen[:cut]) is None, f"prefix of {cut} bytes is not 'need more'"
    return data[length:]


def _feed_ws(pieces: list[bytes], max_size: int) -> tuple[bytes, bool, bool]:
    """(MQTT bytes, over, open) after feeding ``pieces`` until the connection is over."""
    errors = _Errors()
    _PROTOCOL_LOG.addHandler(errors)
    try:
        return _feed_framer(pieces, max_size, errors)
    finally:
        _PROTOCOL_LOG.removeHandler(errors)


def _feed_framer(pieces: list[bytes], max_size: int, errors: _Errors) -> tuple[bytes, bool, bool]:
    framer = WsFramer(PATH, max_size)
    mqtt: list[bytes] = []
    replies = b""
    over = False
    for piece in pieces:
        out, reply, over = framer.feed(piece)
        replies += reply
        # The first bytes back are the HTTP response (or nothing, for a request that does
        # not parse), never a frame.
        assert replies[:9] == b"HTTP/1.1 "[:len(replies)], f"first bytes back: {replies[:40]!r}"
        errors.check()
        assert isinstance(out, bytes) and isinstance(reply, bytes) and isinstance(over, bool)
        if not framer.open:
            assert not out, f"{len(out)} MQTT bytes before the handshake was accepted"
            assert over or framer._seen <= MAX_REQUEST, "an over-long handshake goes on"
        mqtt.append(out)
        if over:
            break
    if not over:
        assert isinstance(framer.eof(), bytes)
        assert isinstance(framer.close(), bytes)
        errors.check()
    return b"".join(mqtt), over, framer.open


def check_ws(data: bytes, seed: int, max_size: int) -> bytes:
    """The MQTT bytes a WebSocket client's stream gives, checked as described above."""
    split = _feed_ws(chunks(data, seed or 1), max_size)
    whole = _feed_ws([data], max_size)
    assert whole == split, f"whole: {whole!r}, cut: {split!r}"
    return split[0]


def check_connect(data: bytes, seed: int, max_size: int) -> Connect | None:
    """The acceptor's CONNECT read (``Acceptor._read`` and ``_connect``)."""
    if not data or data[0] != 0x10:
        return None  # closed at once: the first packet is not a CONNECT
    reader = codec.PacketReader(max_packet_size=max_size)
    raw: list[tuple[int, memoryview | bytes]] = []
    try:
        for piece in chunks(data, seed or 1):
            raw = reader.feed_raw(piece)
            if raw:
                break
    except ProtocolError:
        return None
    if not raw:
        return None
    first, body = raw[0]
    assert first == 0x10
    try:
        version = codec.connect_version(body)
    except ProtocolError:
        level = _level(body)
        assert level is None or 0 <= level <= 255
        return None
    try:
        connect = codec.decode(first, body, version)
    except ProtocolError:
        return None
    assert isinstance(connect, Connect) and connect.protocol_version == version
    connect.client_id.encode("utf-8", "surrogatepass")
    return connect


def check(data: bytes) -> Connect | None:
    """Check one input; return the CONNECT the acceptor would hand on (for the seed tests)."""
    if len(data) < 2:
        return None
    listener, seed, stream = data[0], data[1], data[2:]
    max_size = MAX_SIZES[(listener >> 2) & 3]
    if listener & 1:
        rest = check_proxy(stream)
        if rest is None:
            return None
        stream = rest
    if listener & 2:
        stream = check_ws(stream, seed, max_size)
    return check_connect(stream, seed, max_size)


if __name__ == "__main__":
    fuzz(check)
