"""Copies of a virtual shard's session records on its backup (``core/replicas.py``), driven
without a loop or sockets: an owner and a backup on their own stores, the peer messages
carried by the test as the bus between two nodes would (the sender renamed by its peer id).

What is checked: the owner sends its backup each persistent session record it commits (a
subscription, an unsubscription, a session ended), nothing for a clean session, the whole
set when the backup is new or restarts; the backup keeps them and forgets those it no longer
backs up; when it serves the shard with no previous owner to send it, the copies become
sessions: stored, subscribed, their routes announced, their wills due, and a publish made
since waits for the client, who finds its session present; the packet ids of QoS 2 exchanges
in flight either way go with the copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import FakeClient, Harness

from shardbroker.cluster.placement import vshard_for
from shardbroker.core.moves import BARRIER_WAIT
from shardbroker.core.replicas import COPIES_WAIT, HOLD_FOR_LOST, KEEP_AFTER, PID_SKIP, RESENDS_WAIT
from shardbroker.core.session import AWAIT_PUBCOMP
from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    PeerMessage,
    ReplicasQuery,
    RouteRemove,
    RoutesAdd,
    RoutesRemove,
    SessionReplicas,
    ShardsTaken,
    ShardState,
    ShardStateAck,
    ShardStateEnd,
    from_sender,
)
from shardbroker.protocol.packets import (
    ConnAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from shardbroker.storage.lmdb_store import ShardStore

A_PEER, B_PEER = 256, 512  # how each names the other: workers 0 of nodes 1 and 2
CID = "kept"
V = vshard_for(CID, 1024)
COUNT = 1024


def backups(v: int = V, peer: int = B_PEER) -> tuple[int, ...]:
    out = [-1] * COUNT
    out[v] = peer
    return tuple(out)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    a = Harness(tmp_path / "a", peers=[B_PEER])
    b = Harness(tmp_path / "b", peers=[A_PEER])
    a.broker.place_replicas([], backups(), lambda v: True, a.now)
    a.run()
    yield a, b
    a.close()
    b.close()


def replicas(a: Harness) -> list[SessionReplicas]:
    return [m for peer, m in a.link.take() if peer == B_PEER and isinstance(m, SessionReplicas)]


def carry(a: Harness, b: Harness) -> list[SessionReplicas]:
    msgs = replicas(a)
    sent: list[PeerMessage] = list(msgs)
    from_sender(sent, A_PEER)
    b.peer_messages(sent)
    return msgs


def test_each_committed_record_goes_to_the_backup_and_a_clean_session_does_not(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    assert [(m.vshard, m.items) for m in carry(a, b)] == [(V, ())]  # the whole (empty) set first
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1), Subscription("u", 2))))
    carry(a, b)
    held = b.broker.replicas.held[V]
    assert set(held) == {CID}
    rec = b.broker.replicas.held[V][CID]
    c.send(Unsubscribe(2, ("u",)))
    carry(a, b)
    assert held[CID] != rec  # the newer record replaced it
    other = "clean-one"
    a.broker.place_replicas([], backups(vshard_for(other, COUNT)), lambda v: True, a.now)
    a.run()
    a.link.take()
    a.connect(other, clean=True)
    assert replicas(a) == []  # nothing stored, nothing copied
    a.broker.place_replicas([], backups(), lambda v: True, a.now)
    a.run()
    carry(a, b)
    a.connect(CID, clean=True)  # Clean Session 1: the session ends
    msgs = carry(a, b)
    assert [m.items for m in msgs] == [((CID, b""),)]
    assert b.broker.replicas.held[V] == {}
    assert b.broker.stats["replicas_held"] == 0


def test_the_copies_become_sessions_on_the_backup_when_it_serves_the_shard(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    will = Will("wills/" + CID, b"gone", 1, False)
    c = a.connect(CID, clean=False, will=will)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    watcher = b.connect("watcher")
    watcher.send(Subscribe(1, (Subscription("wills/#", 1),)))
    watcher.packets()
    b.link.take()
    # a's node is lost: b serves the shard, and nobody will send it the sessions
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    assert b.broker.stats["sessions_restored"] == 1
    assert V not in b.broker.replicas.held
    out = b.link.take()
    assert any(isinstance(m, RoutesAdd) and ("t/#", True) in m.keys for _, m in out)  # routes announced
    # the connection to the lost node ended: the will is published (no delay)
    b.advance(1)
    assert [p.payload for p in watcher.packets() if isinstance(p, Publish)] == [b"gone"]
    # a publish made now waits for the client, which finds its session
    pub = b.connect("pub")
    pub.send(Publish("t/1", b"after", 1, packet_id=1))
    again = b.connect(CID, clean=False)
    packets = again.packets()
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    assert [p.payload for p in packets if isinstance(p, Publish)] == [b"after"]
    # it is stored: a restart of the backup keeps it
    b.close()
    store = ShardStore.open(b.data_dir, 0, 1, sync=False)
    try:
        assert CID in set(store.client_ids([V]))
    finally:
        store.close()
    b.store = ShardStore.open(b.data_dir, 0, 1, sync=False)  # for the fixture's close


def test_a_session_held_already_is_not_replaced_by_a_copy(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    mine = b.connect(CID, clean=False)  # the client got a session on b meanwhile
    mine.send(Subscribe(1, (Subscription("mine", 1),)))
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 0
    sess = b.broker.sessions.get(CID)
    assert sess is not None and set(sess.subscriptions or {}) == {"mine"}


def test_a_new_backup_or_a_restarted_one_gets_the_whole_set_and_an_old_one_forgets(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    for i in range(3):
        cid = f"s{i}"
        a.broker.place_replicas([], backups(vshard_for(cid, COUNT)), lambda v: True, a.now)
        c = a.connect(cid, clean=False)
        c.send(Subscribe(1, (Subscription(f"t/{i}", 1),)))
    a.broker.place_replicas([], (-1,) * COUNT, lambda v: True, a.now)  # no backup for a moment
    a.link.take()
    vs = [vshard_for(f"s{i}", COUNT) for i in range(3)]
    whole = [B_PEER if v in vs else -1 for v in range(COUNT)]
    a.broker.place_replicas([], tuple(whole), lambda v: True, a.now)
    a.run()
    msgs = carry(a, b)
    assert {m.vshard for m in msgs} == set(vs)
    assert sum(len(r) for r in b.broker.replicas.held.values()) == 3
    # b's worker restarted (its routes come): everything again
    b.broker.replicas.held.clear()
    a.broker.replicas.peer_synced(B_PEER)
    a.run()
    carry(a, b)
    assert sum(len(r) for r in b.broker.replicas.held.values()) == 3
    # b backs up only the first of them now: it forgets the others after KEEP_AFTER (a
    # successor that has none yet may ask for them meanwhile)
    b.broker.place_replicas([], (), lambda v: v == vs[0], b.now)
    b.advance(KEEP_AFTER - 1)
    assert sorted(b.broker.replicas.held) == sorted(vs)
    b.advance(2)
    assert list(b.broker.replicas.held) == [vs[0]]


def test_a_large_set_goes_in_chunks_that_together_replace_the_one_held(
        pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    b.broker.replicas.held[V] = {"stale": b"x"}
    long_filter = "f/" + "x" * 2000
    cids = [cid for cid in (f"{CID}{i}" for i in range(20000)) if vshard_for(cid, COUNT) == V][:4]
    assert len(cids) == 4
    for cid in cids:  # about 40 KB of filters each
        c = a.connect(cid, clean=False)
        c.send(Subscribe(1, tuple(Subscription(f"{long_filter}/{j}", 1) for j in range(20))))
    a.link.take()
    a.broker.replicas.send_full([V])
    a.run()
    msgs = carry(a, b)
    assert len(msgs) >= 4  # one record each: two do not fit in one (the last write may follow)
    assert msgs[0].vshard == V and all(m.vshard == -1 for m in msgs[1:])
    assert all(len(m.items) == 1 for m in msgs)
    assert set(b.broker.replicas.held[V]) == set(cids)  # "stale" went with the whole set


def qos2_sent(a: Harness, payload: bytes) -> tuple[FakeClient, int]:
    """CID on ``a``, persistent, subscribed to t/# at QoS 2, and sent ``payload`` at QoS 2:
    the client and the packet id it got it under (no PUBREC yet)."""
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 2),)))
    pub = a.connect("pub")
    pub.send(Publish("t/x", payload, 2, packet_id=1))
    pub.send(PubRel(1))
    sent = [p for p in c.packets() if isinstance(p, Publish)]
    assert [p.payload for p in sent] == [payload]
    return c, sent[0].packet_id


def go_home(a: Harness, b: Harness) -> None:
    """``a``'s node is back: ``b`` gives it the shard, and ``a`` takes the session (merged with
    its own)."""
    assert b.broker.give_shard(V, A_PEER, 9, b.now) == 1
    b.run()
    states: list[PeerMessage] = [m for peer, m in b.link.take()
                                 if peer == A_PEER and isinstance(m, (ShardState, ShardStateEnd))]
    from_sender(states, B_PEER)
    a.peer_messages(states)


def test_the_qos2_packet_ids_in_flight_go_with_the_copy(pair: tuple[Harness, Harness]) -> None:
    """The successor sends PUBREL for the ids of messages the client acknowledged (PUBREC),
    holds the ids of those it may or may not have (not reusing them for new messages), and
    takes a publish the client sends again as the one it had. Held ids are released (PUBREL)
    once their messages have not come back for ``HOLD_FOR_LOST``."""
    a, b = pair
    c, acked = qos2_sent(a, b"one")
    c.send(PubRec(acked))  # the client has it, awaiting PUBREL
    c.send(Publish("t/mine", b"mine", 2, packet_id=7))  # and sent one, awaiting PUBREL too
    carry(a, b)
    on_a = a.broker.sessions.get(CID)
    assert on_a is not None
    in_flight = sorted(on_a.inflight)  # "one", and its own "mine" (t/# matches it): no PUBREC
    unknown = [pid for pid in in_flight if pid != acked]
    assert acked in in_flight and len(unknown) == 1
    watcher = b.connect("watcher")
    watcher.send(Subscribe(1, (Subscription("t/mine", 2),)))
    watcher.packets()
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    again = b.connect(CID, clean=False, keepalive=0)
    packets = again.packets()
    assert packets[0].session_present
    assert [p.packet_id for p in packets if isinstance(p, PubRel)] == [acked]
    again.send(PubComp(acked))
    again.send(Publish("t/mine", b"mine", 2, packet_id=7, dup=True))  # sent again
    assert [p for p in watcher.packets() if isinstance(p, Publish)] == []  # not twice
    assert any(isinstance(p, PubRec) and p.packet_id == 7 for p in again.packets())
    b.connect("pub2").send(Publish("t/y", b"two", 2, packet_id=1))
    new = [p for p in again.packets() if isinstance(p, Publish)]
    assert [p.payload for p in new] == [b"two"] and new[0].packet_id not in in_flight
    again.send(PubRec(new[0].packet_id))
    again.send(PubComp(new[0].packet_id))
    again.packets()
    b.advance(HOLD_FOR_LOST + 1)  # the lost node's message did not come back: released
    assert [p.packet_id for p in again.packets() if isinstance(p, PubRel)] == unknown
    sess = b.broker.sessions.get(CID)
    assert sess is not None and sess.inflight[unknown[0]].state == AWAIT_PUBCOMP


def test_a_message_in_flight_on_the_lost_node_comes_back_under_its_packet_id(
        pair: tuple[Harness, Harness]) -> None:
    """The lost node had sent the client a QoS 2 message and seen no PUBREC: when the shard
    comes back to it, that message goes again under the packet id the successor held for it,
    with DUP, not as a new message: a client that had it takes it as the same one."""
    a, b = pair
    c, pid = qos2_sent(a, b"in-doubt")
    carry(a, b)
    c.drop()  # a's node is lost (no PUBREC reached it)
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    b.advance(1, tick=False)  # its session on b is the newer one: it is the one kept
    mid = b.connect(CID, clean=False)  # the client on b: nothing for that id yet
    assert [p for p in mid.packets() if isinstance(p, (Publish, PubRel))] == []
    mid.drop()
    go_home(a, b)  # a is back: the shard goes home, the two sessions merge
    assert a.broker.stats["moves_refilled"] == 1
    back = a.connect(CID, clean=False)
    again = [p for p in back.packets() if isinstance(p, Publish)]
    assert [(p.payload, p.packet_id, p.dup) for p in again] == [(b"in-doubt", pid, True)]


def test_a_session_taken_from_a_copy_moves_on_without_the_publish_numbers(
        pair: tuple[Harness, Harness]) -> None:
    """It lacks the publishes its lost node got: its next owner must not take a late copy of
    one of those for one it already has."""
    a, b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    b.connect("pub").send(Publish("t/x", b"numbered", 1, packet_id=1))  # b has applied a number
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.link.take()
    assert b.broker.give_shard(V, A_PEER, 9, b.now) == 1
    b.run()
    states = [m for peer, m in b.link.take() if peer == A_PEER and isinstance(m, ShardState)]
    assert len(states) == 1 and len(states[0].sessions) == 1 and states[0].seen == ()


def test_a_parked_session_still_gets_forwards_but_its_routes_are_not_announced(
        pair: tuple[Harness, Harness]) -> None:
    """A node back from a lost lease holds sessions of shards served elsewhere now: no peer
    is to send them new publishes (their owner gets those), but what other nodes' outboxes
    kept for them still reaches them."""
    a, _b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    c.drop()
    a.link.take()
    assert a.broker.park_unserved(lambda cid: False, a.now) == 1
    a.run()
    removed = [m for _, m in a.link.take() if isinstance(m, (RouteRemove, RoutesRemove))]
    assert removed and "t/#" not in a.broker.subscriptions.route_keys()
    assert a.broker.park_unserved(lambda cid: False, a.now) == 1  # again: nothing more to say
    a.run()
    assert a.link.take() == []
    a.peer_messages([DurableForward(768, 1, Forward("t/x", b"kept-for-it", 1, False), 5)])
    other = a.connect("other", clean=False)  # a session served here subscribes to the same filter
    other.send(Subscribe(1, (Subscription("t/#", 1),)))
    a.run()
    assert any(isinstance(m, RoutesAdd) and ("t/#", True) in m.keys for _, m in a.link.take())
    other.send(Unsubscribe(2, ("t/#",)))  # the last visible one goes: withdrawn again
    a.run()
    assert any(isinstance(m, RouteRemove) and m.key == "t/#" for _, m in a.link.take())
    assert a.broker.park_unserved(lambda cid: True, a.now) == 0  # served again: announced
    a.run()
    assert any(isinstance(m, RoutesAdd) and ("t/#", True) in m.keys for _, m in a.link.take())
    again = a.connect(CID, clean=False)
    assert [p.payload for p in again.packets() if isinstance(p, Publish)] == [b"kept-for-it"]


def test_ids_the_lost_node_gave_after_its_last_copy_are_not_given_again_and_come_back(
        pair: tuple[Harness, Harness]) -> None:
    """The lost node sent the client two QoS 2 messages whose copies never reached the backup
    (its bus stopped with them): one the client acknowledged (PUBREC), one not. The successor
    gives new messages ids past those (``PID_SKIP`` after the next id the copy named), and
    when the shard comes back, the merged session sends the unacknowledged one again under
    its own id with DUP, and PUBREL for the other."""
    a, b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 2),)))
    carry(a, b)
    on_a = a.broker.sessions.get(CID)
    assert on_a is not None
    copied_next = on_a.next_pid
    pub = a.connect("pub")
    for i, payload in enumerate((b"late-acked", b"late")):
        pub.send(Publish("t/x", payload, 2, packet_id=i + 1))
        pub.send(PubRel(i + 1))
    sent = {p.payload: p.packet_id for p in c.packets() if isinstance(p, Publish)}
    c.send(PubRec(sent[b"late-acked"]))
    a.link.take()  # these copies are lost with the node
    c.drop()
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    b.advance(1, tick=False)
    mid = b.connect(CID, clean=False)
    b.connect("pub2").send(Publish("t/y", b"on-b", 2, packet_id=1))
    on_b = [p for p in mid.packets() if isinstance(p, Publish)]
    assert [(p.payload, p.packet_id) for p in on_b] == [(b"on-b", (copied_next - 1 + PID_SKIP) % 65535 + 1)]
    mid.send(PubRec(on_b[0].packet_id))
    mid.send(PubComp(on_b[0].packet_id))
    mid.drop()
    go_home(a, b)  # a is back: the shard goes home, the two sessions merge
    assert a.broker.stats["moves_refilled"] == 1
    back = a.connect(CID, clean=False)
    packets = back.packets()
    assert [(p.payload, p.packet_id, p.dup) for p in packets if isinstance(p, Publish)] == [
        (b"late", sent[b"late"], True)]
    assert [p.packet_id for p in packets if isinstance(p, PubRel)] == [sent[b"late-acked"]]


def hand(giver: Harness, giver_peer: int, taker: Harness, taker_peer: int, version: int) -> None:
    """``giver`` gives virtual shard V to ``taker``, which takes its sessions."""
    assert giver.broker.give_shard(V, taker_peer, version, giver.now) == 1
    giver.run()
    states: list[PeerMessage] = [m for peer, m in giver.link.take()
                                 if peer == taker_peer and isinstance(m, (ShardState, ShardStateEnd))]
    from_sender(states, giver_peer)
    taker.peer_messages(states)


@pytest.mark.parametrize("detour", [False, True])
def test_a_publish_both_the_successor_and_the_lost_node_got_is_delivered_once_after_the_merge(
        pair: tuple[Harness, Harness], tmp_path: Path, detour: bool) -> None:
    """Until a publisher's shard learns that the lost node's shards are taken, it sends a QoS
    1/2 publish for them into its outbox for the lost node (``Peers.peer_removed``), and to the
    successor where it has other subscribers: the session taken from the copy notes its
    number, and the merge with the lost node's session drops that one's copy of it, whether
    the lost node had it before the merge or gets it after. One only the lost node got still
    comes. With ``detour``, the shard went from the successor to a third node first: the
    numbers go with the session."""
    a, b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    c.drop()
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    source = 768  # a worker of a third node, which published them

    def forward(seq: int, payload: bytes, mid: int) -> DurableForward:
        return DurableForward(source, seq, Forward("t/x", payload, 1, False), mid)

    b.peer_messages([forward(1, b"both", 1000), forward(2, b"both-late", 1002)])
    a.peer_messages([forward(1, b"both", 1000), forward(2, b"only-a", 1001)])
    b.advance(1, tick=False)
    b.connect(CID, clean=False).drop()  # on b since: its session is the newer one, kept
    if detour:
        d_peer = 1024  # worker 0 of node 4
        d = Harness(tmp_path / "d", peers=[A_PEER, B_PEER])
        try:
            hand(b, B_PEER, d, d_peer, 9)
            hand(d, d_peer, a, A_PEER, 10)
        finally:
            d.close()
    else:
        go_home(a, b)
    a.peer_messages([forward(3, b"both-late", 1002)])  # the lost node's copy, after the merge
    back = a.connect(CID, clean=False)
    assert sorted(p.payload for p in back.packets() if isinstance(p, Publish)) == [
        b"both", b"both-late", b"only-a"]
    assert a.broker.stats["moves_duplicates"] == 2


def test_a_held_id_whose_message_the_lost_node_saw_acknowledged_gets_pubrel_at_the_merge(
        pair: tuple[Harness, Harness]) -> None:
    """The copy held the id for a message without PUBREC; the lost node then saw the PUBREC
    (its copy saying so never left): at the merge the id is released at once (PUBREL), not
    after ``HOLD_FOR_LOST``."""
    a, b = pair
    c, pid = qos2_sent(a, b"acked-late")
    carry(a, b)
    c.send(PubRec(pid))  # the copy saying so is lost with the node
    a.link.take()
    c.drop()
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    b.advance(1, tick=False)
    b.connect(CID, clean=False).drop()  # on b since: its session is the newer one, kept
    go_home(a, b)
    back = a.connect(CID, clean=False)
    packets = back.packets()
    assert [p.packet_id for p in packets if isinstance(p, PubRel)] == [pid]
    assert [p for p in packets if isinstance(p, Publish)] == []


def resend_after_loss(pair: tuple[Harness, Harness], lost_node_took_it: bool) -> tuple[FakeClient, FakeClient,
                                                                                       list[PeerMessage]]:
    """CID publishes at QoS 2 (id 5) to a subscriber on ``b``. With ``lost_node_took_it``,
    ``a`` took it and routed it, but its bus stopped with the forward and with the copy that
    names the id; else the publish never reached ``a``. ``b`` restores the session and the
    client sends the publish again (DUP): the client, the watcher on ``b``, and the forwards
    ``a`` could not send."""
    a, b = pair
    watcher = b.connect("watcher")
    watcher.send(Subscribe(1, (Subscription("t/mine", 2),)))
    watcher.packets()
    a.peer_messages([RoutesAdd(B_PEER, (("t/mine", True),))])
    c = a.connect(CID, clean=False)
    carry(a, b)
    stuck: list[PeerMessage] = []
    if lost_node_took_it:
        c.send(Publish("t/mine", b"once", 2, packet_id=5))
        stuck = [m for peer, m in a.link.take() if peer == B_PEER and isinstance(m, DurableForward)]
        assert len(stuck) == 1  # routed, and lost with the copy naming id 5
        assert CID in a.broker.sessions.stored_client_ids
    c.drop()
    a.link.take()
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    again = b.connect(CID, clean=False, keepalive=0)
    assert again.packets()[0].session_present
    again.send(Publish("t/mine", b"once", 2, packet_id=5, dup=True))
    assert [p for p in again.packets() if isinstance(p, PubRec)] == []  # it waits, unacknowledged
    assert [p for p in watcher.packets() if isinstance(p, Publish)] == []
    assert b.broker.stats["resends_waited"] == 1
    return again, watcher, stuck


@pytest.mark.parametrize("lost_node_took_it", [True, False])
def test_a_qos2_resend_after_a_loss_waits_for_the_lost_node_and_arrives_once(
        pair: tuple[Harness, Harness], lost_node_took_it: bool) -> None:
    """A QoS 2 publish the client sends again to the successor, under an id its copy did not
    name, waits until the lost node's session merges: if that one had the id, the lost node
    routed it (its forward arrives when it is back), so it is only acknowledged; if not, it is
    taken then."""
    a, b = pair
    again, watcher, stuck = resend_after_loss(pair, lost_node_took_it)
    hand(a, A_PEER, b, B_PEER, 9)  # a is back, and its session of CID merges with b's
    b.run()
    assert any(isinstance(p, PubRec) and p.packet_id == 5 for p in again.packets())
    routed = [p.payload for p in watcher.packets() if isinstance(p, Publish)]
    assert routed == ([] if lost_node_took_it else [b"once"])
    assert b.broker.stats["resends_had"] == int(lost_node_took_it)
    from_sender(stuck, A_PEER)
    b.peer_messages(stuck)  # the lost node's forward, once its bus runs again
    delivered = routed + [p.payload for p in watcher.packets() if isinstance(p, Publish)]
    assert delivered == [b"once"]
    again.send(PubRel(5))
    assert any(isinstance(p, PubComp) and p.packet_id == 5 for p in again.packets())
    again.send(Publish("t/mine", b"next", 2, packet_id=5, dup=True))  # the id again: a new one now
    assert any(isinstance(p, PubRec) and p.packet_id == 5 for p in again.packets())
    assert [p.payload for p in watcher.packets() if isinstance(p, Publish)] == [b"next"]


def test_a_waiting_resend_is_taken_after_the_wait_or_sent_again_by_a_new_connection(
        pair: tuple[Harness, Harness]) -> None:
    """The lost node does not come back: after ``RESENDS_WAIT`` the resend is taken as new.
    One whose connection ended meanwhile is not taken: the client sends it again."""
    _a, b = pair
    again, watcher, _stuck = resend_after_loss(pair, True)
    again.drop()
    later = b.connect(CID, clean=False, keepalive=0)
    later.packets()
    later.send(Publish("t/mine", b"once", 2, packet_id=5, dup=True))
    assert [p for p in later.packets() if isinstance(p, PubRec)] == []
    b.advance(RESENDS_WAIT + 1)
    assert [p.packet_id for p in later.packets() if isinstance(p, PubRec)] == [5]
    assert [p.payload for p in watcher.packets() if isinstance(p, Publish)] == [b"once"]
    later.send(Publish("t/mine", b"dup-later", 2, packet_id=6, dup=True))  # no longer waited for
    assert [p.packet_id for p in later.packets() if isinstance(p, PubRec)] == [6]


def restored_while_connected(a: Harness, b: Harness) -> FakeClient:
    """CID on ``a``, persistent, subscribed to t/# at QoS 1, its copy on ``b``, which takes it
    while the client is still connected to ``a`` (stopped, not closed): the client."""
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    assert b.broker.place_replicas([V], (), lambda v: True, b.now) == 1
    b.run()
    b.link.take()
    return c


def forward(seq: int, payload: bytes, mid: int) -> DurableForward:
    """A QoS 1 publish to t/x from worker 0 of a third node, numbered ``mid`` there."""
    return DurableForward(768, seq, Forward("t/x", payload, 1, False), mid)


def test_a_publish_that_came_both_ways_is_delivered_once_when_the_lost_nodes_session_is_kept(
        pair: tuple[Harness, Harness]) -> None:
    """The client stayed on the lost node (stopped, not closed) and never reached the
    successor: once back, that node closes it, so its session is the newer one and is kept at
    the merge. The other session's copy of a publish both got is dropped (its stored state
    has no numbers: a copy with the same topic and payload), and so is a later one from the
    lost node's outbox."""
    a, b = pair
    c = restored_while_connected(a, b)
    b.peer_messages([forward(1, b"both", 1000), forward(2, b"both-late", 1002), forward(3, b"same", 1003)])
    a.advance(2, tick=False)
    c.drop()  # the lost node is back and closes its client: its session is the newer one
    a.peer_messages([forward(1, b"same", 999), forward(2, b"both", 1000), forward(3, b"only-a", 1001)])
    go_home(a, b)
    a.peer_messages([forward(4, b"both-late", 1002)])  # the lost node's copy, after the merge
    # one publish to both, before the publisher's worker hears the session moved: b relays
    # its copy to a, which has had it straight
    a.peer_messages([forward(5, b"twice", 1005)])
    b.peer_messages([forward(4, b"twice", 1005)])
    relayed: list[PeerMessage] = [m for peer, m in b.link.take() if peer == A_PEER and isinstance(m, DurableForward)]
    assert len(relayed) == 1
    from_sender(relayed, B_PEER)
    a.peer_messages(relayed)
    back = a.connect(CID, clean=False)
    assert sorted(p.payload for p in back.packets() if isinstance(p, Publish)) == [
        b"both", b"both-late", b"only-a", b"same", b"same", b"twice"]
    assert a.broker.stats["moves_duplicates"] == 3


