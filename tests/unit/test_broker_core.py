"""The broker core driven without a loop or sockets: fake clients, a fake clock, a fake peer link.

Each test drives ``shardbroker.core.broker.Broker`` through its entry points, as the
worker does, and reads what it wrote to each client (``core_harness``). The store is
a real LMDB environment in a temporary directory, so restarts are real too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from core_harness import FakeTransport, Harness

from shardbroker.config import load_config
from shardbroker.core.backpressure import (
    HOLD_LEASE,
    QUEUE_HIGH_WATER,
    QUEUE_LOW_WATER,
    WITHHELD_MAX,
)
from shardbroker.core.session import NO_INFLIGHT
from shardbroker.core.subscriptions import REPLAY_ROWS, ROUTE_ACK_TIMEOUT
from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    ForwardAck,
    Hold,
    Release,
    RouteAck,
    RouteAdd,
    RouteRemove,
    Routes,
    RoutesAdd,
    RoutesRemove,
)
from shardbroker.protocol import codec, reasons
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    NO_PROPERTIES,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from shardbroker.sharding import shard_for
from shardbroker.storage.records import StoredMessage
from shardbroker.storage.stamps import RetainedOp

MakeHarness = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[MakeHarness]:
    """Harnesses on ``tmp_path`` (``Harness`` arguments after the directory), closed after the test."""
    made: list[Harness] = []

    def build(*args: Any, **kwargs: Any) -> Harness:
        made.append(Harness(tmp_path, *args, **kwargs))
        return made[-1]

    yield build
    for harness in made:
        harness.close()


@pytest.fixture
def h(make: MakeHarness) -> Harness:
    return make()


def _sub(topic: str, qos: int) -> Subscribe:
    return Subscribe(1, (Subscription(topic, qos),))


def _publishes(packets: list[object]) -> list[Publish]:
    return [p for p in packets if isinstance(p, Publish)]


# --------------------------------------------------------------------------- CONNECT and takeover


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_connect_is_answered_with_connack(h: Harness, version: int) -> None:
    c = h.connect("a", version)
    [ack] = c.packets()
    assert isinstance(ack, ConnAck) and ack.reason_code == 0 and not ack.session_present
    assert c.client.connected and h.broker.sessions.get("a") is not None


def test_session_present_after_reconnect_of_persistent_session(h: Harness) -> None:
    c = h.connect("a", clean=False)
    c.packets()
    c.send(Disconnect())
    assert c.transport.closed
    c2 = h.connect("a", clean=False)
    [ack] = c2.packets()
    assert isinstance(ack, ConnAck) and ack.session_present


def test_clean_start_discards_the_old_session(h: Harness) -> None:
    c = h.connect("a", clean=False)
    c.send(_sub("t", 1))
    c.send(Disconnect())
    c2 = h.connect("a", clean=True)
    [ack] = c2.packets()
    assert not ack.session_present
    assert h.broker.sessions.get("a").subscriptions is None
    assert "t" not in h.broker.subscriptions.route_keys()


def test_a_client_that_sent_disconnect_is_closed_without_linger(h: Harness) -> None:
    # it sends nothing more: its transport need not drain input before closing; a connection
    # the broker ends itself (here a takeover) may still be sending, and lingers
    c = h.connect("a")
    c.packets()
    c.send(Disconnect())
    assert c.transport.closed and c.transport.lingered is False
    old = h.connect("b")
    old.packets()
    h.connect("b")
    assert old.transport.closed and old.transport.lingered is True
    assert not h.broker.output._ended  # nothing kept of the closed ones


def test_takeover_closes_the_old_connection_with_0x8e(h: Harness) -> None:
    old = h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=60))
    old.send(_sub("t", 1))
    old.packets()
    new = h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=60))
    [disconnect] = old.packets()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == reasons.SESSION_TAKEN_OVER
    assert old.transport.closed and old.transport.close_reason == "session taken over"
    [ack] = new.packets()
    assert ack.session_present
    assert h.broker.sessions.get("a").client is new.client
    assert "t" in (h.broker.sessions.get("a").subscriptions or {})


def test_takeover_publishes_the_old_will_only_when_the_session_ends(h: Harness) -> None:
    watcher = h.connect("w")
    watcher.send(_sub("will/#", 0))
    watcher.packets()
    h.connect("a", clean=False, will=Will("will/a", b"gone"))
    h.connect("a", clean=False)  # same session continues: a 3.1.1 will has delay 0, so it fires
    assert [p.payload for p in _publishes(watcher.packets())] == [b"gone"]


def test_authentication_method_is_refused_with_0x8c(h: Harness) -> None:
    c = h.connect("a", MQTT_5, properties=Properties(authentication_method="SCRAM-SHA-256"))
    [ack] = c.packets()
    assert ack.reason_code == reasons.BAD_AUTHENTICATION_METHOD
    assert c.transport.closed and h.broker.sessions.get("a") is None


def test_will_to_sys_is_refused(h: Harness) -> None:
    c = h.connect("a", MQTT_5, will=Will("$SYS/x", b"no"))
    [ack] = c.packets()
    assert ack.reason_code == reasons.NOT_AUTHORIZED and c.transport.closed


def test_first_packet_other_than_connect_aborts(h: Harness) -> None:
    c = h.client("x")
    c.send(PingReq())
    assert c.transport.aborted and c.packets() == []
    assert c.transport.close_reason == "first packet is not CONNECT"


def test_second_connect_is_a_protocol_violation(h: Harness) -> None:
    from shardbroker.protocol.packets import Connect

    c = h.connect("a", MQTT_5)
    c.packets()
    c.send(Connect("a", MQTT_5))
    [d] = c.packets()
    assert isinstance(d, Disconnect) and d.reason_code == reasons.PROTOCOL_ERROR and c.transport.closed


def test_session_limit_refuses_new_sessions(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_sessions": 1})
    h = make(config)
    h.connect("a").packets()
    c = h.connect("b", MQTT_5)
    [ack] = c.packets()
    assert ack.reason_code == reasons.QUOTA_EXCEEDED


# --------------------------------------------------------------------------- commit before bytes


def test_puback_leaves_only_at_the_flush(h: Harness) -> None:
    c = h.connect("p")
    c.packets()
    h.broker.received(c.client, b"\x32\x06\x00\x01t\x00\x07x", h.now)  # QoS 1 PUBLISH, id 7
    assert c.packets() == []  # nothing written yet: the commit comes first
    h.run()
    assert c.packets() == [PubAck(7)]


def test_sessions_with_nothing_in_flight_share_one_empty_map(h: Harness) -> None:
    sub = h.connect("s")
    sub.send(_sub("t", 1))
    sub.packets()
    sess = h.broker.sessions.get("s")
    assert sess is not None and sess.inflight is NO_INFLIGHT
    with pytest.raises(TypeError):
        NO_INFLIGHT[1] = sess.inflight.get(1)  # type: ignore[assignment]
    pub = h.connect("p")
    pub.send(Publish("t", b"x", qos=1, packet_id=1))
    pub.send(Publish("t", b"y", qos=1, packet_id=2))
    first, second = _publishes(sub.packets())
    assert sess.inflight is not NO_INFLIGHT and len(sess.inflight) == 2
    sub.send(PubAck(first.packet_id))
    assert list(sess.inflight) == [second.packet_id]
    sub.send(PubAck(second.packet_id))
    assert sess.inflight is NO_INFLIGHT and not NO_INFLIGHT


class _AddressCounted(FakeTransport):
    """A transport that counts how often its address is read (a ``getpeername`` on TCP)."""

    def __init__(self, name: str) -> None:
        self.asked = 0
        super().__init__(name)

    @property  # type: ignore[override]
    def peer(self) -> str:
        self.asked += 1
        return "192.0.2.7:1883"

    @peer.setter
    def peer(self, value: str) -> None:
        pass


def test_connect_and_disconnect_lines_read_no_address_below_info(h: Harness,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    def connect_and_leave(client_id: str) -> _AddressCounted:
        t = _AddressCounted(client_id)
        client = h.broker.open_client(t, None, h.now)
        h.broker.received(client, codec.encode(Connect(protocol_version=MQTT_3_1_1, client_id=client_id),
                                               MQTT_3_1_1), h.now)
        h.run()
        h.broker.received(client, codec.encode(Disconnect(), MQTT_3_1_1), h.now)
        h.run()
        return t

    with caplog.at_level("WARNING", logger="shardbroker.clients"):
        assert connect_and_leave("quiet").asked == 0
    with caplog.at_level("INFO", logger="shardbroker.clients"):
        assert connect_and_leave("told").asked > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "shardbroker.clients"]
    assert len(lines) == 2 and all(line.startswith("client told ") and "192.0.2.7:1883" in line for line in lines)


def test_pingreq(h: Harness) -> None:
    c = h.connect("p")
    c.packets()
    c.send(PingReq())
    assert c.packets() == [PingResp()]


# --------------------------------------------------------------------------- QoS 2 both ways


def test_qos2_inbound_is_routed_once_and_completed(h: Harness) -> None:
    sub = h.connect("s")
    sub.send(_sub("t", 0))
    sub.packets()
    pub = h.connect("p", MQTT_5)
    pub.packets()
    pub.send(Publish("t", b"x", qos=2, packet_id=5))
    assert pub.packets() == [PubRec(5)]
    pub.send(Publish("t", b"x", qos=2, packet_id=5, dup=True))  # a resend before PUBREL
    assert pub.packets() == [PubRec(5)]
    assert [p.payload for p in _publishes(sub.packets())] == [b"x"]  # delivered once
    pub.send(PubRel(5))
    assert pub.packets() == [PubComp(5)]
    pub.send(PubRel(5))
    assert pub.packets() == [PubComp(5, reasons.PACKET_IDENTIFIER_NOT_FOUND)]


def test_qos2_outbound_exchange_and_pubrel_resent_on_resume(h: Harness) -> None:
    sub = h.connect("s", clean=False)
    sub.send(_sub("t", 2))
    sub.packets()
    pub = h.connect("p")
    pub.send(Publish("t", b"x", qos=2, packet_id=1))
    [out] = _publishes(sub.packets())
    assert out.qos == 2 and out.packet_id is not None
    sub.send(PubRec(out.packet_id))
    assert sub.packets() == [PubRel(out.packet_id)]
    sub.drop()  # before PUBCOMP
    again = h.connect("s", clean=False)
    packets = again.packets()
    assert packets[0].session_present and packets[1:] == [PubRel(out.packet_id)]
    again.send(PubComp(out.packet_id))
    assert h.broker.sessions.get("s").inflight == {}


def test_qos2_incoming_ids_survive_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    sub = h.connect("s", clean=False)
    sub.send(_sub("t", 2))
    pub = h.connect("p", clean=False)
    pub.send(Publish("t", b"x", qos=2, packet_id=9))
    assert PubRec(9) in pub.packets()
    h = h.restart()
    try:
        pub = h.connect("p", clean=False)
        pub.packets()
        pub.send(Publish("t", b"x", qos=2, packet_id=9, dup=True))  # resent after the crash
        assert pub.packets() == [PubRec(9)]
        sub = h.connect("s", clean=False)
        assert [p.payload for p in _publishes(sub.packets())] == [b"x"]  # exactly once, from the store
    finally:
        h.close()


def test_queued_qos1_is_delivered_after_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    sub = h.connect("s", clean=False)
    sub.send(_sub("t", 1))
    sub.drop()
    pub = h.connect("p")
    for i in range(3):
        pub.send(Publish("t", b"m%d" % i, qos=1, packet_id=i + 1))
    h = h.restart()
    try:
        sub = h.connect("s", clean=False)
        assert [p.payload for p in _publishes(sub.packets())] == [b"m0", b"m1", b"m2"]
    finally:
        h.close()


# --------------------------------------------------------------------------- wills and expiry


def test_will_on_lost_connection_not_on_disconnect(h: Harness) -> None:
    watcher = h.connect("w")
    watcher.send(_sub("will/#", 0))
    watcher.packets()
    a = h.connect("a", will=Will("will/a", b"a-gone"))
    a.drop()
    b = h.connect("b", will=Will("will/b", b"b-gone"))
    b.send(Disconnect())
    assert [p.payload for p in _publishes(watcher.packets())] == [b"a-gone"]


def test_will_delay_fires_after_the_delay(h: Harness) -> None:
    watcher = h.connect("w")
    watcher.send(_sub("will/#", 0))
    watcher.packets()
    a = h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=100),
                  will=Will("will/a", b"late", properties=Properties(will_delay_interval=5)))
    a.drop()
    h.advance(4)
    assert _publishes(watcher.packets()) == []
    h.advance(1.5)
    assert [p.payload for p in _publishes(watcher.packets())] == [b"late"]


def test_reconnect_within_the_will_delay_cancels_the_will(h: Harness) -> None:
    watcher = h.connect("w")
    watcher.send(_sub("will/#", 0))
    watcher.packets()
    props = Properties(session_expiry_interval=100)
    a = h.connect("a", MQTT_5, clean=False, properties=props,
                  will=Will("will/a", b"late", properties=Properties(will_delay_interval=5)))
    a.drop()
    h.advance(2)
    h.connect("a", MQTT_5, clean=False, properties=props)
    h.advance(10)
    assert _publishes(watcher.packets()) == []


def test_session_expires_after_its_interval(h: Harness) -> None:
    a = h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=10))
    a.send(_sub("t", 1))
    a.drop()
    assert "a" in h.broker.sessions.stored_client_ids
    h.advance(9)
    assert h.broker.sessions.get("a") is not None
    h.advance(2)
    assert h.broker.sessions.get("a") is None
    assert "a" not in h.broker.sessions.stored_client_ids and "t" not in h.broker.subscriptions.route_keys()
    assert h.store.session("a") is None  # deleted from the store too


def test_expiry_counts_the_downtime_of_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a = h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=10))
    a.drop()
    h.advance(1)
    h.now = h.now._replace(wall=h.now.wall + 20)  # the broker was down for 20 s
    h = h.restart()
    try:
        h.advance(0.5)
        assert h.broker.sessions.get("a") is None
    finally:
        h.close()


def test_keepalive_expiry_closes_the_client(h: Harness) -> None:
    watcher = h.connect("w", keepalive=0)
    watcher.send(_sub("will/#", 0))
    watcher.packets()
    a = h.connect("a", MQTT_5, keepalive=10, will=Will("will/a", b"silent"))
    a.packets()
    h.advance(14)
    assert not a.transport.closed
    h.advance(2)  # 1.5 x keepalive without a packet
    [d] = a.packets()
    assert isinstance(d, Disconnect) and d.reason_code == reasons.KEEP_ALIVE_TIMEOUT and a.transport.closed
    assert a.transport.close_reason == "keepalive 10s expired"
    assert [p.payload for p in _publishes(watcher.packets())] == [b"silent"]


# --------------------------------------------------------------------------- routes and peers


def test_suback_waits_for_every_peer_to_acknowledge_the_route(make: MakeHarness) -> None:
    h = make(peers=[1, 2], shards=3)
    c = h.connect("s")
    c.packets()
    c.send(_sub("a/b", 1))
    adds = [(peer, m) for peer, m in h.link.take() if isinstance(m, RoutesAdd)]
    assert {peer for peer, _ in adds} == {1, 2} and all(m.keys == (("a/b", False),) and m.request for _, m in adds)
    assert c.packets() == []  # SUBACK waits
    request = adds[0][1].request
    h.peer_messages([RouteAck(1, request)])
    assert c.packets() == []
    h.peer_messages([RouteAck(2, request)])
    assert c.packets() == [SubAck(1, (1,))]


def test_one_message_and_one_acknowledgement_for_every_new_filter_of_a_subscribe(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    c = h.connect("s", clean=False)
    c.packets()
    c.send(Subscribe(1, tuple(Subscription(f, 1) for f in ("a", "b/+", "a", "c/#"))))  # "a" twice: once
    [add] = [m for _, m in h.link.take() if isinstance(m, (RouteAdd, RoutesAdd))]
    assert isinstance(add, RoutesAdd) and add.request
    assert add.keys == (("a", True), ("b/+", True), ("c/#", True))  # durable: a persistent session
    assert c.packets() == []
    other = h.connect("t")  # a second subscriber of one of them waits for the same announcement
    other.packets()
    other.send(_sub("b/+", 1))
    assert not [m for _, m in h.link.take() if isinstance(m, (RouteAdd, RoutesAdd))] and other.packets() == []
    h.peer_messages([RouteAck(1, add.request)])
    assert c.packets() == [SubAck(1, (1, 1, 1, 1))]
    assert other.packets() == [SubAck(1, (1,))]


def test_the_last_subscriptions_of_an_unsubscribe_or_a_session_leave_in_one_message(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    c, other = h.connect("s"), h.connect("t")
    c.send(Subscribe(1, tuple(Subscription(f, 1) for f in ("a", "b/+", "c/#", "d"))))
    other.send(_sub("b/+", 1))
    h.link.take()
    c.send(Unsubscribe(2, ("a", "b/+", "x")))  # "b/+" has another subscriber here: it stays
    assert [m for _, m in h.link.take() if isinstance(m, (RouteRemove, RoutesRemove))] == [RouteRemove(0, "a")]
    c.send(Disconnect())  # a clean session ends: its last two go together
    assert [m for _, m in h.link.take() if isinstance(m, (RouteRemove, RoutesRemove))] == [
        RoutesRemove(0, ("c/#", "d"))]
    assert h.broker.peers.routes.keys(0) == {"b/+": False}
    h.peer_messages([RoutesAdd(1, (("p", False), ("q/#", False)), 0), RoutesRemove(1, ("p", "q/#"))])
    assert h.broker.peers.routes.keys(1) == {}


def test_a_peers_subscribe_adds_its_filters_and_is_acknowledged_once(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    h.peer_messages([RoutesAdd(1, (("x/+", False), ("y", True)), 9), RoutesAdd(1, (("z", False),))])
    assert h.broker.peers.routes.keys(1) == {"x/+": False, "y": True, "z": False}
    assert [(peer, m) for peer, m in h.link.take() if isinstance(m, RouteAck)] == [(1, RouteAck(0, 9))]


def test_suback_is_sent_after_the_timeout_when_a_peer_is_silent(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    c = h.connect("s")
    c.packets()
    c.send(_sub("a/b", 0))
    assert c.packets() == []
    h.advance(ROUTE_ACK_TIMEOUT - 0.1, tick=False)
    assert c.packets() == []
    h.advance(0.2, tick=False)
    assert c.packets() == [SubAck(1, (0,))]


def test_publish_to_a_durable_route_goes_through_the_outbox(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    h.peer_messages([Routes(1, (("t/#", True),))])
    h.link.take()
    p = h.connect("p")
    p.packets()
    p.send(Publish("t/x", b"v", qos=1, packet_id=3))
    assert p.packets() == [PubAck(3)]  # after the outbox row was committed
    [(peer, m)] = [(peer, m) for peer, m in h.link.take() if isinstance(m, DurableForward)]
    assert peer == 1 and m.seq == 1 and m.forward.topic == "t/x" and m.forward.payload == b"v"
    assert h.broker.peers.outbox.pending_count() == 1
    h.peer_messages([ForwardAck(1, 1)])
    assert h.broker.peers.outbox.pending_count() == 0


def test_forwards_from_a_peer_reach_local_subscribers_once(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = h.connect("s")
    s.send(_sub("t", 1))
    s.packets()
    h.link.take()
    fwd = Forward("t", b"v", 1, False)
    h.peer_messages([DurableForward(1, 1, fwd), DurableForward(1, 1, fwd), Forward("t", b"w", 0, False)])
    assert [p.payload for p in _publishes(s.packets())] == [b"v", b"w"]
    acks = [m for _, m in h.link.take() if isinstance(m, ForwardAck)]
    assert acks == [ForwardAck(0, 1)]  # acknowledged after the commit, the duplicate too


# --------------------------------------------------------------------------- access rules


def test_publish_to_sys_or_a_denied_topic_is_refused(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "acl.deny_publish": "ro/+"})
    h = make(config)
    s = h.connect("s")
    s.send(Subscribe(1, (Subscription("#", 0), Subscription("$SYS/#", 0))))
    s.packets()
    p = h.connect("p", MQTT_5)
    p.packets()
    p.send(Publish("ro/x", b"v", qos=1, packet_id=1))
    p.send(Publish("$SYS/x", b"v", qos=1, packet_id=2))
    assert p.packets() == [PubAck(1, reasons.NOT_AUTHORIZED), PubAck(2, reasons.NOT_AUTHORIZED)]
    assert _publishes(s.packets()) == []


def test_subscribe_to_a_denied_filter_is_refused(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "acl.deny_subscribe": "secret/#"})
    h = make(config)
    s = h.connect("s")
    s.packets()
    s.send(Subscribe(1, (Subscription("secret/a", 1), Subscription("$share/g/secret/b", 1),
                         Subscription("open", 1))))
    assert s.packets() == [SubAck(1, (0x80, 0x80, 1))]


# --------------------------------------------------------------------------- flow


def _on_shard(prefix: str, shard: int, shards: int) -> str:
    """A client id that ``shard_for`` places on ``shard``."""
    return next(f"{prefix}{i}" for i in range(1000) if shard_for(f"{prefix}{i}", shards) == shard)


def _flood(pub: Any, topic: str, n: int, first: int = 1) -> None:
    for pid in range(first, first + n):
        pub.send(Publish(topic, str(pid).encode(), qos=1, packet_id=pid))


def _ack_all(sub: Any) -> list[bytes]:
    """Acknowledge every QoS 1 PUBLISH the subscriber was sent; their payloads."""
    got = _publishes(sub.packets())
    for p in got:
        sub.send(PubAck(p.packet_id))
    return [p.payload for p in got]


def _queue_pair(tmp_path: Path, make: MakeHarness, settings: dict[str, Any]) -> tuple[Harness, Any, Any]:
    """A harness with ``settings``, a QoS 1 subscriber of ``q`` that acknowledges nothing yet,
    and a publisher."""
    h = make(load_config(None, {"server.data_dir": str(tmp_path), **settings}))
    sub = h.connect("sub")
    sub.send(_sub("q", 1))
    pub = h.connect("pub")
    sub.packets(), pub.packets()
    return h, sub, pub


def test_a_backed_up_subscriber_holds_only_the_publishers_that_feed_it(h: Harness) -> None:
    stuck = h.connect("stuck")
    stuck.send(_sub("flood", 0))
    other = h.connect("other")
    other.send(_sub("calm", 1))
    feeder, bystander = h.connect("feeder"), h.connect("bystander")
    for c in (stuck, other, feeder, bystander):
        c.packets()
    h.broker.backed_up(stuck.client, h.now)
    h.run()
    feeder.send(Publish("flood", b"x"))
    assert feeder.transport.paused  # QoS 0 into a full write buffer: it is not read any more
    bystander.send(Publish("calm", b"y", qos=1, packet_id=1))
    assert not bystander.transport.paused and bystander.packets() == [PubAck(1)]
    assert [p.payload for p in _publishes(other.packets())] == [b"y"]
    h.broker.drained(stuck.client)
    h.run()
    assert not feeder.transport.paused


def test_a_queue_backlog_withholds_its_publishers_acks_and_drops_nothing(tmp_path: Path,
                                                                          make: MakeHarness) -> None:
    """An online subscriber that acknowledges is never subject to the queue limit (here 10):
    the publisher's PUBACKs wait instead, and come in order once the queue is down."""
    h, sub, pub = _queue_pair(tmp_path, make, {"limits.max_queued_messages": 10})
    window = h.config.limits.max_inflight
    total = window + QUEUE_HIGH_WATER + 50
    _flood(pub, "q", total)
    acks = pub.packets()
    # acknowledged until the message that filled the queue to its high-water mark
    assert acks == [PubAck(i) for i in range(1, window + QUEUE_HIGH_WATER + 1)]
    assert h.broker.stats["holds"] == 1 and h.broker.stats["dropped_queue_full"] == 0
    got: list[bytes] = []
    while len(got) < total:
        more = _ack_all(sub)
        assert more, f"delivery stopped at {len(got)}"
        got += more
    assert got == [str(i).encode() for i in range(1, total + 1)]  # complete, in order
    assert pub.packets() == [PubAck(i) for i in range(window + QUEUE_HIGH_WATER + 1, total + 1)]
    assert h.broker.stats["dropped_queue_full"] == 0


