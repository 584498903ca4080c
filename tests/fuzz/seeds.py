"""The seed corpora of the fuzz targets: valid inputs built with ``tests/mqttbytes.py``.

``python tests/fuzz/seeds.py`` rewrites ``tests/fuzz/corpus/<target>/``; ``test_fuzz.py``
checks that the committed files are what this module builds, and runs each through its
target. Each input starts with the target's two control bytes (see the targets).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mqttbytes as mb

CORPUS = Path(__file__).resolve().parent / "corpus"

# Control byte 0 of fuzz_codec: the protocol level the reader starts with.
_CODEC_LEVEL = {3: 0, 4: 1, 5: 2}


def _packets(v: int) -> dict[str, bytes]:
    """One of each packet a client or a server sends, in protocol level ``v``."""
    props5 = v == 5
    out = {
        "connect": mb.connect("c1", v),
        "connect-full": mb.connect(
            "client-2", v, clean=False, keepalive=30,
            will=mb.Will("w/t", b"bye", qos=1, retain=True,
                         props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, 5) if props5 else b""),
            username="user", password=b"pw",
            props=(mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 60) + mb.prop_u16(mb.RECEIVE_MAXIMUM, 10)
                   + mb.prop_pair(mb.USER_PROPERTY, "k", "v")) if props5 else b""),
        "connack": bytes([0x20, 2, 0, 0]) if v < 5 else mb.fixed(mb.CONNACK, 0, b"\x00\x00\x00"),
        "publish0": mb.publish("a/b", b"hello", version=v),
        "publish1": mb.publish("a/b", b"x" * 200, qos=1, pid=7, retain=True, version=v,
                               props=(mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1)
                                      + mb.prop_str(mb.CONTENT_TYPE, "text/plain")
                                      + mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 300))
                               if props5 else b""),
        "publish2": mb.publish("a/b", b"q2", qos=2, pid=9, dup=True, version=v),
        "puback": mb.puback(7, v, reason=0x10 if props5 else None),
        "pubrec": mb.pubrec(9, v),
        "pubrel": mb.pubrel(9, v, reason=0x92 if props5 else None,
                            props=mb.prop_str(mb.REASON_STRING, "gone") if props5 else b""),
        "pubcomp": mb.pubcomp(9, v),
        "subscribe": mb.subscribe(
            3, [("a/+", mb.subopts(1)), ("b/#", mb.subopts(2, True, True, 1) if props5 else 2)], v,
            props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 4) if props5 else b""),
        "suback": mb.fixed(mb.SUBACK, 0, mb.u16(3) + (b"\x00" if props5 else b"") + b"\x01\x80"),
        "unsubscribe": mb.unsubscribe(4, ["a/+", "b/#"], v),
        "unsuback": mb.fixed(mb.UNSUBACK, 0, mb.u16(4) + (b"\x00\x00\x11" if props5 else b"")),
        "pingreq": mb.pingreq(),
        "pingresp": mb.pingresp(),
        "disconnect": mb.disconnect(v, reason=0x04 if props5 else None),
    }
    if props5:
        out["auth"] = mb.auth(0x18, mb.prop_str(mb.AUTHENTICATION_METHOD, "SCRAM-SHA-1")
                              + mb.prop_bin(mb.AUTHENTICATION_DATA, b"\x01\x02"))
    return out


def codec_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for v in (3, 4, 5):
        packets = _packets(v)
        for name, packet in packets.items():
            seeds[f"v{v}-{name}"] = bytes([_CODEC_LEVEL[v], 0x2A]) + packet
        session = b"".join(packets[n] for n in ("connect", "subscribe", "publish1", "puback",
                                                "pingreq", "disconnect"))
        seeds[f"v{v}-session"] = bytes([_CODEC_LEVEL[v], 0x07]) + session
    # A 3.1.1 reader meets a 5.0 CONNECT and reads what follows as 5.0.
    seeds["v4-to-v5"] = bytes([_CODEC_LEVEL[4], 0x03]) + mb.connect("c5", 5) + _packets(5)["publish1"]
    # A small maximum packet size (control bits 2-3 = 1: 64 bytes).
    seeds["v4-too-large"] = bytes([_CODEC_LEVEL[4] | 1 << 2, 0x01]) + _packets(4)["publish1"]
    return seeds


WS_KEY = base64.b64encode(b"0123456789abcdef").decode()


def ws_upgrade(path: str = "/mqtt", protocol: str = "mqtt") -> bytes:
    """A client's opening handshake (RFC 6455 4.1) offering ``protocol``."""
    return (f"GET {path} HTTP/1.1\r\nHost: broker.example\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n").encode()


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    """A client's (masked) frame (RFC 6455 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def proxy_v2(family: int = 0x11, command: int = 1, address: bytes | None = None) -> bytes:
    """A PROXY protocol v2 header (the HAProxy specification, section 2.2)."""
    if address is None:
        address = {
            0x11: bytes([203, 0, 113, 7]) + bytes([10, 0, 0, 1]) + struct.pack("!HH", 51234, 1883),
            0x21: bytes(range(16)) + bytes(15) + b"\x01" + struct.pack("!HH", 51234, 1883),
            0x00: b"",
        }[family]
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, family])
            + struct.pack("!H", len(address)) + address)


def acceptor_seeds() -> dict[str, bytes]:
    proxy, ws = 1, 2
    connect4 = mb.connect("c1", 4)
    connect5 = mb.connect("c5", 5, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 10))
    connect3 = mb.connect("c3", 3, username="u", password=b"p")
    upgrade = ws_upgrade()
    return {
        "tcp-connect4": bytes([0, 0x11]) + connect4,
        "tcp-connect5": bytes([0, 0x12]) + connect5,
        "tcp-connect3": bytes([0, 0x13]) + connect3,
        "tcp-connect6": bytes([0, 0x14]) + mb.connect("c6", 6),
        "proxy-ipv4": bytes([proxy, 0x21]) + proxy_v2(0x11) + connect4,
        "proxy-ipv6": bytes([proxy, 0x22]) + proxy_v2(0x21) + connect5,
        "proxy-local": bytes([proxy, 0x23]) + proxy_v2(0x00, command=0) + connect4,
        "proxy-unspec-tlv": bytes([proxy, 0x24]) + proxy_v2(0x00, address=b"\x04\x00\x02ab") + connect4,
        "ws-connect": bytes([ws, 0x31]) + upgrade + ws_frame(0x2, connect4),
        "ws-fragmented": bytes([ws, 0x32]) + upgrade + ws_frame(0x2, connect5[:5], fin=False)
        + ws_frame(0x9, b"ping") + ws_frame(0x0, connect5[5:]),
        "ws-old-subprotocol": bytes([ws, 0x33]) + ws_upgrade(protocol="mqttv3.1")
        + ws_frame(0x2, connect3),
        "ws-text-then-close": bytes([ws, 0x34]) + upgrade + ws_frame(0x1, b"hi")
        + ws_frame(0x8, b"\x03\xe8"),
        "proxy-ws": bytes([proxy | ws, 0x35]) + proxy_v2(0x11) + upgrade + ws_frame(0x2, connect4),
    }


TARGETS = {"codec": codec_seeds, "acceptor_input": acceptor_seeds}


def file_name(name: str, data: bytes) -> str:
    return f"{name}-{hashlib.sha1(data).hexdigest()[:8]}"


def write() -> None:
    for target, build in TARGETS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, data in build().items():
            (folder / file_name(name, data)).write_bytes(data)


if __name__ == "__main__":
    write()