def test_a_publish_that_came_both_ways_is_delivered_once_when_the_lost_nodes_session_moves_in(
        pair: tuple[Harness, Harness]) -> None:
    """The lost node is back, its session of the client the newer one, and the shard stays
    with the successor: the lost node's state is taken there, and the successor's own copy
    of a publish both got goes (the state has no numbers: the one alike)."""
    a, b = pair
    c = restored_while_connected(a, b)
    b.peer_messages([forward(1, b"both", 1000), forward(2, b"only-b", 1001)])
    a.advance(2, tick=False)
    c.drop()  # the lost node is back and closes its client: its session is the newer one
    a.peer_messages([forward(1, b"both", 1000), forward(2, b"only-a", 999)])
    hand(a, A_PEER, b, B_PEER, 9)
    back = b.connect(CID, clean=False)
    assert sorted(p.payload for p in back.packets() if isinstance(p, Publish)) == [
        b"both", b"only-a", b"only-b"]
    assert b.broker.stats["moves_duplicates"] == 1


def test_a_qos2_resend_after_the_shard_went_home_is_acknowledged_only(pair: tuple[Harness, Harness]) -> None:
    """The client's resend waited on the successor; the shard then went back to the lost node
    (its connection closed: the resend dropped), with the successor's session the newer one,
    taken there. The lost node's own session had the id: the client's next resend (DUP) is
    acknowledged only, and a new publish under that id (no DUP) is taken."""
    a, b = pair
    resend_after_loss(pair, True)
    b.advance(2, tick=False)
    go_home(a, b)  # b closes the client: its session is the newer one
    sess = a.broker.sessions.get(CID)
    assert sess is not None and not sess.has_qos2_in(5)  # b's state was taken
    a.link.take()
    back = a.connect(CID, clean=False)
    back.packets()
    back.send(Publish("t/mine", b"once", 2, packet_id=5, dup=True))
    assert [p.packet_id for p in back.packets() if isinstance(p, PubRec)] == [5]
    assert [m for _peer, m in a.link.take() if isinstance(m, DurableForward)] == []  # not routed again
    assert a.broker.stats["resends_had"] == 1
    back.send(PubRel(5))
    back.packets()
    back.send(Publish("t/mine", b"new", 2, packet_id=5))
    assert [p.packet_id for p in back.packets() if isinstance(p, PubRec)] == [5]
    routed = [m for _peer, m in a.link.take() if isinstance(m, DurableForward)]
    assert [m.forward.payload for m in routed] == [b"new"]