def test_a_subscriber_that_stops_acknowledging_is_cut_loose_after_its_ack_timeout(tmp_path: Path,
                                                                                  make: MakeHarness) -> None:
    h, sub, pub = _queue_pair(tmp_path, make, {"limits.max_queued_messages": 100, "limits.ack_timeout": 5,
                                               "limits.slow_ack_rate": 0})  # the ack timeout alone decides
    window = h.config.limits.max_inflight
    held_from = window + QUEUE_HIGH_WATER + 1
    _flood(pub, "q", held_from + 9)
    assert len(pub.packets()) == held_from - 1
    h.advance(4.0)
    assert pub.packets() == []  # still within its ack timeout: it may yet acknowledge
    h.advance(1.5)
    assert pub.packets() == [PubAck(i) for i in range(held_from, held_from + 10)]  # released
    sess = h.broker.sessions.get("sub")
    assert sess is not None and sess.slow and not sess.backlog and h.broker.stats["slow_subscribers"] == 1
    pub.send(Publish("q", b"late", qos=1, packet_id=1000))
    assert pub.packets() == [PubAck(1000)]  # no one holds it now
    assert sess.queued() == 100  # its queue is limited now, oldest dropped
    assert h.broker.stats["dropped_queue_full"] == QUEUE_HIGH_WATER + 10 + 1 - 100
    first = _publishes(sub.packets())[0]
    sub.send(PubAck(first.packet_id))
    assert not sess.slow  # acknowledging again


