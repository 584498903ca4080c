"""Counting open connections (limits.max_connections, max_connections_per_address), the close
notices of a hand-off link, and the client's address behind trusted proxies (X-Forwarded-For,
Forwarded). No broker, no event loop."""

from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from shardbroker.process.connection_counts import PER_ADDRESS, TOTAL, ConnectionCounts, HandedOff
from shardbroker.transport import forwarded
from shardbroker.transport.fd_passing import ClosedReader, ClosedWriter, encode_closed

# --------------------------------------------------------------------------- counting


def test_the_total_limit_refuses_and_a_close_frees_a_slot() -> None:
    counts = ConnectionCounts(max_total=2, max_per_address=0)
    assert counts.admit(None) is None and counts.admit(None) is None
    assert counts.admit(None) == TOTAL and counts.total == 2 and counts.refused_total == 1
    counts.release(None)
    assert counts.admit(None) is None and counts.total == 2


def test_zero_means_no_limit() -> None:
    counts = ConnectionCounts(max_total=0, max_per_address=0)
    for _ in range(10_000):
        assert counts.admit(None) is None
    assert counts.total == 10_000 and not counts.per_address


def test_per_address_limit_counts_each_address() -> None:
    counts = ConnectionCounts(max_total=0, max_per_address=2)
    assert [counts.admit("10.0.0.1") for _ in range(3)] == [None, None, PER_ADDRESS]
    assert counts.admit("10.0.0.2") is None
    assert (counts.at("10.0.0.1"), counts.at("10.0.0.2"), counts.total) == (2, 1, 3)
    counts.release("10.0.0.1")
    assert counts.admit("10.0.0.1") is None
    assert counts.refused_address == 1


def test_the_total_is_checked_before_the_address() -> None:
    counts = ConnectionCounts(max_total=1, max_per_address=1)
    assert counts.admit("a") is None
    assert counts.admit("a") == TOTAL  # both are over: the total is the one named
    assert counts.refused_address == 0


def test_moving_to_the_real_address() -> None:
    counts = ConnectionCounts(max_total=0, max_per_address=1)
    assert counts.admit(None) is None  # a PROXY listener before its header
    assert counts.move(None, "192.0.2.1") and counts.at("192.0.2.1") == 1
    assert counts.admit("10.0.0.9") is None  # the trusted proxy
    assert not counts.move("10.0.0.9", "192.0.2.1")  # the client is at its limit: stays where it was
    assert counts.at("10.0.0.9") == 1 and counts.refused_address == 1
    counts.release("10.0.0.9")
    assert counts.move("192.0.2.1", "192.0.2.2") and counts.at("192.0.2.1") == 0
    assert counts.total == 1


def test_counts_against_a_model() -> None:
    rng = random.Random(7)
    counts = ConnectionCounts(max_total=20, max_per_address=4)
    model: list[str | None] = []
    for _ in range(5000):
        if model and rng.random() < 0.45:
            counts.release(model.pop(rng.randrange(len(model))))
            continue
        address = rng.choice([None, "a", "b", "c", "d", "e"])
        over = counts.admit(address)
        if len(model) >= 20:
            assert over == TOTAL
        elif address is not None and model.count(address) >= 4:
            assert over == PER_ADDRESS
        else:
            assert over is None
            model.append(address)
        assert counts.total == len(model)
        for a in "abcde":
            assert counts.at(a) == model.count(a)


def test_handed_off_connections_by_number() -> None:
    link = HandedOff()
    link.handed("10.0.0.1")  # 0
    link.handed("10.0.0.2")  # 1
    link.handed(None)  # 2
    assert len(link) == 3
    assert link.closed([1, 7]) == ["10.0.0.2"]  # an unknown number is not released
    assert link.closed([1]) == []  # nor one twice
    assert sorted(link.gone(), key=str) == ["10.0.0.1", None]


def test_without_a_per_address_limit_only_the_number_is_kept() -> None:
    link = HandedOff(keyed=False)
    for _ in range(5):
        link.handed(None)
    assert len(link) == 5 and link._open is None
    assert link.closed([0, 3]) == [None, None] and len(link) == 3
    assert link.gone() == [None] * 3 and link.closed([4]) == [] and len(link) == 0


def test_a_broken_link_releases_what_is_still_open() -> None:
    link = HandedOff()
    for host in ("a", "b", None):
        link.handed(host)
    link.closed([1])
    assert link.gone() == ["a", None]
    assert link.gone() == [] and len(link) == 0


def test_numbers_wrap_at_32_bits() -> None:
    link = HandedOff()
    link._next = 0xFFFFFFFF
    link.handed("a")
    link.handed("b")
    assert link.closed([0xFFFFFFFF, 0]) == ["a", "b"]


# --------------------------------------------------------------------------- close notices


def test_close_notices_in_any_chunking() -> None:
    data = encode_closed([0, 1, 65536, 0xFFFFFFFF])
    for cut in range(len(data) + 1):
        reader = ClosedReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [0, 1, 65536, 0xFFFFFFFF]


