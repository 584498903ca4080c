"""The bus between nodes (``peer/bus.py``): real ZeroMQ ``tcp://`` sockets on loopback with CURVE,
two ``Bus`` objects in one event loop, each with its own context and ZAP handler.

What is checked: a batch reaches the other node with its sender's header (node number, worker,
lease) and in order; only a registered node's key is let in (a client whose key was not
``allow``ed, or one that expects another server key, gets nothing through), but a key allowed
while its handshake waits is; a worker of another node that restarts (and at first refuses
our key) is reached again; ``disconnect`` forgets a peer, and a message sent to it later is dropped without failing the flush; ``from_sender`` renames the sender of
each kind of message.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardbroker.peer.bus import (
    REMOTE_BASE,
    Bus,
    curve_keypair,
    endpoint,
    remote_endpoint,
    remote_peer,
)
from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    ForwardAck,
    Hold,
    PeerMessage,
    RouteAdd,
    RoutesQuery,
    from_sender,
)

Received = list[tuple[int, int, int, list[PeerMessage]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One node's worker 0: its bus, listening on loopback, and what reached it."""

    def __init__(self, tmp: Path, name: str, number: int, lease: int) -> None:
        self.keys = curve_keypair()
        self.advertise = f"127.0.0.1:{free_port()}"
        self.got: Received = []
        self.bus = Bus(0, [endpoint(str(tmp), 0).replace("shard-0", f"{name}-0")], lambda items: None)
        self.bus.zap_wait = 0.3
        self.bus.listen_remote(remote_endpoint(self.advertise, 0), *self.keys,
                               lambda n, w, lease, items: self.got.append((n, w, lease, items)))
        self.bus.identify(number, lease)
        self.number = number

    def reach(self, other: Node, key: str | None = None) -> int:
        peer = remote_peer(other.number, 0)
        self.bus.connect(peer, remote_endpoint(other.advertise, 0), key or other.keys[0])
        return peer


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, check: object, timeout: float = 5.0) -> bool:
    async def wait() -> bool:
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if check():  # type: ignore[operator]
                return True
            await asyncio.sleep(0.01)
        return False
    return loop.run_until_complete(wait())


def test_remote_peer_ids_and_endpoints() -> None:
    assert remote_peer(1, 0) == REMOTE_BASE
    assert remote_peer(255, 255) == 65535  # fits the outbox's u16 peer key
    assert remote_endpoint("10.0.0.7:7100", 2) == "tcp://10.0.0.7:7102"
    assert remote_endpoint("[::1]:7100", 1) == "tcp://[::1]:7101"