def _ack_some(sub: Any, n: int, pending: list[int]) -> None:
    """Acknowledge the ``n`` oldest QoS 1 PUBLISHes the subscriber was sent (``pending`` keeps
    the packet ids not acknowledged yet, oldest first)."""
    pending += [p.packet_id for p in _publishes(sub.packets())]
    for pid in pending[:n]:
        sub.send(PubAck(pid))
    del pending[:n]


def test_a_subscriber_that_acknowledges_too_slowly_is_slow_until_it_catches_up(tmp_path: Path,
                                                                             make: MakeHarness) -> None:
    """Fewer than ``limits.slow_ack_rate`` acknowledgements/s over SLOW_ACK_GRACE while backlogged:
    slow, its publishers released and its queue limited; healthy again only once its queue is
    down to the low-water mark, not at its next acknowledgement (it would hold them again)."""
    h, sub, pub = _queue_pair(tmp_path, make, {"limits.max_queued_messages": 600})
    window = h.config.limits.max_inflight
    held_from = window + QUEUE_HIGH_WATER + 1
    _flood(pub, "q", held_from + 9)
    assert len(pub.packets()) == held_from - 1
    pending: list[int] = []
    for _ in range(3):  # 2 acknowledgements/s, far under 100/s
        _ack_some(sub, 1, pending)
        h.advance(0.5)
    assert pub.packets() == []  # judged over 2 s: not yet
    _ack_some(sub, 1, pending)
    h.advance(0.5)
    assert pub.packets() == [PubAck(i) for i in range(held_from, held_from + 10)]  # released
    sess = h.broker.sessions.get("sub")
    assert sess is not None and sess.slow and not sess.backlog and h.broker.stats["slow_subscribers"] == 1
    _flood(pub, "q", 100, first=2000)
    assert len(pub.packets()) == 100  # no one holds it now
    assert sess.queued() == 600 and h.broker.stats["dropped_queue_full"] > 0  # its queue is limited
    _ack_some(sub, 1, pending)
    assert sess.slow  # one acknowledgement is not catching up
    while sess.queued() > QUEUE_LOW_WATER:
        _ack_some(sub, window, pending)
    assert not sess.slow and h.broker.stats["slow_subscribers"] == 1
    _flood(pub, "q", QUEUE_HIGH_WATER + 10, first=3000)  # it holds its publishers again when behind
    assert sess.backlog and len(pub.packets()) < QUEUE_HIGH_WATER + 10


