"""The routes of a worker whose node's registration ended (``Peers.peer_removed``), driven
without a loop or sockets: a publisher's shard with two peers of other nodes, the messages
carried by the test.

What is checked: the lost worker's durable plain routes stay while a virtual shard it served
is not taken, and a QoS 1/2 publish matching them goes into the outbox for it (a QoS 0 one
does not, and its other routes go at once); they go when every one of its shards is taken
(``ShardsTaken``), also when the word came before this worker saw the node go, or when the
time to keep them runs out; a node back before that keeps them until it sends its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.peer.messages import DurableForward, Forward, PeerMessage, Routes, ShardsTaken
from shardbroker.protocol.packets import Publish

LOST, TAKER = 256, 512  # workers 0 of nodes 1 and 2
KEYS = (("t/#", True), ("clean/#", False), ("$share/g/s/#", True))


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "s", peers=[LOST, TAKER])
    h.peer_messages([Routes(LOST, KEYS), Routes(TAKER, ())])
    h.link.take()
    yield h
    h.close()


def lose(h: Harness, vshards: tuple[int, ...], keep: float = 5.0) -> None:
    """What the worker does when the lost node's registration ends: the bus no longer reaches
    it, and the shard hears which virtual shards it served."""
    h.link.peers.remove(LOST)
    h.broker.peers.peer_removed(LOST, vshards, keep=keep)
    h.run()


def sent_to_lost(h: Harness, topic: str, qos: int, pid: int) -> list[PeerMessage]:
    pub = h.connect(f"pub{pid}")
    pub.send(Publish(topic, b"m", qos, packet_id=pid if qos else None))
    return [m for peer, m in h.link.take() if peer == LOST and isinstance(m, DurableForward | Forward)]


def test_durable_routes_stay_until_every_shard_is_taken(shard: Harness) -> None:
    h = shard
    lose(h, (3, 7))
    assert h.broker.peers.routes.keys(LOST) == {"t/#": True}  # the durable plain one alone
    assert h.broker.stats["lost_routes_kept"] == 1
    out = sent_to_lost(h, "t/1", 1, 1)
    assert len(out) == 1 and isinstance(out[0], DurableForward)  # into the outbox
    assert h.broker.peers.outbox.pending_count() == 1
    assert sent_to_lost(h, "t/1", 0, 2) == []  # QoS 0 is not kept for a lost node
    assert sent_to_lost(h, "clean/1", 1, 3) == []
    h.peer_messages([ShardsTaken(TAKER, LOST, (3,))])
    assert len(sent_to_lost(h, "t/2", 2, 4)) == 1  # shard 7 is not taken yet
    h.peer_messages([ShardsTaken(TAKER, LOST, (7,))])
    assert h.broker.peers.routes.keys(LOST) == {}
    assert h.broker.stats["lost_routes_taken"] == 1
    assert sent_to_lost(h, "t/3", 1, 5) == []
    assert h.broker.stats["forwarded_to_lost"] == 2


def test_shards_taken_before_the_node_was_seen_to_go_count(shard: Harness) -> None:
    h = shard
    h.peer_messages([ShardsTaken(TAKER, LOST, (3, 7))])  # the taker's node saw the map first
    assert h.broker.peers.routes.keys(LOST) == dict(KEYS)  # still a live peer here
    lose(h, (3, 7))
    assert h.broker.peers.routes.keys(LOST) == {}
    assert h.broker.peers.lost == {}


def test_the_routes_go_when_the_time_runs_out(shard: Harness) -> None:
    h = shard
    lose(h, (3,), keep=5.0)
    h.advance(4.0)
    assert h.broker.peers.routes.keys(LOST) == {"t/#": True}
    h.advance(1.5)
    assert h.broker.peers.routes.keys(LOST) == {}
    assert h.broker.stats["lost_routes_expired"] == 1
    assert sent_to_lost(h, "t/1", 1, 1) == []


def test_a_worker_that_served_nothing_loses_its_routes_at_once(shard: Harness) -> None:
    h = shard
    lose(h, ())
    assert h.broker.peers.routes.keys(LOST) == {}
    assert h.broker.stats["lost_routes_kept"] == 0


def test_a_node_back_before_its_shards_are_taken_keeps_them_until_its_own_routes(shard: Harness) -> None:
    h = shard
    lose(h, (3,))
    h.link.peers.append(LOST)
    h.broker.peers.peer_added(LOST)
    h.run()
    assert h.broker.peers.lost == {}
    assert h.broker.peers.routes.keys(LOST) == {"t/#": True}
    h.advance(10.0)  # no deadline any more
    assert h.broker.peers.routes.keys(LOST) == {"t/#": True}
    h.peer_messages([Routes(LOST, (("u", True),))])
    assert h.broker.peers.routes.keys(LOST) == {"u": True}


def test_the_taker_tells_every_peer_and_itself(shard: Harness) -> None:
    h = shard
    lose(h, (3,))
    h.broker.shards_taken(LOST, [3], h.now)  # this shard took it
    h.run()
    assert [m for _, m in h.link.take() if isinstance(m, ShardsTaken)] == [ShardsTaken(0, LOST, (3,))]
    assert h.broker.peers.routes.keys(LOST) == {}