def test_a_successor_without_copies_asks_and_one_that_kept_them_answers(
        pair: tuple[Harness, Harness], tmp_path: Path) -> None:
    """b backed up V and stopped being its backup a moment ago (it keeps the copies
    ``KEEP_AFTER``); c is its new backup and has had none yet when a's node is lost. c asks
    every worker (its clients wait), b answers with its set, and c serves the sessions; the
    shard is announced as taken then. Nobody answering, c serves the shard without them
    after ``COPIES_WAIT`` and announces it all the same."""
    a, b = pair
    c_peer, lost = 768, A_PEER
    cl = a.connect(CID, clean=False)
    cl.send(Subscribe(1, (Subscription("t/#", 1),)))
    carry(a, b)
    b.broker.place_replicas([], (), lambda v: False, b.now)  # no longer V's backup
    c = Harness(tmp_path / "c", peers=[A_PEER, B_PEER])
    try:
        assert c.broker.place_replicas([V], (), lambda v: True, c.now, {V: lost}) == 0
        c.run()
        out = c.link.take()
        assert [m for _, m in out if isinstance(m, ReplicasQuery)] == [ReplicasQuery(0, (V,))] * 2
        assert not any(isinstance(m, ShardsTaken) for _, m in out)
        assert c.broker.awaiting_copies(V)
        query: list[PeerMessage] = [ReplicasQuery(0, (V,))]
        from_sender(query, c_peer)
        b.peer_messages(query)
        answer: list[PeerMessage] = [m for peer, m in b.link.take() if peer == c_peer]
        assert [type(m) for m in answer] == [SessionReplicas]
        from_sender(answer, B_PEER)
        c.peer_messages(answer)
        assert not c.broker.awaiting_copies(V)
        assert c.broker.stats["sessions_restored"] == 1
        sess = c.broker.sessions.get(CID)
        assert sess is not None and set(sess.subscriptions or {}) == {"t/#"}
        assert [m for peer, m in c.link.take() if isinstance(m, ShardsTaken) and peer == B_PEER] == [
            ShardsTaken(0, lost, (V,))]
        # a shard no lost worker served (the map gives it out first): nothing to ask
        fresh = (V + 2) % COUNT
        c.broker.place_replicas([fresh], (), lambda v: True, c.now, {})
        c.run()
        assert not c.broker.awaiting_copies(fresh)
        assert not any(isinstance(m, ReplicasQuery) for _, m in c.link.take())
        # another shard nobody has copies of: served without them after the wait
        other = (V + 1) % COUNT
        c.broker.place_replicas([other], (), lambda v: True, c.now, {other: lost})
        c.run()
        c.link.take()
        c.advance(COPIES_WAIT + 0.5)
        assert not c.broker.awaiting_copies(other)
        assert c.broker.stats["replicas_not_found"] == 1
        assert [m for peer, m in c.link.take() if isinstance(m, ShardsTaken) and peer == B_PEER] == [
            ShardsTaken(0, lost, (other,))]
    finally:
        c.close()