def test_the_writer_sends_a_batch_and_keeps_what_the_socket_does_not_take() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = ClosedWriter(a)
        assert writer.add(5) and not writer.add(6)  # the first asks for a flush
        assert writer.flush() is False
        assert ClosedReader().feed(b.recv(100)) == [5, 6]
        for n in range(100_000):  # more than the socket buffers hold
            writer.add(n)
        assert writer.flush() is True
        reader, got = ClosedReader(), []
        b.setblocking(False)
        waiting = True
        while waiting or _readable(b):
            while _readable(b):
                got += reader.feed(b.recv(1 << 16))
            waiting = writer.flush()
        assert got == list(range(100_000))
    finally:
        a.close()
        b.close()


def _readable(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        return False


def test_the_writer_drops_notices_for_a_gone_acceptor() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    a.setblocking(False)
    writer = ClosedWriter(a)
    writer.add(1)
    assert writer.flush() is False  # EPIPE: nothing to wait for
    a.close()


# --------------------------------------------------------------------------- X-Forwarded-For

TRUSTED = forwarded.networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


def _resolve(peer: str, xff: list[str] | None = None, fwd: list[str] | None = None) -> str | None:
    hop = forwarded.resolve(peer, TRUSTED, xff or [], fwd or [])
    return None if hop is None else forwarded.format_hop(hop)


def test_the_rightmost_untrusted_address_is_the_client() -> None:
    assert _resolve("10.0.0.1:5000", ["203.0.113.9"]) == "203.0.113.9:0"
    # the client wrote its own X-Forwarded-For; the proxies appended the real hops
    assert _resolve("10.0.0.1:5000", ["1.1.1.1, 203.0.113.9, 10.2.2.2"]) == "203.0.113.9:0"
    assert _resolve("10.0.0.1:5000", ["1.1.1.1", "203.0.113.9", "10.2.2.2"]) == "203.0.113.9:0"  # header lines
    assert _resolve("10.0.0.1:5000", ["10.3.3.3, 10.2.2.2"]) == "10.3.3.3:0"  # all trusted: the leftmost


def test_an_untrusted_peer_is_not_believed() -> None:
    assert _resolve("198.51.100.1:5000", ["203.0.113.9"]) is None
    assert forwarded.resolve("10.0.0.1:5000", (), ["203.0.113.9"], []) is None  # no trusted proxies
    assert _resolve("10.0.0.1:5000") is None  # no header


def test_address_forms() -> None:
    assert _resolve("10.0.0.1:1", ["203.0.113.9:4711"]) == "203.0.113.9:4711"
    assert _resolve("10.0.0.1:1", ["2001:db8::17"]) == "[2001:db8::17]:0"
    assert _resolve("10.0.0.1:1", ["[2001:db8::17]:4711"]) == "[2001:db8::17]:4711"
    assert _resolve("10.0.0.1:1", ["::ffff:203.0.113.9"]) == "203.0.113.9:0"
    assert _resolve("[2001:db8:ffff::1]:443", ["203.0.113.9"]) == "203.0.113.9:0"  # a trusted IPv6 peer
    assert _resolve("2001:db8:ffff::1:443", ["203.0.113.9"]) == "203.0.113.9:0"  # as a socket writes it


def test_the_forwarded_header() -> None:
    assert _resolve("10.0.0.1:1", fwd=['for=192.0.2.60;proto=http;by=203.0.113.43']) == "192.0.2.60:0"
    assert _resolve("10.0.0.1:1", fwd=['for="[2001:db8:cafe::17]:4711"']) == "[2001:db8:cafe::17]:4711"
    assert _resolve("10.0.0.1:1", fwd=['For=192.0.2.43, for=198.51.100.17, for=10.9.9.9']) == "198.51.100.17:0"
    # X-Forwarded-For wins when both are there
    assert _resolve("10.0.0.1:1", ["203.0.113.1"], ["for=203.0.113.2"]) == "203.0.113.1:0"


@pytest.mark.parametrize("xff, fwd", [
    (["not-an-ip"], None), (["203.0.113.9, "], None), (["1.2.3.4:99999"], None), (["[2001:db8::1"], None),
    (["300.1.1.1"], None), ([", ".join(["192.0.2.1"] * 65)], None),
    (None, ["for=unknown"]), (None, ["for=_hidden"]), (None, ["proto=https"]), (None, ['for="192.0.2.1']),
    (None, ["for"]),
])
def test_malformed_values_are_errors(xff: list[str] | None, fwd: list[str] | None) -> None:
    with pytest.raises(forwarded.ForwardedError):
        _resolve("10.0.0.1:1", xff, fwd)
    assert _resolve("198.51.100.1:1", xff, fwd) is None  # from an untrusted peer, not even looked at


def test_host_of() -> None:
    assert forwarded.host_of("192.0.2.1:80") == "192.0.2.1"
    assert forwarded.host_of("[2001:db8::1]:80") == "2001:db8::1"
    assert forwarded.host_of("2001:db8::1:80") == "2001:db8::1"
    assert forwarded.host_of("192.0.2.1") == "192.0.2.1"


def test_every_hop_round_trips() -> None:
    rng = random.Random(3)
    for _ in range(500):
        ip = (ipaddress.IPv4Address(rng.getrandbits(32)) if rng.random() < 0.5
              else ipaddress.IPv6Address(rng.getrandbits(128)))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            continue
        hop = (ip, rng.randrange(65536))
        assert forwarded.parse_hop(forwarded.format_hop(hop)) == hop
