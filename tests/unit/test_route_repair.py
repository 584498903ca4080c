"""Anti-entropy of the route tables (``Peers.sweep``, ``RouteDigest``): two broker cores, the
peer messages carried by the test. A route announcement lost on the way (the bus drops what
it sends to a worker of another node it does not reach) leaves the other shard's copy wrong;
the next digest shows it, and the routes are asked for and replaced, without the side effects
of a peer's restart. A copy that agrees costs nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.core.peers import DIGEST_EVERY
from shardbroker.peer.messages import PeerMessage, RouteDigest, RoutesAdd, RoutesQuery
from shardbroker.protocol.packets import Subscribe, Subscription


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    a = Harness(tmp_path / "a", peers=[1], shard=0, shards=2)
    b = Harness(tmp_path / "b", peers=[0], shard=1, shards=2)
    a.broker.peers.synced.add(1)
    yield a, b
    a.close()
    b.close()


def sent(h: Harness, kind: type) -> list[PeerMessage]:
    return [m for _peer, m in h.link.take() if isinstance(m, kind)]


def test_a_lost_route_announcement_is_repaired_by_the_next_digest(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    c = b.connect("sub")
    c.send(Subscribe(1, (Subscription("x/#", 1),)))
    assert sent(b, RoutesAdd)  # ... and lost on the way: the test does not carry it
    assert a.broker.peers.routes.digest(1) != b.broker.peers.routes.digest(1)
    b.advance(DIGEST_EVERY + 1)
    digests = sent(b, RouteDigest)
    assert digests == [RouteDigest(1, b.broker.peers.routes.digest(1))]
    a.link.take()
    a.peer_messages(digests)
    queries = sent(a, RoutesQuery)
    assert queries == [RoutesQuery(0)] and a.broker.stats["route_repairs"] == 1
    b.peer_messages(queries)
    a.peer_messages([m for _p, m in b.link.take()])
    assert a.broker.peers.routes.digest(1) == b.broker.peers.routes.digest(1)
    assert "x/#" in a.broker.peers.routes.keys(1)
    a.peer_messages(digests)  # agrees now: nothing asked
    assert not sent(a, RoutesQuery) and a.broker.stats["route_repairs"] == 1


def test_a_digest_that_agrees_asks_nothing(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    c = b.connect("sub")
    c.send(Subscribe(1, (Subscription("y/+", 0),)))
    a.peer_messages([m for _p, m in b.link.take()])
    b.advance(DIGEST_EVERY + 1)
    a.link.take()
    a.peer_messages([m for _p, m in b.link.take()])
    assert not sent(a, RoutesQuery) and a.broker.stats["route_repairs"] == 0