def test_batches_cross_with_their_sender_and_in_order(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a, b = Node(tmp_path, "a", 1, 0x1111), Node(tmp_path, "b", 2, 0x2222)
    try:
        a.bus.allow(frozenset({b.keys[0]}))
        b.bus.allow(frozenset({a.keys[0]}))
        a.bus.start(loop)
        b.bus.start(loop)
        to_b = a.reach(b)
        assert to_b in a.bus.peers
        for i in range(2000):
            a.bus.send(to_b, Forward(f"t/{i}", b"x" * 64, 1, False))
        a.bus.flush()
        assert run_until(loop, lambda: sum(len(items) for *_, items in b.got) == 2000 or a.bus.backlog()
                         and a.bus.flush() is None)
        assert {(n, w, lease) for n, w, lease, _ in b.got} == {(1, 0, 0x1111)}
        topics = [m.topic for *_, items in b.got for m in items if isinstance(m, Forward)]
        assert topics == [f"t/{i}" for i in range(2000)]
    finally:
        a.bus.close()
        b.bus.close()


def test_only_allowed_keys_and_the_right_server_key_get_through(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a, b, c = (Node(tmp_path, "a", 1, 1), Node(tmp_path, "b", 2, 2), Node(tmp_path, "c", 3, 3))
    try:
        b.bus.allow(frozenset({a.keys[0]}))  # c is no registered node for b
        for n in (a, b, c):
            n.bus.start(loop)
        from_c = c.reach(b)
        c.bus.send(from_c, RoutesQuery(0))
        c.bus.flush()
        wrong = a.reach(b, key=c.keys[0])  # a believes b's key is c's: the handshake fails
        a.bus.send(wrong, RoutesQuery(0))
        a.bus.flush()
        assert run_until(loop, lambda: b.bus.refused_keys >= 1)
        run_until(loop, lambda: False, timeout=0.5)
        assert b.got == []
        a.bus.disconnect(wrong)
        assert wrong not in a.bus.peers
        right = a.reach(b)
        a.bus.send(right, RoutesQuery(0))
        a.bus.flush()
        assert run_until(loop, lambda: len(b.got) == 1)
        assert b.got[0][:3] == (1, 0, 1)
    finally:
        for n in (a, b, c):
            n.bus.close()


def test_a_key_allowed_while_its_handshake_waits_gets_through(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a, b = Node(tmp_path, "a", 1, 1), Node(tmp_path, "b", 2, 2)
    b.bus.zap_wait = 5.0
    try:
        a.bus.start(loop)
        b.bus.start(loop)
        peer = a.reach(b)  # b does not know a's key yet (its grant is older than a's)
        a.bus.send(peer, RoutesQuery(0))
        a.bus.flush()
        run_until(loop, lambda: False, timeout=0.3)
        assert b.got == []
        b.bus.allow(frozenset({a.keys[0]}))
        assert run_until(loop, lambda: len(b.got) == 1)
        assert b.bus.refused_keys == 0
    finally:
        a.bus.close()
        b.bus.close()


def test_a_restarted_worker_of_another_node_is_reached_again(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a, b = Node(tmp_path, "a", 1, 1), Node(tmp_path, "b", 2, 2)
    b.bus.allow(frozenset({a.keys[0]}))
    a.bus.start(loop)
    b.bus.start(loop)
    peer = a.reach(b)
    again: Bus | None = None
    try:
        a.bus.send(peer, RoutesQuery(0))
        a.bus.flush()
        assert run_until(loop, lambda: len(b.got) == 1)
        b.bus.close()  # b's worker is gone; a goes on sending
        for i in range(300):
            a.bus.send(peer, Forward(f"t/{i}", b"x", 1, False))
            a.bus.flush()
            run_until(loop, lambda: False, timeout=0.001)
        assert a.bus.backlog() > 0
        # b's worker again, on the same address with the same keys; it knows a's key only
        # after its first refusal (its grant comes late): libzmq gives up on that connection
        got: Received = []
        again = Bus(0, [endpoint(str(tmp_path), 0).replace("shard-0", "b2-0")], lambda items: None)
        again.zap_wait = 0.0
        again.listen_remote(remote_endpoint(b.advertise, 0), *b.keys,
                            lambda n, w, lease, items: got.append((n, w, lease, items)))
        again.start(loop)
        assert run_until(loop, lambda: again is not None and again.refused_keys >= 1)
        again.allow(frozenset({a.keys[0]}))

        def arrived() -> bool:
            a.bus._send_backlog()
            return a.bus.backlog() == 0 and sum(len(items) for *_, items in got) >= 250
        assert run_until(loop, arrived, timeout=10)  # what the dead socket held is lost
        assert a.bus.renewed >= 1
        topics = [m.topic for *_, items in got for m in items if isinstance(m, Forward)]
        assert topics == sorted(topics, key=lambda t: int(t.split("/")[1]))  # in order
    finally:
        a.bus.close()
        if again is not None:
            again.close()


def test_a_message_for_a_forgotten_peer_is_dropped_and_the_others_still_leave(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    """The outbox resends to a worker of a node whose registration ended (it keeps what that
    worker did not acknowledge): the bus drops such a message rather than fail the flush, which
    would lose every batch after it and the commit's client output with it."""
    a, b, c = Node(tmp_path, "a", 1, 1), Node(tmp_path, "b", 2, 2), Node(tmp_path, "c", 3, 3)
    try:
        b.bus.allow(frozenset({a.keys[0]}))
        c.bus.allow(frozenset({a.keys[0]}))
        for n in (a, b, c):
            n.bus.start(loop)
        gone, live = a.reach(b), a.reach(c)
        a.bus.disconnect(gone)
        a.bus.send(gone, DurableForward(0, 7, Forward("t/gone", b"x", 1, False)))
        a.bus.send(live, RoutesQuery(0))
        a.bus.send(gone, ForwardAck(0, 3))
        a.bus.flush()
        assert a.bus.unreached == 2
        assert run_until(loop, lambda: len(c.got) == 1)
        assert b.got == []
    finally:
        for n in (a, b, c):
            n.bus.close()


def test_from_sender_names_the_remote_peer() -> None:
    forward = Forward("t", b"p", 1, False)
    items: list[PeerMessage] = [forward, DurableForward(0, 5, forward), ForwardAck(1, 4), RouteAdd(0, "a/#", 3, True),
                                Hold(1, "pub"), RoutesQuery(0)]
    from_sender(items, 513)
    assert items[0] is forward and forward.topic == "t"
    assert [getattr(m, "origin_shard", getattr(m, "shard", None)) for m in items[1:]] == [513] * 5
