"""``WsFramer`` without sockets: the limit on the opening handshake."""

from __future__ import annotations

import base64

from shardbroker.transport.websocket import MAX_REQUEST, WsFramer

KEY = base64.b64encode(b"0123456789abcdef").decode()


def _request(extra: str = "") -> bytes:
    return (f"GET /mqtt HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: mqtt\r\n{extra}\r\n").encode()


def _binary(payload: bytes) -> bytes:
    """A masked binary frame with a 2-byte extended length (126..65535 bytes)."""
    mask = b"\x01\x02\x03\x04"
    return (b"\x82\xfe" + len(payload).to_bytes(2, "big") + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_a_request_longer_than_max_request_is_refused_however_it_is_cut() -> None:
    request = _request("X-Padding: " + "a" * MAX_REQUEST + "\r\n")
    for size in (len(request), 1000, 1):
        framer = WsFramer("/mqtt", 1 << 20)
        for at in range(0, len(request), size):
            mqtt, reply, over = framer.feed(request[at:at + size])
            if over:
                break
        assert over and not mqtt and not framer.open, size
        assert reply.startswith(b"HTTP/1.1 431 ")


def test_only_the_request_counts_towards_max_request() -> None:
    payload = b"\x10" + bytes(MAX_REQUEST)
    framer = WsFramer("/mqtt", 1 << 20)
    mqtt, reply, over = framer.feed(_request() + _binary(payload))
    assert framer.open and not over
    assert reply.startswith(b"HTTP/1.1 101 ")
    assert mqtt == payload


def test_nothing_is_read_after_a_text_frame_fails_the_connection() -> None:
    # [MQTT-6.0.0-1] a text frame closes the connection; RFC 6455 7.1.7: nothing the client
    # sent after it is processed, not a binary frame read with it either.
    framer = WsFramer("/mqtt", 1 << 20)
    framer.feed(_request())
    mask = b"\x01\x02\x03\x04"
    text = b"\x81\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"hi"))
    binary = b"\x82\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\xc0\x00"))
    mqtt, reply, over = framer.feed(text + binary)
    assert over and mqtt == b""
    assert reply.startswith(b"\x88")  # the close frame (1003)