def test_a_subscriber_that_keeps_up_at_the_rate_holds_its_publishers(tmp_path: Path, make: MakeHarness) -> None:
    """At 120 acknowledgements/s (over the 100/s of the default) a backlog lasts as long as its
    queue is over the low-water mark, however long that takes: nothing is dropped."""
    h, sub, pub = _queue_pair(tmp_path, make, {"limits.max_queued_messages": 100})
    window = h.config.limits.max_inflight
    held_from = window + QUEUE_HIGH_WATER + 1
    _flood(pub, "q", held_from + 9)
    assert len(pub.packets()) == held_from - 1
    pending: list[int] = []
    for _ in range(6):  # 3 s at 120/s
        _ack_some(sub, 60, pending)
        h.advance(0.5)
    sess = h.broker.sessions.get("sub")
    assert sess is not None and sess.backlog and not sess.slow
    assert pub.packets() == []  # still held, for 3 s
    assert h.broker.stats["slow_subscribers"] == 0 and h.broker.stats["dropped_queue_full"] == 0
    while _ack_all(sub):
        pass
    assert pub.packets() == [PubAck(i) for i in range(held_from, held_from + 10)]  # drained: released


def test_a_backlog_holds_a_publisher_of_another_shard_through_the_bus(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    sub = h.connect(_on_shard("sub", 0, 2))
    sub.send(_sub("q", 1))
    sub.packets()
    remote = _on_shard("pub", 1, 2)
    window = h.config.limits.max_inflight
    h.peer_messages([Forward("q", str(i).encode(), 1, False, origin=remote)
                     for i in range(window + QUEUE_HIGH_WATER + 5)])
    assert [m for _, m in h.link.take() if isinstance(m, (Hold, Release))] == [Hold(0, remote)]
    h.advance(0.5)  # the sweep renews the lease
    assert [m for _, m in h.link.take() if isinstance(m, Hold)] == [Hold(0, remote)]
    while _ack_all(sub):
        pass
    assert [m for _, m in h.link.take() if isinstance(m, (Hold, Release))] == [Release(0, remote)]


def test_a_hold_from_another_shard_withholds_acks_until_released_or_expired(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    cid = _on_shard("pub", 0, 2)
    pub = h.connect(cid)
    watcher = h.connect(_on_shard("w", 0, 2))
    watcher.send(_sub("t", 1))
    pub.packets(), watcher.packets()
    h.peer_messages([Hold(1, cid)])
    pub.send(Publish("t", b"a", qos=1, packet_id=1))
    pub.send(Publish("t", b"b", qos=2, packet_id=2))
    assert pub.packets() == []  # withheld, but delivered all the same
    assert [p.payload for p in _publishes(watcher.packets())] == [b"a", b"b"]
    h.peer_messages([Release(1, cid)])
    assert pub.packets() == [PubAck(1), PubRec(2)]
    pub.send(PubRel(2))
    assert pub.packets() == [PubComp(2)]
    h.peer_messages([Hold(1, cid)])
    pub.send(Publish("t", b"c", qos=1, packet_id=3))
    h.advance(HOLD_LEASE - 0.5)
    assert pub.packets() == []
    h.advance(1.0)  # not renewed: the lease ran out
    assert pub.packets() == [PubAck(3)]


def test_a_held_client_still_reads_and_acknowledges_what_it_is_sent(h: Harness) -> None:
    """Two clients that publish to each other: holding one must not stop it acknowledging."""
    a, b = h.connect("a"), h.connect("b")
    a.send(_sub("to-a", 1))
    b.send(_sub("to-b", 1))
    a.packets(), b.packets()
    h.broker.backpressure.hold("a", 0, math.inf)
    b.send(Publish("to-a", b"m", qos=1, packet_id=1))
    [m] = _publishes(a.packets())
    a.send(PubAck(m.packet_id))
    a.send(Publish("to-b", b"n", qos=1, packet_id=7))
    assert not a.transport.paused and a.packets() == []  # its PUBACK waits, its reading does not
    sess = h.broker.sessions.get("a")
    assert sess is not None and not sess.inflight  # its acknowledgement was taken
    h.broker.backpressure.release("a", 0)
    h.run()
    assert a.packets() == [PubAck(7)]


def test_drops_for_an_offline_session_are_counted_and_logged_once(tmp_path: Path, make: MakeHarness,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    h = make(load_config(None, {"server.data_dir": str(tmp_path), "limits.max_queued_messages": 2}))
    sub = h.connect("sub", clean=False)
    sub.send(_sub("q", 1))
    sub.send(Disconnect())
    pub = h.connect("pub")
    with caplog.at_level("WARNING", logger="shardbroker.delivery"):
        _flood(pub, "q", 5)
    assert h.broker.stats["dropped_queue_full"] == 3
    logged = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(logged) == 1 and "sub" in logged[0] and "offline" in logged[0]


def test_a_held_publisher_that_reconnects_is_still_held(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    cid = _on_shard("pub", 0, 2)
    h.peer_messages([Hold(1, cid)])
    pub = h.connect(cid)
    pub.packets()
    pub.send(Publish("t", b"a", qos=1, packet_id=1))
    assert pub.packets() == []
    h.peer_messages([Release(1, cid)])
    assert pub.packets() == [PubAck(1)]


def test_a_backlog_that_goes_offline_releases_its_publishers(h: Harness) -> None:
    sub = h.connect("sub")
    sub.send(_sub("q", 1))
    pub = h.connect("pub")
    sub.packets(), pub.packets()
    n = h.config.limits.max_inflight + QUEUE_HIGH_WATER + 5
    _flood(pub, "q", n)
    assert len(pub.packets()) == n - 5  # the last five are held
    sub.drop()
    assert pub.packets() == [PubAck(i) for i in range(n - 4, n + 1)]


def test_a_restarted_peer_holds_nobody_any_more(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    cid = _on_shard("pub", 0, 2)
    pub = h.connect(cid)
    pub.packets()
    h.peer_messages([Hold(1, cid)])
    pub.send(Publish("t", b"a", qos=1, packet_id=1))
    assert pub.packets() == []
    h.peer_messages([Routes(1, ())])  # shard 1 announces itself: it restarted
    assert pub.packets() == [PubAck(1)]


def test_a_held_client_is_paused_for_qos0_or_too_many_withheld_acks(h: Harness) -> None:
    qos0, greedy = h.connect("qos0"), h.connect("greedy")
    qos0.packets(), greedy.packets()
    h.broker.backpressure.hold("qos0", 0, math.inf)
    h.broker.backpressure.hold("greedy", 0, math.inf)
    qos0.send(Publish("t", b"x"))
    assert qos0.transport.paused  # nothing to withhold from a QoS 0 publisher
    _flood(greedy, "t", WITHHELD_MAX)
    assert not greedy.transport.paused  # within what a client may have unacknowledged
    greedy.send(Publish("t", b"y", qos=1, packet_id=WITHHELD_MAX + 1))
    assert greedy.transport.paused and greedy.packets() == []
    h.broker.backpressure.release("qos0", 0)
    h.broker.backpressure.release("greedy", 0)
    h.run()
    assert not qos0.transport.paused and not greedy.transport.paused
    assert greedy.packets() == [PubAck(i) for i in range(1, WITHHELD_MAX + 2)]


def test_a_will_to_a_denied_topic_is_refused_at_connect(tmp_path: Path, make: MakeHarness) -> None:
    """A will is a publish made later on the client's behalf: the same rules apply to it."""
    config = load_config(None, {"server.data_dir": str(tmp_path), "acl.deny_publish": "ro/#"})
    h = make(config)
    c = h.connect("a", MQTT_5, will=Will("ro/x", b"no"))
    [ack] = c.packets()
    assert ack.reason_code == reasons.NOT_AUTHORIZED and c.transport.closed
    ok = h.connect("b", MQTT_5, will=Will("rw/x", b"yes"))
    assert ok.packets()[0].reason_code == reasons.SUCCESS


def test_bytes_read_after_the_serving_deadline_close_the_clients_first(h: Harness) -> None:
    """A cluster node stopped past its lease (SIGSTOP) reads what its clients sent meanwhile
    on waking, before its deadline timer runs: not one publish of it is acknowledged."""
    pub = h.connect("late-pub")
    pub.packets()
    closed: list[str] = []

    def close_all() -> None:
        closed.append("deadline")
        h.broker.close_unserved(lambda cid: False, "the lease was not renewed in time", h.now)

    h.broker.deadline_passed = close_all
    h.broker.serve_until = h.now.mono + 1.0
    pub.send(Publish("t", b"in-time", 1, packet_id=1))
    assert [type(p).__name__ for p in pub.packets()] == ["PubAck"]
    h.advance(2.0, tick=False)
    pub.send(Publish("t", b"too-late", 1, packet_id=2))
    assert closed == ["deadline"]
    assert not any(isinstance(p, PubAck) for p in pub.packets())
    assert pub.transport.closed
    assert h.broker.serve_until == math.inf  # said once; the next grant sets it again


# --------------------------------------------------------------------------- retained messages owed over turns


def _one_turn(h: Harness) -> None:
    """One turn of the loop: the callbacks due now, not those they schedule."""
    soon, h.scheduler.due_soon = h.scheduler.due_soon, []
    for cb in soon:
        cb(h.now)


def _retained(h: Harness, n: int) -> list[str]:
    topics = [f"r/{i:05d}" for i in range(n)]
    h.retained.write([RetainedOp(t, StoredMessage(t, b"old", 0, True, NO_PROPERTIES), 0, "") for t in topics])
    return topics


def test_a_subscribe_to_many_retained_messages_is_answered_over_turns(h: Harness) -> None:
    """The first page goes with the SUBACK; the rest at most REPLAY_ROWS a turn, so that the
    shard's other clients are served in between; each once, in order."""
    topics = _retained(h, 3000)
    sub = h.connect("s")
    sub.packets()
    h.broker.received(sub.client, codec.encode(_sub("r/#", 0), sub.version), h.now)
    _one_turn(h)
    got = _publishes(sub.packets())
    assert 0 < len(got) < len(topics)
    turns = 0
    while h.scheduler.due_soon:
        _one_turn(h)
        turns += 1
        more = _publishes(sub.packets())
        assert len(more) <= REPLAY_ROWS
        got += more
    assert turns >= 3
    assert [p.topic for p in got] == topics and all(p.retain for p in got)


def test_a_publish_supersedes_the_retained_message_still_owed(h: Harness) -> None:
    """A topic published while its retained message still waits gets the new message only
    (the old one after it would undo it); one already sent gets the new one after it."""
    topics = _retained(h, 3000)
    pub = h.connect("p")
    sub = h.connect("s")
    pub.packets(), sub.packets()
    h.broker.received(sub.client, codec.encode(_sub("r/#", 0), sub.version), h.now)
    _one_turn(h)
    got = _publishes(sub.packets())
    h.broker.received(pub.client, codec.encode(Publish(topics[-1], b"new"), pub.version), h.now)
    h.broker.received(pub.client, codec.encode(Publish(topics[0], b"new"), pub.version), h.now)
    h.run()
    got += _publishes(sub.packets())
    assert [(p.topic, p.payload) for p in got].count((topics[-1], b"new")) == 1
    assert [p.topic for p in got].count(topics[-1]) == 1  # the old one was not sent after it
    assert [(p.topic, p.payload) for p in got if p.topic == topics[0]] == [(topics[0], b"old"), (topics[0], b"new")]
    assert len(got) == len(topics) + 1


def test_an_unsubscribe_ends_the_retained_messages_owed(h: Harness) -> None:
    _retained(h, 3000)
    sub = h.connect("s")
    sub.packets()
    h.broker.received(sub.client, codec.encode(_sub("r/#", 0), sub.version), h.now)
    _one_turn(h)
    first = len(_publishes(sub.packets()))
    h.broker.received(sub.client, codec.encode(Unsubscribe(2, ("r/#",)), sub.version), h.now)
    h.run()
    assert len(_publishes(sub.packets())) <= REPLAY_ROWS  # at most the turn already under way
    assert first < 3000 and not h.broker.subscriptions._replays and not h.broker.delivery.replaying
