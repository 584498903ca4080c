"""Socket hand-off framing over a real Unix socket pair: descriptors and frames pair up in order."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from shardbroker.transport.fd_passing import MAX_FDS, Handoff, HandoffReceiver, send_handoffs


def _pipes(n: int) -> list[tuple[int, int]]:
    return [os.pipe() for _ in range(n)]


def _receive_all(receiver: HandoffReceiver, want: int) -> list:
    got = []
    for _ in range(1000):
        got.extend(receiver.read())
        if len(got) >= want:
            break
    return got


@pytest.mark.parametrize("count", [1, 7, MAX_FDS])
def test_batch_of_descriptors_pairs_with_frames(count: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    pipes = _pipes(count)
    try:
        batch = [Handoff(w, None if i % 3 == 0 else f"id-{i}", bytes([i]) * (i + 1),
                         None if i % 2 else f"10.0.0.{i}:{1000 + i}", "CN é" if i % 4 == 1 else None)
                 for i, (_r, w) in enumerate(pipes)]
        send_handoffs(a, batch)
        receiver = HandoffReceiver(b)
        got = _receive_all(receiver, count)
        assert [(h.client_id, h.initial, h.peer, h.identity) for h in got] == [
            (h.client_id, h.initial, h.peer, h.identity) for h in batch]
        # Each received descriptor is the write end of the matching pipe: write through it, read the other end.
        for i, h in enumerate(got):
            os.write(h.fd, b"x%d" % i)
            os.close(h.fd)
            assert os.read(pipes[i][0], 16) == b"x%d" % i
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        a.close()
        b.close()


def test_large_initial_bytes_arrive_over_several_reads() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    r, w = os.pipe()
    big = os.urandom(600_000)  # more than one recvmsg buffer
    try:
        t = threading.Thread(target=send_handoffs, args=(a, [Handoff(w, "c", big), Handoff(r, None, b"tail")]))
        t.start()
        receiver = HandoffReceiver(b)
        got: list = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(receiver.read())
        t.join()
        assert got[0].client_id == "c" and got[0].initial == big
        assert got[1].client_id is None and got[1].initial == b"tail"
        for h in got:
            os.close(h.fd)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("count", [0, MAX_FDS + 1])
def test_batch_size_is_bounded(count: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError, match="hand-off batch"):
            send_handoffs(a, [Handoff(0, None, b"")] * count)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- PROXY protocol v2

def _v2(command: int, family: int, body: bytes, tlv: bytes = b"") -> bytes:
    from shardbroker.transport.proxy import SIGNATURE

    payload = body + tlv
    return SIGNATURE + bytes([0x20 | command, family]) + len(payload).to_bytes(2, "big") + payload


def test_proxy_v2_headers() -> None:
    import ipaddress

    from shardbroker.transport.proxy import ProxyError, parse

    v4 = _v2(1, 0x11, bytes([203, 0, 113, 7, 10, 0, 0, 1]) + (40000).to_bytes(2, "big") + (1883).to_bytes(2, "big"),
             tlv=b"\x04\x00\x01x")
    assert parse(v4 + b"\x10rest") == (len(v4), "203.0.113.7:40000")  # what follows is not taken
    assert parse(v4[:20]) is None and parse(v4[:5]) is None  # not complete yet
    v6 = _v2(1, 0x21, ipaddress.IPv6Address("2001:db8::9").packed + bytes(16) + (5).to_bytes(2, "big") + bytes(2))
    assert parse(v6) == (len(v6), "[2001:db8::9]:5")
    assert parse(_v2(0, 0x00, b"")) == (16, None)  # LOCAL: a health check of the proxy
    for bad in (b"\x10\x0c\x00\x04MQTT", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", _v2(2, 0x11, bytes(12)),
                _v2(1, 0x31, bytes(216))):
        with pytest.raises(ProxyError):
            parse(bad)
