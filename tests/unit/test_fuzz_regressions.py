"""Inputs the fuzz targets (``tests/fuzz/``) found, each kept as a plain test of the code it
broke, with the exact bytes. A fuzz input starts with the target's two control bytes; the
bytes here are what follows them (what the client sent).
"""

from __future__ import annotations

from shardbroker.transport.websocket import WsFramer

MAX_PACKET_SIZE = 1_048_576


def _ws(*pieces: bytes) -> tuple[bytes, bytes, bool, bool]:
    """Feed ``pieces`` to a new framer: (MQTT bytes, bytes back, over, open)."""
    framer = WsFramer("/mqtt", MAX_PACKET_SIZE)
    mqtt, back, over = b"", b"", False
    for piece in pieces:
        out, reply, over = framer.feed(piece)
        mqtt, back = mqtt + out, back + reply
        if over:
            break
    return mqtt, back, over, framer.open


# fuzz_acceptor_input, crash-9581d673: a request refused (no "Upgrade: websocket", 426) with
# a CONNECT in a binary frame and a ping behind it in the same read. The frames were parsed
# with the request: the CONNECT came out as MQTT bytes of a connection never opened, and the
# pong went out ahead of the HTTP response.
REFUSED_WITH_FRAMES = bytes.fromhex(
    "474554202f6d71747420485454502f312e310d0a486f73743a2062726f6b65722e6578616d706c650d0a"
    "557067726164653a20776164650d0a5365632d576562536f636b65742d4b65793a204d4445794d7a5131"
    "4e6a63344f5746695932526c5a673d3d0d0a5365632d576562536f636b65742d56657273696f6e3a2031"
    "330d0a5365632d5765536f636b65742d56657273696f6e3a2031330d0a5365632d576562536f636b6574"
    "2d50726f746f636f6c3a206d7174740d0a0d0a02851f2e3d4c0f3a3d485289841f2e3d4c6f47532b8091"
    "1f2e3d4c4e7a69491d2e01490e2e3d4c152e3f2f2a"
)


def test_frames_behind_a_refused_request_are_not_read() -> None:
    mqtt, back, over, opened = _ws(REFUSED_WITH_FRAMES)
    assert (mqtt, over, opened) == (b"", True, False)
    assert back.startswith(b"HTTP/1.1 426 ")
    assert b"\x8a" not in back.partition(b"\r\n\r\n")[0], "no pong ahead of the response"


def test_a_ping_behind_an_accepted_request_is_answered_after_the_101() -> None:
    request = REFUSED_WITH_FRAMES.replace(b"Upgrade: wade", b"Upgrade: websocket").replace(
        b"Host: broker.example", b"Connection: Upgrade")
    mqtt, back, over, opened = _ws(request)
    assert opened and not over
    assert back.startswith(b"HTTP/1.1 101 ")
    assert back.partition(b"\r\n\r\n")[2] == b"\x8a\x04ping"  # the pong, after the response
    # The two fragments of the binary message: a 5.0 CONNECT.
    assert mqtt == bytes.fromhex("101400044d5154540502003c05110000000a00026335")