def test_sessions_given_to_a_worker_lost_before_it_passed_them_on_are_kept(
        pair: tuple[Harness, Harness]) -> None:
    """a gave V to b, which acknowledged the sessions and was lost before copying them to its
    backup; the map gives V back to a with nobody to send them: a serves the sessions it had
    not dropped yet, as if taken from a copy (a QoS 2 resend waits for b's session)."""
    a, _b = pair
    c = a.connect(CID, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    c.drop()
    a.link.take()
    assert a.broker.give_shard(V, B_PEER, 9, a.now) == 1
    a.run()
    a.link.take()
    ack: list[PeerMessage] = [ShardStateAck(0, V, 9, 1)]
    from_sender(ack, B_PEER)
    a.peer_messages(ack)
    assert V in a.broker.moves.ending  # acknowledged: waiting for its peers before it drops them
    assert a.broker.moves.keep_given(V) == 1
    assert a.broker.stats["sessions_restored"] == 1
    a.advance(BARRIER_WAIT + 1)  # nothing dropped after all
    assert CID in a.broker.sessions.stored_client_ids
    again = a.connect(CID, clean=False, keepalive=0)
    assert again.packets()[0].session_present
    a.connect("pub").send(Publish("t/x", b"after", 1, packet_id=1))
    assert [p.payload for p in again.packets() if isinstance(p, Publish)] == [b"after"]
    again.send(Publish("t/x", b"resent", 2, packet_id=9, dup=True))
    assert [p for p in again.packets() if isinstance(p, PubRec)] == []  # waits for b's session
