"""A virtual shard's persistent sessions moving between two brokers' cores (``core/moves.py``),
driven without a loop or sockets: two harnesses on their own stores, the peer messages
carried by the test, as the bus between two nodes would (the sender renamed by its peer id).

What is checked: the giver sends the session with its queue, in-flight row and QoS 2 state,
keeps it (marked leaving, its routes announced) until the acknowledgement and a barrier of its
own, relaying what comes for it meanwhile, and then forgets it in memory and in its store; the
taker commits it, serves it (session present, every message), announces its routes and
acknowledges once every peer has answered its barrier; it takes a resend without a duplicate,
keeps a newer session of its own, and gets each publish once although it comes both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import FakeClient, Harness

from shardbroker.cluster.placement import vshard_for
from shardbroker.core.session import Arrived, Leaving, Message, Session
from shardbroker.peer.messages import (
    DurableForward,
    PeerMessage,
    RouteAck,
    RoutesAdd,
    ShardRelayEnd,
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


def answer_barriers(h: Harness, out: list[tuple[int, PeerMessage]]) -> None:
    """Every peer answers the announcements ``h`` sent (``out``: what it flushed)."""
    acks = [RouteAck(peer, m.request) for peer, m in out if isinstance(m, RoutesAdd) and m.request]
    if acks:
        h.peer_messages(acks)  # type: ignore[arg-type]


def shuttle(a: Harness, b: Harness) -> list[tuple[str, PeerMessage]]:
    """Carry what ``a`` and ``b`` send each other (as workers 0 of nodes 1 and 2) until they
    are quiet; the messages in the order carried, each with its direction."""
    seen: list[tuple[str, PeerMessage]] = []
    while True:
        to_b = [m for peer, m in a.link.take() if peer == B_PEER]
        to_a = [m for peer, m in b.link.take() if peer == A_PEER]
        if not to_a and not to_b:
            return seen
        from_sender(to_b, A_PEER)
        seen += [("a->b", m) for m in to_b]
        b.peer_messages(to_b)
        from_sender(to_a, B_PEER)
        seen += [("b->a", m) for m in to_a]
        a.peer_messages(to_a)


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
    held = a.broker.sessions.get(CID)  # until acknowledged, and every peer knows
    assert held is not None and isinstance(held.moving, Leaving) and a.store.has_session(CID)
    sent = carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    assert [type(m) for m in sent] == [ShardState, ShardStateEnd]
    out = b.link.take()
    assert not [m for _p, m in out if isinstance(m, ShardStateAck)]  # not before its barrier
    assert any(isinstance(m, RoutesAdd) and ("t/#", True) in m.keys for _p, m in out)
    assert b.store.has_session(CID) and b.store.check() == []
    assert b.broker.moves.received[V] == 7 and b.broker.stats["sessions_moved_in"] == 1
    answer_barriers(b, out)
    acks = [m for peer, m in b.link.take() if isinstance(m, ShardStateAck) and peer == A_PEER]
    assert acks == [ShardStateAck(0, V, 7, 1)]
    from_sender(acks, B_PEER)  # type: ignore[arg-type]
    a.peer_messages(acks)  # type: ignore[arg-type]
    assert a.store.has_session(CID)  # until every peer has answered the giver's barrier too
    answer_barriers(a, a.link.take())
    assert a.broker.sessions.get(CID) is None
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
    answer_barriers(b, b.link.take())
    b.link.take()
    b.peer_messages(msgs)  # the acknowledgement was lost: the same state again
    assert len(b.store.queue(CID)) == 3 and b.store.check() == []
    answer_barriers(b, b.link.take())
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
    a.link.take()
    a.peer_messages([ShardStateAck(B_PEER, V, 7, 1)])
    answer_barriers(a, a.link.take())
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
    answer_barriers(a, a.link.take())
    assert a.store.has_session(CID)  # not acknowledged by the one it went to last
    a.peer_messages([ShardStateAck(768, V, 8, 1)])
    answer_barriers(a, a.link.take())
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
    answer_barriers(b, b.link.take())
    assert [m for _p, m in b.link.take() if isinstance(m, ShardStateAck)] == [ShardStateAck(0, V, 7, 1)]
    assert len(b.store.queue(CID)) == 3 and b.store.check() == []


def _relays(out: list[tuple[int, PeerMessage]]) -> list[DurableForward]:
    return [m for _p, m in out if isinstance(m, DurableForward) and m.target is not None]


def test_publishes_during_a_move_reach_the_session_once_whichever_way_they_come(
        pair: tuple[Harness, Harness]) -> None:
    """m1 comes while only the giver has the session's routes (relayed), m2 while both have
    them (relayed and straight: taken once), m3 after the giver let go (straight only)."""
    a, b = pair
    a.broker.peers.node_number, b.broker.peers.node_number = 1, 2
    offline_with_messages(a)
    pub = a.connect("pub")
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    b_out = [m for peer, m in b.link.take() if peer == A_PEER]  # its routes and its barrier
    assert not [m for m in b_out if isinstance(m, ShardStateAck)]

    pub.send(Publish("t/m", b"m1", 1, packet_id=11))  # the giver does not know B's routes yet
    to_b = [m for peer, m in a.link.take() if peer == B_PEER]
    assert [(m.target[0], m.forward.payload) for m in _relays([(B_PEER, m) for m in to_b])] == [(CID, b"m1")]
    from_sender(to_b, A_PEER)
    b.peer_messages(to_b)

    from_sender(b_out, B_PEER)
    a.peer_messages(b_out)  # the giver learns B's routes and answers B's barrier
    pub.send(Publish("t/m", b"m2", 2, packet_id=12))  # both ways now
    pub.send(PubRel(12))
    to_b = [m for peer, m in a.link.take() if peer == B_PEER]
    m2 = [m for m in to_b if isinstance(m, DurableForward) and m.forward.payload == b"m2"]
    assert len(m2) == 2 and {m.target is None for m in m2} == {True, False} and m2[0].mid == m2[1].mid
    from_sender(to_b, A_PEER)
    b.peer_messages(to_b)
    assert b.broker.stats["moves_duplicates"] == 1

    shuttle(a, b)  # B acknowledges, the giver's barrier is answered: it lets go
    assert a.broker.sessions.get(CID) is None and not a.store.has_session(CID)
    pub.send(Publish("t/m", b"m3", 1, packet_id=13))
    to_b = [m for peer, m in a.link.take() if peer == B_PEER]
    assert not _relays([(B_PEER, m) for m in to_b])
    from_sender(to_b, A_PEER)
    b.peer_messages(to_b)

    sess = b.broker.sessions.get(CID)
    assert sess is not None and sess.moving is None  # the giver's relays ended: no marks kept
    _c, packets = reconnect(b)
    got = [p.payload for p in packets if isinstance(p, Publish)]
    assert got == [b"in-flight", b"q1", b"q2", b"q1b", b"m1", b"m2", b"m3"]
    assert a.broker.stats["moves_relayed"] == 2 and b.store.check() == [] and a.store.check() == []


def moved_in_offline(a: Harness, b: Harness) -> tuple[list[PeerMessage], Session]:
    """CID (offline, with messages) given by ``a`` and taken by ``b`` (node 2): what ``a``
    sent, and the session on ``b``, marked as arrived."""
    b.broker.peers.node_number = 2
    offline_with_messages(a)
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    sent = carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    sess = b.broker.sessions.get(CID)
    assert sess is not None and isinstance(sess.moving, Arrived)
    return sent, sess


def test_a_copy_is_taken_once_whichever_way_comes_first_until_the_relays_end(
        pair: tuple[Harness, Harness]) -> None:
    """Copies numbered at most what the giver had applied are in the state; past that, a
    copy that came one way is not taken the other way; once the giver's relays have all
    been applied (``ShardRelayEnd``) the session keeps no marks."""
    a, b = pair
    sent, sess = moved_in_offline(a, b)
    b.link.take()
    moves, source = b.broker.moves, 5 * 256 + 1  # a worker of a third node
    sess.moving.seen[source] = 10  # the giver had applied its publishes up to 10

    def straight(mid: int) -> bool:
        """Whether a straight copy numbered ``mid`` is taken (placed by the caller)."""
        return not moves.check(sess, Message("t/x", b"s%d" % mid, 1, False, src=source, mid=mid),
                               1, False, (), None)

    def relayed(mid: int) -> None:
        moves.relayed(Message("t/x", b"r%d" % mid, 1, False, src=source, mid=mid), CID, (), None)

    assert not straight(9)  # in the state already
    assert straight(20)
    relayed(19)  # new
    relayed(20)  # came straight
    relayed(21)  # new
    assert not straight(21)  # came relayed
    assert straight(22)
    queued = [q.message.payload for q in sess.queue or ()]
    assert b"r19" in queued and b"r21" in queued and b"r20" not in queued
    assert b.broker.stats["moves_duplicates"] == 3

    state = next(m for m in sent if isinstance(m, ShardState))
    b.peer_messages([ShardRelayEnd(state.shard, V, 7, 0)])  # nothing relayed through the outbox
    assert sess.moving is None


def test_qos_0_copies_for_a_leaving_session_are_not_relayed(pair: tuple[Harness, Harness]) -> None:
    a, _b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("z/#", 1),)))
    c.drop()
    pub = a.connect("pub")
    a.link.peers.append(B_PEER)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    a.link.take()
    pub.send(Publish("z/1", b"zero", 0))
    assert not _relays(a.link.take())
    assert a.broker.stats["moves_not_relayed"] == 1


def _held_here(b: Harness, payloads: list[bytes], *, connected: bool) -> FakeClient:
    """CID on ``b`` too (as on a node that kept its own): subscribed, ``payloads`` queued."""
    c = b.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    if not connected:
        c.drop()
    pub = b.connect("pub-b")
    for i, payload in enumerate(payloads):
        pub.send(Publish("t/b", payload, 1, packet_id=i + 1))
    return c


def test_an_older_session_held_here_gives_its_messages_to_the_newer_one_that_arrives(
        pair: tuple[Harness, Harness]) -> None:
    """The taker kept a session of its own from before (its node was cut off); the client has
    since had one on the giver, disconnected later: the giver's wins, with the taker's
    undelivered messages too."""
    a, b = pair
    _held_here(b, [b"old-1", b"old-2"], connected=False)
    a.advance(5.0)  # the giver's session ended later
    offline_with_messages(a)
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    assert b.broker.stats["moves_merged"] == 1 and b.store.check() == []
    _c, packets = reconnect(b)
    got = sorted(p.payload for p in packets if isinstance(p, Publish))
    assert got == sorted([b"in-flight", b"q1", b"q2", b"q1b", b"old-1", b"old-2"])


def test_a_connected_session_here_stays_and_takes_the_incoming_ones_messages(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    offline_with_messages(a)
    c = _held_here(b, [], connected=True)
    c.packets()
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    msgs = carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    got = [p.payload for p in c.packets() if isinstance(p, Publish)]
    assert sorted(got) == sorted([b"in-flight", b"q1", b"q2", b"q1b"])
    b.peer_messages(msgs)  # the same state again: nothing twice
    assert not [p for p in c.packets() if isinstance(p, Publish)]
    assert b.broker.stats["moves_merged"] == 1 and b.store.check() == []


def test_the_session_that_stays_keeps_the_other_ones_subscriptions(pair: tuple[Harness, Harness]) -> None:
    """The client got a new session on the giver (session present 0) and did not subscribe
    again; the taker's own, older, had the subscription: the one that stays has it too, and
    a publish after the move reaches it."""
    a, b = pair
    _held_here(b, [b"old-1"], connected=False)  # subscribed to t/# here
    a.advance(5.0)
    a.connect(CID, clean=False).drop()  # a new session there, no subscription
    a.broker.give_shard(V, B_PEER, 7, a.now)
    a.run()
    carry(a, b, A_PEER, (ShardState, ShardStateEnd))
    sess = b.broker.sessions.get(CID)
    assert sess is not None and sess.subscriptions is not None and "t/#" in sess.subscriptions
    b.connect("pub-c").send(Publish("t/after", b"after", 1, packet_id=9))
    _c, packets = reconnect(b)
    assert [p.payload for p in packets if isinstance(p, Publish)] == [b"old-1", b"after"]
    b2 = b.restart()  # and it is stored so
    try:
        stored = b2.broker.sessions.get(CID)
        assert stored is not None and "t/#" in (stored.subscriptions or {})
    finally:
        b2.close()


def test_a_relayed_copy_is_queued_before_newer_straight_ones_of_its_source(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    sent, sess = moved_in_offline(a, b)
    source = 5 * 256 + 1
    for mid in (20, 21):
        b.broker.delivery.deliver(sess, Message("t/s", b"s%d" % mid, 1, False, src=source, mid=mid),
                                  1, False, ())
    b.broker.delivery.deliver(sess, Message("t/o", b"other", 1, False, src=source + 1, mid=5), 1, False, ())
    b.broker.moves.relayed(Message("t/r", b"r19", 1, False, src=source, mid=19), CID, (), None)
    queued = [q.message.payload for q in sess.queue or ()]
    assert queued[-4:] == [b"r19", b"s20", b"s21", b"other"]
    state = next(m for m in sent if isinstance(m, ShardState))
    b.peer_messages([ShardRelayEnd(state.shard, V, 7, 0)])
    _c, packets = reconnect(b)
    got = [p.payload for p in packets if isinstance(p, Publish)]
    assert got[-4:] == [b"r19", b"s20", b"s21", b"other"]
