"""Retained messages between two nodes over the real bus: each node a worker 0's broker core
on its own LMDB stores, its ``Bus`` listening on loopback ``tcp://`` with CURVE, both in one
event loop with the worker's ``LoopScheduler``; batches from the other node are named by their
sender (``from_sender``) and handed to the core, as a worker does.

What is checked: a node that becomes reachable is caught up (hundreds of entries and a
tombstone, over several pages) and the digests agree; then a retained message set, replaced
and deleted on either node reaches the other's store. A catch-up toward a node that does not
answer stops once a few batches wait for it, rather than fill (and shed) the bus's backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bus_remote import free_port, run_until

from shardbroker.config import load_config
from shardbroker.core.broker import Broker
from shardbroker.core.retained import PAGE, WAITING_MAX
from shardbroker.core.session import Message
from shardbroker.peer.bus import Bus, curve_keypair, endpoint, remote_endpoint, remote_peer
from shardbroker.peer.messages import PeerMessage, from_sender
from shardbroker.process.worker import LoopScheduler, now
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore


class Member:
    """A node of one worker: stores, broker core and bus (as ``test_bus_remote.Node``, with the
    batches of other nodes handed to the core)."""

    def __init__(self, tmp: Path, name: str, number: int, loop: asyncio.AbstractEventLoop) -> None:
        data = tmp / name
        self.number = number
        self.keys = curve_keypair()
        self.advertise = f"127.0.0.1:{free_port()}"
        self.bus = Bus(0, [endpoint(str(tmp), 0).replace("shard-0", f"{name}-0")], lambda items: None)
        self.bus.listen_remote(remote_endpoint(self.advertise, 0), *self.keys, self._from_node)
        self.bus.identify(number, number)
        self.config = load_config(None, {
            "server.data_dir": str(data), "cluster.node_id": name,
            "cluster.etcd_endpoints": ["http://127.0.0.1:2379"], "cluster.advertise": "127.0.0.1:7000"})
        self.store = ShardStore.open(data, 0, 1, sync=False)
        self.retained = RetainedStore.open(data, sync=False)
        self.broker = Broker(self.config, 0, 1, self.store, self.retained, self.bus, LoopScheduler(loop), now())
        self.bus.start(loop)

    def _from_node(self, number: int, worker: int, lease: int, items: list[PeerMessage]) -> None:
        """What a worker does with another node's batch."""
        from_sender(items, remote_peer(number, worker))
        self.broker.peer_messages(items, now())

    def reach(self, other: Member) -> int:
        """Let ``other`` in, connect to it, and tell the core: its peer id here."""
        self.bus.allow(frozenset({other.keys[0]}))
        peer = remote_peer(other.number, 0)
        self.bus.connect(peer, remote_endpoint(other.advertise, 0), other.keys[0])
        return peer

    def retain(self, topic: str, payload: bytes) -> None:
        """A retained publish of this node (a client's, a will: all enter ``route``)."""
        self.broker.peers.route(Message(topic, payload, 1, True))

    def close(self) -> None:
        self.bus.close()
        self.store.close()
        self.retained.close()


def payload(store: RetainedStore, topic: str) -> bytes | None:
    msg = store.get(topic)
    return None if msg is None else msg.payload


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_two_nodes_converge_over_the_bus(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a, b = Member(tmp_path, "n1", 1, loop), Member(tmp_path, "n2", 2, loop)
    try:
        for i in range(2 * PAGE + 50):  # a's messages before b is reachable
            a.retain(f"fleet/{i:04d}/state", b"v%d" % i)
        a.retain("fleet/0007/state", b"")  # and a tombstone
        b.retain("b/own", b"from-b")
        run_until(loop, lambda: not a.broker.commit.pending() and not b.broker.commit.pending())
        assert a.retained.digest() != b.retained.digest()

        to_b, to_a = a.reach(b), b.reach(a)
        a.broker.peers.peer_added(to_b)
        b.broker.peers.peer_added(to_a)
        assert run_until(loop, lambda: a.retained.digest() == b.retained.digest(), timeout=20)
        assert b.retained.digest()[0] == 2 * PAGE + 50  # a's, less the deleted one, and b's own
        assert b.retained.get("fleet/0007/state") is None
        assert b.retained.stamp("fleet/0007/state") == a.retained.stamp("fleet/0007/state")

        a.retain("live/x", b"1")
        assert run_until(loop, lambda: payload(b.retained, "live/x") == b"1")
        b.retain("live/x", b"2")  # b's later write wins on both
        assert run_until(loop, lambda: payload(a.retained, "live/x") == b"2")
        a.retain("live/x", b"")
        assert run_until(loop, lambda: b.retained.get("live/x") is None)
        assert run_until(loop, lambda: a.retained.digest() == b.retained.digest())
        assert a.broker.retained_sync.catching_up == {} and b.broker.retained_sync.catching_up == {}
    finally:
        a.close()
        b.close()


def test_a_catch_up_toward_a_silent_node_waits(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    a = Member(tmp_path, "n1", 1, loop)
    try:
        for i in range(40 * PAGE):  # about 1 MB of Retain messages
            a.retain(f"fleet/{i:05d}/state", b"x" * 64)
        run_until(loop, lambda: not a.broker.commit.pending())
        silent = remote_peer(2, 0)  # registered, but nothing listens at its address
        a.bus.connect(silent, remote_endpoint(f"127.0.0.1:{free_port()}", 0), curve_keypair()[0])
        a.broker.peers.peer_added(silent)
        assert run_until(loop, lambda: a.bus.waiting(silent) >= WAITING_MAX)
        sent = a.broker.retained_sync.stats["catchup_sent"]
        run_until(loop, lambda: False, timeout=0.5)  # half a second more: nothing more goes
        assert a.broker.retained_sync.stats["catchup_sent"] == sent < 40 * PAGE
        assert a.bus.waiting(silent) <= WAITING_MAX + 1 and a.bus.shed == 0
        assert silent in a.broker.retained_sync.catching_up
        a.broker.peers.peer_removed(silent)
        assert a.broker.retained_sync.catching_up == {}
    finally:
        a.close()
