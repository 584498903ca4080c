"""Retained messages across nodes (``core/retained.py``), two nodes' worker 0 cores talking
through their fake links: a local retained publish is stamped and sent as ``Retain`` to worker
0 of every other node; another node's ``Retain`` is kept by last writer wins; a node that
becomes reachable is sent every entry and tombstone, a page per turn, held while the bus toward
it has batches waiting; the digests then agree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import START, Harness

from shardbroker.config import load_config
from shardbroker.core.hlc import SHIFT
from shardbroker.core.retained import PAGE, RECHECK, WAITING_MAX
from shardbroker.peer.messages import PeerMessage, Retain, RoutesQuery
from shardbroker.protocol.packets import NO_PROPERTIES, Publish
from shardbroker.storage.records import StoredMessage

N1_AT_N2 = 256  # on node n2, node n1 is number 1: its worker 0
N2_AT_N1 = 512  # on node n1, node n2 is number 2: its worker 0, and 513 its worker 1


def node_config(data_dir: Path, node: str) -> object:
    return load_config(None, {"server.data_dir": str(data_dir), "cluster.node_id": node,
                              "cluster.etcd_endpoints": ["http://127.0.0.1:2379"],
                              "cluster.advertise": "127.0.0.1:7000"})


def node(data_dir: Path, name: str, peers: list[int], shard: int = 0, shards: int = 1) -> Harness:
    return Harness(data_dir, node_config(data_dir, name), peers, shard, shards)  # type: ignore[arg-type]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    n1 = node(tmp_path / "n1", "n1", [N2_AT_N1, N2_AT_N1 + 1])
    n2 = node(tmp_path / "n2", "n2", [N1_AT_N2])
    yield n1, n2
    n1.close()
    n2.close()


def retains(h: Harness, peer: int | None = None) -> list[Retain]:
    return [m for p, m in h.link.take() if isinstance(m, Retain) and (peer is None or p == peer)]


def publish(h: Harness, topic: str, payload: bytes, qos: int = 0) -> None:
    c = h.connect(f"pub-{topic}")
    c.send(Publish(topic, payload, qos, True, packet_id=1 if qos else None))
    c.packets()


def deliver(h: Harness, messages: list[Retain]) -> None:
    batch: list[PeerMessage] = list(messages)
    h.peer_messages(batch)


def test_a_local_retained_publish_goes_to_worker_0_of_every_other_node(pair: tuple[Harness, Harness]) -> None:
    n1, _ = pair
    n1.link.take()
    publish(n1, "home/temp", b"21.5", qos=1)
    sent = [(p, m) for p, m in n1.link.take() if isinstance(m, Retain)]
    stamp = int(START.wall * 1000) << SHIFT
    assert sent == [(N2_AT_N1, Retain("home/temp", b"21.5", 1, NO_PROPERTIES, None, stamp, "n1"))]  # not 513
    assert n1.retained.stamp("home/temp") == (stamp, "n1")
    publish(n1, "home/temp", b"")  # a delete: a Retain with an empty payload, stamped later
    assert retains(n1) == [Retain("home/temp", b"", 0, NO_PROPERTIES, None, stamp + 1, "n1")]
    assert n1.retained.get("home/temp") is None


def test_a_retained_publish_without_other_nodes_sends_nothing(tmp_path: Path) -> None:
    h = node(tmp_path, "n1", [1])  # another worker of this node only
    h.link.take()
    publish(h, "t", b"v")
    assert retains(h) == [] and h.retained.get("t") is not None and h.retained.stamp("t")[1] == "n1"
    h.close()


def test_another_nodes_retain_is_kept_if_newer(pair: tuple[Harness, Harness]) -> None:
    _, n2 = pair
    deliver(n2, [Retain("t", b"v1", 1, NO_PROPERTIES, 1.9e9, 100, "n1")])
    assert n2.retained.get("t") == StoredMessage("t", b"v1", 1, True, NO_PROPERTIES, 1.9e9)
    deliver(n2, [Retain("t", b"older", 0, NO_PROPERTIES, None, 99, "n3")])
    deliver(n2, [Retain("t", b"tie-lower", 0, NO_PROPERTIES, None, 100, "a")])
    assert n2.retained.get("t") is not None and n2.retained.get("t").payload == b"v1"  # type: ignore[union-attr]
    deliver(n2, [Retain("t", b"tie-higher", 0, NO_PROPERTIES, None, 100, "n9")])
    assert n2.retained.get("t").payload == b"tie-higher"  # type: ignore[union-attr]
    deliver(n2, [Retain("t", b"", 0, NO_PROPERTIES, None, 101, "n1")])
    assert n2.retained.get("t") is None and n2.retained.stamp("t") == (101, "n1")
    assert retains(n2) == []  # applying another node's write sends nothing on
    assert n2.broker.retained_sync.stats["retain_applied"] == 3


def test_a_local_write_after_a_remote_one_from_a_clock_ahead_wins(pair: tuple[Harness, Harness]) -> None:
    """n1's clock is a minute ahead: n2's next write of the topic still comes after it."""
    n1, n2 = pair
    ahead = int((START.wall + 60) * 1000) << SHIFT
    deliver(n2, [Retain("t", b"from-n1", 0, NO_PROPERTIES, None, ahead, "n1")])
    n2.link.take()
    publish(n2, "t", b"from-n2")
    [sent] = retains(n2, N1_AT_N2)
    assert sent.stamp == ahead + 1 and n2.retained.get("t").payload == b"from-n2"  # type: ignore[union-attr]
    deliver(n1, [sent])
    assert n1.retained.get("t").payload == b"from-n2"  # type: ignore[union-attr]


def test_concurrent_writes_on_two_nodes_converge(pair: tuple[Harness, Harness]) -> None:
    n1, n2 = pair
    n1.link.take()
    n2.link.take()
    for i in range(5):
        publish(n1, f"t/{i}", b"n1-%d" % i)
        publish(n2, f"t/{i}", b"n2-%d" % i)
    publish(n2, "t/4", b"")
    from_n1, from_n2 = retains(n1, N2_AT_N1), retains(n2, N1_AT_N2)
    deliver(n2, from_n1)
    deliver(n1, from_n2)
    assert n1.retained.digest() == n2.retained.digest()
    assert n1.retained.digest()[0] == 4  # t/4 deleted by the last write


# --------------------------------------------------------------------------- catch-up


def fill(h: Harness, count: int) -> None:
    """``count`` retained messages written by this node, and one tombstone."""
    c = h.connect("filler")
    for i in range(count):
        c.send(Publish(f"bulk/{i:04d}", b"p%d" % i, 0, True))
    c.send(Publish("bulk/0001", b"", 0, True))
    h.link.take()


def test_a_node_that_becomes_reachable_is_sent_everything_a_page_at_a_time(pair: tuple[Harness, Harness]) -> None:
    n1, n2 = pair
    fill(n1, 2 * PAGE + 10)
    flushed: list[int] = []
    flush = n1.link.flush

    def counting_flush() -> None:
        flushed.append(sum(1 for p, m in n1.link.pending if isinstance(m, Retain) and p == N2_AT_N1))
        flush()

    n1.link.flush = counting_flush  # type: ignore[method-assign]
    n1.broker.peers.peer_added(N2_AT_N1)
    n1.run()
    sent = n1.link.take()
    assert isinstance(sent[0][1], RoutesQuery)
    caught_up = [m for p, m in sent if isinstance(m, Retain)]
    assert {p for p, m in sent if isinstance(m, Retain)} == {N2_AT_N1}
    assert len(caught_up) == 2 * PAGE + 10  # every entry, the tombstone in place of bulk/0001
    assert [n for n in flushed if n] == [PAGE, PAGE, 10]  # one page per turn
    assert next(m for m in caught_up if m.topic == "bulk/0001").payload == b""
    deliver(n2, caught_up)
    assert n2.retained.digest() == n1.retained.digest()
    assert n2.retained.digest()[0] == 2 * PAGE + 9
    assert n2.retained.stamp("bulk/0001") == n1.retained.stamp("bulk/0001")


def test_a_catch_up_waits_while_the_bus_toward_the_node_is_backed_up(pair: tuple[Harness, Harness]) -> None:
    n1, _ = pair
    fill(n1, PAGE + 5)
    n1.link.backlog[N2_AT_N1] = WAITING_MAX
    n1.broker.peers.peer_added(N2_AT_N1)
    n1.run()
    assert retains(n1) == []
    n1.advance(RECHECK, tick=False)
    assert retains(n1) == []  # still backed up
    n1.link.backlog[N2_AT_N1] = WAITING_MAX - 1
    n1.advance(RECHECK, tick=False)
    assert len(retains(n1, N2_AT_N1)) == PAGE + 5
    assert n1.broker.retained_sync.catching_up == {}


def test_only_worker_0_catches_up_only_another_nodes_worker_0(tmp_path: Path) -> None:
    w0 = node(tmp_path / "a", "n1", [N2_AT_N1, N2_AT_N1 + 1])
    w1 = node(tmp_path / "b", "n1", [N2_AT_N1], shard=1, shards=2)
    try:
        for h in (w0, w1):
            fill(h, 3)
        w0.broker.peers.peer_added(N2_AT_N1 + 1)  # worker 1 of n2
        w1.broker.peers.peer_added(N2_AT_N1)  # this is worker 1
        w0.broker.peers.peer_added(1)  # a worker of this node
        w0.run()
        w1.run()
        assert retains(w0) == [] and retains(w1) == []
    finally:
        w0.close()
        w1.close()


def test_a_node_removed_mid_catch_up_is_sent_no_more(pair: tuple[Harness, Harness]) -> None:
    n1, _ = pair
    fill(n1, 3 * PAGE)
    n1.link.backlog[N2_AT_N1] = WAITING_MAX
    n1.broker.peers.peer_added(N2_AT_N1)
    n1.run()
    n1.broker.peers.peer_removed(N2_AT_N1)
    n1.link.backlog.clear()
    n1.advance(RECHECK, tick=False)
    assert retains(n1) == [] and n1.broker.retained_sync.catching_up == {}


def test_a_restarted_node_catches_up_on_what_it_missed(pair: tuple[Harness, Harness]) -> None:
    """n2 was away while n1 set, replaced and deleted messages: one catch-up brings it level,
    and n2's own newer write survives it."""
    n1, n2 = pair
    publish(n1, "a", b"1")
    publish(n1, "b", b"1")
    deliver(n2, retains(n1, N2_AT_N1))
    n1.now = n1.now._replace(wall=n1.now.wall + 1)
    publish(n1, "a", b"2")
    publish(n1, "b", b"")
    publish(n1, "c", b"1")
    n1.link.take()  # lost: n2 was down
    n2.now = n2.now._replace(wall=n2.now.wall + 5)
    publish(n2, "c", b"n2-later")
    n2.link.take()
    n1.broker.peers.peer_added(N2_AT_N1)
    n1.run()
    deliver(n2, retains(n1, N2_AT_N1))
    n2.broker.peers.peer_added(N1_AT_N2)
    n2.run()
    deliver(n1, retains(n2, N1_AT_N2))
    assert n1.retained.digest() == n2.retained.digest()
    assert [(t, m.payload) for t, m in n2.retained.scan()] == [("a", b"2"), ("c", b"n2-later")]


