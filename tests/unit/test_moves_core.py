"""A virtual shard's persistent sessions moving between two brokers' cores (``core/moves.py``),
driven without a loop or sockets: two harnesses on their own stores, the peer messages
carried by the test, as the bus between two nodes would (the sender renamed by its peer id).

What is checked: the giver sends the session with its queue, in-flight row and QoS 2 state,
forgets it in memory at once and in its store only at the acknowledgement; the taker commits
it before acknowledging, serves it (session present, every message), announces its routes,
takes a resend without a duplicate, and keeps a newer session of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import FakeClient, Harness

from shardbroker.cluster.placement import vshard_for
from shardbroker.peer.messages import (
    PeerMessage,
    RoutesAdd,
    ShardState,
    ShardStateAck,
    ShardStateEnd,
    from_sender,
)
from shardbroker.protocol.packets import (
    MQTT_5,
    ConnAck,
    Disconnect,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Subscription,
)
from shardbroker.storage.lmdb_store import ShardStore
from shardbroker.storage.records import StoreFull

A_PEER, B_PEER = 256, 512  # how each names the other: workers 0 of nodes 1 and 2
CID = "mover"
V = vshard_for(CID, 1024)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    a = Harness(tmp_path / "a")
    b = Harness(tmp_path / "b", peers=[A_PEER])
    yield a, b
    a.close()
    b.close()


def carry(frm: Harness, to: Harness, sender: int, kinds: tuple[type, ...]) -> list[PeerMessage]:
    """The messages of ``kinds`` that ``frm`` flushed, handed to ``to`` as from ``sender``."""
    msgs = [m for _peer, m in frm.link.take() if isinstance(m, kinds)]
    from_sender(msgs, sender)
    to.peer_messages(msgs)
    return msgs


def offline_with_messages(a: Harness) -> None:
    """CID on ``a``: persistent, subscribed, one QoS 1 message in flight (unacknowledged) and
    three queued (QoS 1 and 2), then offline."""
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 2),)))
    pub = a.connect("pub")
    pub.send(Publish("t/x", b"in-flight", 1, packet_id=1))
    assert [p.payload for p in c.packets() if isinstance(p, Publish)] == [b"in-flight"]
    c.drop()
    pub.send(Publish("t/1", b"q1", 1, packet_id=2))
    pub.send(Publish("t/2", b"q2", 2, packet_id=3))
    pub.send(PubRel(3))
    pub.send(Publish("t/1", b"q1b", 1, packet_id=4))


def reconnect(h: Harness) -> tuple[FakeClient, list[object]]:
    c = h.connect(CID, clean=False)
    return c, c.packets()


def test_a_session_moves_with_its_rows_and_is_deleted_only_at_the_acknowledgement(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    offline_with_messages(a)
    a.link.peers.append(B_PEER)
    assert a.broker.give_shard(V, B_PEER, 7, a.now) == 1
    a.run()
    assert a.broker.sessions.get(CID) is None and a.store.has_session(CID)  # until acknowledged
    sent = carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    assert [type(m) for m in sent] == [ShardState, ShardStateEnd]
    out = b.link.take()
    acks = [m for peer, m in out if isinstance(m, ShardStateAck) and peer == A_PEER]
    assert acks == [ShardStateAck(0, V, 7, 1)]
    assert any(isinstance(m, RoutesAdd) and ("t/#", True) in m.keys for _p, m in out)
    assert b.store.has_session(CID) and b.store.check() == []
    assert b.broker.moves.received[V] == 7 and b.broker.stats["sessions_moved_in"] == 1
    from_sender(acks, B_PEER)  # type: ignore[arg-type]
    a.peer_messages(acks)  # type: ignore[arg-type]
    assert not a.store.has_session(CID) and a.store.check() == []
    assert a.broker.stats["sessions_moved_out"] == 1

    _c, packets = reconnect(b)
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    got = [(p.payload, p.qos, p.dup) for p in packets if isinstance(p, Publish)]
    assert got == [(b"in-flight", 1, True), (b"q1", 1, False), (b"q2", 2, False), (b"q1b", 1, False)]


def test_a_resend_adds_nothing_and_a_newer_session_here_is_kept(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    offline_with_messages(a)
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    msgs = [m for _peer, m in a.link.take() if isinstance(m, (ShardState, ShardStateEnd))]
    from_sender(msgs, A_PEER)
    b.peer_messages(msgs)
    assert len(b.store.queue(CID)) == 3
    b.link.take()
    b.peer_messages(msgs)  # the acknowledgement was lost: the same state again
    assert len(b.store.queue(CID)) == 3 and b.store.check() == []
    assert [m for _p, m in b.link.take() if isinstance(m, ShardStateAck)] == [ShardStateAck(0, V, 7, 1)]
    assert b.broker.stats["sessions_moved_in"] == 1
    # the client connected here and left later than the state that comes again: its own stays
    c, packets = reconnect(b)
    for p in packets:
        if isinstance(p, Publish) and p.qos == 1:
            c.send(PubAck(p.packet_id))
        elif isinstance(p, Publish):
            c.send(PubRec(p.packet_id))
            c.send(PubComp(p.packet_id))
    assert len([p for p in packets if isinstance(p, Publish)]) == 4
    c.send(Disconnect())
    b.advance(1.0)
    b.peer_messages(msgs)
    c, packets = reconnect(b)
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    assert not [p for p in packets if isinstance(p, Publish)]  # delivered once, not again


def test_a_shard_without_sessions_still_says_so_and_a_restarted_giver_sends_again(
        tmp_path: Path) -> None:
    a = Harness(tmp_path / "a")
    try:
        empty = (V + 1) % 1024
        assert a.broker.give_shard(empty, B_PEER, 3, a.now) == 0
        a.run()
        assert [m for _p, m in a.link.take()] == [ShardStateEnd(0, empty, 3, 0)]
        offline_with_messages(a)
        a.link.peers.append(B_PEER)
        a.link.take()
        assert a.broker.give_shard(V, B_PEER, 5, a.now) == 1
        a.run()
        a = a.restart()  # before any acknowledgement: the session is still in the store
        assert a.broker.sessions.get(CID) is not None
        assert a.broker.give_shard(V, B_PEER, 5, a.now) == 1
        a.run()
        states = [m for _p, m in a.link.take() if isinstance(m, ShardState)]
        assert len(states) == 1 and len(states[0].sessions) == 1
        a.advance(6.0)  # unacknowledged: sent again
        assert [type(m) for _p, m in a.link.take() if isinstance(m, (ShardState, ShardStateEnd))] == [
            ShardState, ShardStateEnd]
    finally:
        a.close()


def test_a_5_0_session_keeps_its_version_and_expiry(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    a.connect(CID, MQTT_5, clean=False, properties=Properties(session_expiry_interval=600)).drop()
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    sess = b.broker.sessions.get(CID)
    assert sess is not None and (sess.version, sess.expiry_interval) == (MQTT_5, 600)


def test_what_was_not_acknowledged_is_taken_back_when_the_taker_leaves(
        pair: tuple[Harness, Harness]) -> None:
    a, _b = pair
    offline_with_messages(a)
    a.link.peers.append(B_PEER)
    assert a.broker.give_shard(V, B_PEER, 7, a.now) == 1
    a.run()
    a.link.take()
    a.broker.peers.peer_removed(B_PEER)  # its node's registration ended
    a.run()
    assert a.broker.moves.outgoing == {} and a.broker.sessions.get(CID) is not None
    _c, packets = reconnect(a)
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    assert [p.payload for p in packets if isinstance(p, Publish)] == [b"in-flight", b"q1", b"q2", b"q1b"]


def test_a_message_shared_with_a_session_that_stays_is_kept_for_it(pair: tuple[Harness, Harness]) -> None:
    """One publish queued for the moving session and for one that stays (one message row, two
    references): once the move is acknowledged the message counts one reference, the row
    of the session that stays, and is still there for it."""
    a, _b = pair
    stayer = next(c for c in (f"stay{i}" for i in range(100)) if vshard_for(c, 1024) != V)
    for cid in (CID, stayer):
        c = a.connect(cid, clean=False)
        c.send(Subscribe(1, (Subscription("s/#", 1),)))
        c.drop()
    a.connect("pub").send(Publish("s/1", b"shared", 1, packet_id=1))
    sess = a.broker.sessions.get(stayer)
    assert sess is not None and sess.queue is not None
    shared = sess.queue[0].message
    assert shared.refs == 2
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    assert shared.refs == 2  # the moving session's row is there until the acknowledgement
    a.peer_messages([ShardStateAck(B_PEER, V, 7, 1)])
    assert shared.refs == 1 and shared.store_id is not None
    assert not a.store.has_session(CID) and a.store.check() == []
    _c, packets = reconnect_as(a, stayer)
    assert [p.payload for p in packets if isinstance(p, Publish)] == [b"shared"]


def reconnect_as(h: Harness, cid: str) -> tuple[FakeClient, list[object]]:
    c = h.connect(cid, clean=False)
    return c, c.packets()


def test_a_shard_given_again_to_another_peer_before_an_acknowledgement(
        pair: tuple[Harness, Harness]) -> None:
    """The map moved the shard on before its first taker acknowledged: the sessions go to the
    next one, and an acknowledgement of the first is ignored."""
    a, _b = pair
    offline_with_messages(a)
    a.link.peers += [B_PEER, 768]
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    a.link.take()
    assert a.broker.give_shard(V, 768, 8, a.now) == 1
    a.run()
    assert [(p, type(m)) for p, m in a.link.take()] == [(768, ShardState), (768, ShardStateEnd)]
    a.peer_messages([ShardStateAck(B_PEER, V, 7, 1)])
    assert a.store.has_session(CID)  # not acknowledged by the one it went to last
    a.peer_messages([ShardStateAck(768, V, 8, 1)])
    assert not a.store.has_session(CID) and a.store.check() == []


def test_sessions_whose_commit_failed_are_not_acknowledged_and_are_taken_at_the_resend(
        pair: tuple[Harness, Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    offline_with_messages(a)
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    msgs = [m for _p, m in a.link.take() if isinstance(m, (ShardState, ShardStateEnd))]
    from_sender(msgs, A_PEER)
    commit = ShardStore._commit

    def full(*args: object, **kwargs: object) -> None:
        raise StoreFull("the disk is full")

    monkeypatch.setattr(ShardStore, "_commit", full)
    b.peer_messages(msgs)
    assert not [m for _p, m in b.link.take() if isinstance(m, ShardStateAck)]
    assert b.broker.sessions.get(CID) is None and not b.store.has_session(CID)
    monkeypatch.setattr(ShardStore, "_commit", commit)
    b.advance(6.0)  # past STORE_FULL_RETRY
    b.peer_messages(msgs)
    assert [m for _p, m in b.link.take() if isinstance(m, ShardStateAck)] == [ShardStateAck(0, V, 7, 1)]
    assert len(b.store.queue(CID)) == 3 and b.store.check() == []