def test_sys_topics_stay_each_nodes_own(pair: tuple[Harness, Harness]) -> None:
    """$SYS is what each node says about itself: not sent, refused, not caught up, not digested."""
    n1, n2 = pair
    n1.link.take()
    n1.broker.publish_sys({"$SYS/broker/version": "1"}, True, n1.now)
    n1.run()
    assert retains(n1) == [] and n1.retained.get("$SYS/broker/version") is not None
    assert n1.retained.digest() == (0, 0)
    n1.broker.peers.peer_added(N2_AT_N1)
    n1.run()
    assert retains(n1) == []
    deliver(n2, [Retain("$SYS/broker/version", b"2", 0, NO_PROPERTIES, None, 1, "n1")])
    assert n2.retained.get("$SYS/broker/version") is None


def test_a_node_held_by_the_bus_does_not_hold_up_another(tmp_path: Path) -> None:
    n3 = 3 * 256  # worker 0 of a third node
    h = node(tmp_path, "n1", [N2_AT_N1, n3])
    try:
        fill(h, 3 * PAGE)
        h.link.backlog[N2_AT_N1] = WAITING_MAX
        h.broker.peers.peer_added(N2_AT_N1)
        h.broker.peers.peer_added(n3)
        h.run()
        assert len(retains(h, n3)) == 3 * PAGE and h.broker.retained_sync.catching_up == {N2_AT_N1: b""}
        h.link.backlog.clear()
        h.advance(RECHECK, tick=False)
        assert len(retains(h, N2_AT_N1)) == 3 * PAGE
    finally:
        h.close()
