"""Sessions: resume, queued and in-flight messages, takeover, 5.0 expiry, restarts."""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import assert_disconnected, assert_no_publish, collect_until


def _expiry(seconds: int) -> bytes:
    return mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, seconds)


# persistent-session connect arguments per version
def _persistent(version: int, expiry: int = 300) -> dict:
    if version == 5:
        return {"clean": False, "props": _expiry(expiry)}
    return {"clean": False}


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_persistent_session_resume_with_queued_qos1(broker, mqtt, uniq, version):
    cid, topic = uniq.cid("ps"), uniq.topic()
    c = mqtt(broker, cid, version=version, **_persistent(version))
    assert c.connack.session_present is False
    c.subscribe(topic, 1)
    c.disconnect()
    pub = mqtt(broker, uniq.cid("p"), version=4)
    for i in range(5):
        pub.publish(topic, f"queued-{i}".encode(), qos=1)
    c2 = mqtt(broker, cid, version=version, **_persistent(version))
    assert c2.connack.session_present is True
    msgs = c2.recv_publishes(5)
    assert [m.payload for m in msgs] == [f"queued-{i}".encode() for i in range(5)]
    assert all(m.qos == 1 for m in msgs)
    # the subscription is still there: live messages flow without re-subscribing
    pub.publish(topic, b"live", qos=1)
    assert c2.recv_publish().payload == b"live"


def test_v311_session_present_exact_connack(broker, mqtt, uniq):
    cid = uniq.cid("sp")
    c = mqtt(broker, cid, version=4, clean=False)
    c.subscribe(uniq.topic(), 1)
    c.disconnect()
    c2 = mqtt.raw(broker)
    c2.send(mb.connect(cid, version=4, clean=False))
    assert c2.recv_packet(5) == (mb.CONNACK, 0, b"\x01\x00")


def test_v311_clean_session_discards_state(broker, mqtt, uniq):
    cid, topic = uniq.cid("cs"), uniq.topic()
    c = mqtt(broker, cid, version=4, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(broker, cid, version=4, clean=True)
    assert c2.connack.session_present is False
    sentinel = uniq.topic("sentinel")
    c2.subscribe(sentinel, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"old subscription", qos=1)
    pub.publish(sentinel, b"SENTINEL", qos=1)
    assert collect_until(c2, b"SENTINEL") == []
    c2.disconnect()
    c3 = mqtt(broker, cid, version=4, clean=False)
    assert c3.connack.session_present is False  # the clean session ended with c2


def test_v311_clean_session_never_present(broker, mqtt, uniq):
    cid = uniq.cid("cc")
    for _ in range(2):
        c = mqtt(broker, cid, version=4, clean=True)
        assert c.connack.session_present is False
        c.subscribe(uniq.topic(), 1)
        c.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos1_resent_with_dup_after_reconnect(broker, mqtt, uniq, version):
    cid, topic = uniq.cid("dup"), uniq.topic()
    c = mqtt(broker, cid, version=version, **_persistent(version))
    c.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"unacked", qos=1)
    first = c.recv_publish(ack=False)
    assert (first.dup, first.qos) == (False, 1)
    c.abort()  # gone without PUBACK
    c2 = mqtt(broker, cid, version=version, **_persistent(version))
    assert c2.connack.session_present is True
    again = c2.recv_publish(ack=False)
    assert (again.payload, again.qos, again.pid, again.dup) == (b"unacked", 1, first.pid, True)
    c2.send(mb.puback(again.pid, version))
    c2.ping()
    assert_no_publish(c2, 0.4)


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos2_publish_resent_after_reconnect(broker, mqtt, uniq, version):
    cid, topic = uniq.cid("dup2"), uniq.topic()
    c = mqtt(broker, cid, version=version, **_persistent(version))
    c.subscribe(topic, 2)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"q2 unacked", qos=2)
    first = c.recv_publish(ack=False)
    c.abort()
    c2 = mqtt(broker, cid, version=version, **_persistent(version))
    again = c2.recv_publish(ack=True)
    assert (again.payload, again.qos, again.pid, again.dup) == (b"q2 unacked", 2, first.pid, True)
    c2.ping()
    assert_no_publish(c2, 0.4)


@pytest.mark.parametrize("version", [4, 5])
def test_pubrel_resent_after_reconnect(broker, mqtt, uniq, version):
    cid, topic = uniq.cid("rel"), uniq.topic()
    c = mqtt(broker, cid, version=version, **_persistent(version))
    c.subscribe(topic, 2)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"q2", qos=2)
    msg = c.recv_publish(ack=False)
    c.send(mb.pubrec(msg.pid, version))
    assert mb.parse_ack(c.expect(mb.PUBREL)[2], version).pid == msg.pid
    c.abort()  # without PUBCOMP
    c2 = mqtt(broker, cid, version=version, **_persistent(version))
    _ptype, flags, body = c2.expect(mb.PUBREL)  # not the PUBLISH again [MQTT-4.4.0-1]
    assert flags == 0x02
    assert mb.parse_ack(body, version).pid == msg.pid
    c2.send(mb.pubcomp(msg.pid, version))
    c2.ping()
    assert_no_publish(c2, 0.4)


@pytest.mark.parametrize("version", [4, 5])
def test_inbound_qos2_exactly_once_across_reconnect(broker, mqtt, uniq, version):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 2)
    cid = uniq.cid("pub")
    p = mqtt(broker, cid, version=version, **_persistent(version))
    p.send(mb.publish(topic, b"once", qos=2, pid=99, version=version))
    assert mb.parse_ack(p.expect(mb.PUBREC)[2], version).pid == 99
    p.abort()  # PUBREC "lost"
    p2 = mqtt(broker, cid, version=version, **_persistent(version))
    assert p2.connack.session_present is True
    p2.send(mb.publish(topic, b"once", qos=2, pid=99, dup=True, version=version))
    assert mb.parse_ack(p2.expect(mb.PUBREC)[2], version).pid == 99
    p2.send(mb.pubrel(99, version))
    assert mb.parse_ack(p2.expect(mb.PUBCOMP)[2], version).pid == 99
    assert sub.recv_publish().payload == b"once"
    assert_no_publish(sub, 0.5)


def test_queued_messages_respect_subscription_qos(broker, mqtt, uniq):
    cid, topic = uniq.cid("qq"), uniq.topic()
    c = mqtt(broker, cid, version=4, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"q2-published", qos=2)
    c2 = mqtt(broker, cid, version=4, clean=False)
    msg = c2.recv_publish()
    assert (msg.payload, msg.qos) == (b"q2-published", 1)


# -- takeover ---------------------------------------------------------------------------------


def test_takeover_v311_closes_first_connection(broker, mqtt, uniq):
    cid = uniq.cid("to")
    a = mqtt(broker, cid, version=4)
    b = mqtt(broker, cid, version=4)
    assert_disconnected(a, 4)
    b.ping()


def test_takeover_v5_sends_session_taken_over(broker, mqtt, uniq):
    cid = uniq.cid("to5")
    a = mqtt(broker, cid, version=5)
    b = mqtt(broker, cid, version=5)
    assert_disconnected(a, 5, {mb.RC_SESSION_TAKEN_OVER}, require_disconnect=True)
    b.ping()


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_keeps_persistent_session(broker, mqtt, uniq, version):
    cid, topic = uniq.cid("tk"), uniq.topic()
    a = mqtt(broker, cid, version=version, **_persistent(version))
    a.subscribe(topic, 1)
    b = mqtt(broker, cid, version=version, **_persistent(version))
    assert b.connack.session_present is True
    assert a.expect_closed(3)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"to the new connection", qos=1)
    assert b.recv_publish().payload == b"to the new connection"


def test_takeover_with_clean_start_drops_session(broker, mqtt, uniq):
    cid, topic = uniq.cid("tc"), uniq.topic()
    a = mqtt(broker, cid, version=5, **_persistent(5))
    a.subscribe(topic, 1)
    b = mqtt(broker, cid, version=5, clean=True, props=_expiry(300))
    assert b.connack.session_present is False
    assert a.expect_closed(3)
    sentinel = uniq.topic("sentinel")
    b.subscribe(sentinel, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"old sub", qos=1)
    pub.publish(sentinel, b"SENTINEL", qos=1)
    assert collect_until(b, b"SENTINEL") == []


def test_repeated_takeover_leaves_one_live_connection(broker, mqtt, uniq):
    cid, topic = uniq.cid("rt"), uniq.topic()
    conns = [mqtt(broker, cid, version=4, clean=False) for _ in range(5)]
    for c in conns[:-1]:
        assert c.expect_closed(3)
    last = conns[-1]
    last.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"x", qos=1)
    assert last.recv_publish().payload == b"x"
    assert_no_publish(last, 0.3)


# -- 5.0 session expiry ---------------------------------------------------------------------------


def test_v5_session_expiry_zero_ends_session_on_disconnect(broker, mqtt, uniq):
    cid, topic = uniq.cid("e0"), uniq.topic()
    c = mqtt(broker, cid, version=5, clean=False)  # no Session Expiry Interval = 0
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(broker, cid, version=5, clean=False)
    assert c2.connack.session_present is False


def test_v5_session_expiry_positive_keeps_session(broker, mqtt, uniq):
    cid, topic = uniq.cid("e60"), uniq.topic()
    c = mqtt(broker, cid, version=5, clean=True, props=_expiry(60))
    assert c.connack.session_present is False
    c.subscribe(topic, 1)
    c.disconnect()
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.publish(topic, b"while away", qos=1)
    c2 = mqtt(broker, cid, version=5, clean=False, props=_expiry(60))
    assert c2.connack.session_present is True
    assert c2.recv_publish().payload == b"while away"


def test_v5_clean_start_discards_existing_session(broker, mqtt, uniq):
    cid, topic = uniq.cid("cst"), uniq.topic()
    c = mqtt(broker, cid, version=5, props=_expiry(60))
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(broker, cid, version=5, clean=True, props=_expiry(60))
    assert c2.connack.session_present is False
    sentinel = uniq.topic("sentinel")
    c2.subscribe(sentinel, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"old", qos=1)
    pub.publish(sentinel, b"SENTINEL", qos=1)
    assert collect_until(c2, b"SENTINEL") == []


def test_v5_disconnect_can_shorten_session_expiry_to_zero(broker, mqtt, uniq):
    cid = uniq.cid("dz")
    c = mqtt(broker, cid, version=5, props=_expiry(60))
    c.subscribe(uniq.topic(), 1)
    c.disconnect(reason=0, props=_expiry(0))
    c2 = mqtt(broker, cid, version=5, clean=False, props=_expiry(60))
    assert c2.connack.session_present is False


def test_v5_disconnect_cannot_raise_expiry_from_zero(broker, mqtt, uniq):
    cid = uniq.cid("dr")
    c = mqtt(broker, cid, version=5, clean=False)  # expiry 0
    c.subscribe(uniq.topic(), 1)
    c.send(mb.disconnect(5, 0, _expiry(60)))  # protocol error [MQTT-3.14.2-2]
    assert_disconnected(c, 5, {mb.RC_PROTOCOL_ERROR}, require_disconnect=False)
    c2 = mqtt(broker, cid, version=5, clean=False)
    assert c2.connack.session_present is False


@pytest.mark.slow
def test_v5_session_expires_after_interval(broker, mqtt, uniq):
    cid, keep = uniq.cid("ex1"), uniq.cid("ex9")
    c = mqtt(broker, cid, version=5, props=_expiry(1))
    c.subscribe(uniq.topic(), 1)
    c.disconnect()
    k = mqtt(broker, keep, version=5, props=_expiry(30))
    k.subscribe(uniq.topic(), 1)
    k.disconnect()
    time.sleep(2.2)
    c2 = mqtt(broker, cid, version=5, clean=False, props=_expiry(1))
    assert c2.connack.session_present is False, "session with expiry 1 s still present after 2.2 s"
    k2 = mqtt(broker, keep, version=5, clean=False, props=_expiry(30))
    assert k2.connack.session_present is True


def test_v5_connack_session_present_for_v311_session_resumed_by_v5(broker, mqtt, uniq):
    """A session does not belong to a protocol version: 3.1.1 session, 5.0 resume."""
    cid, topic = uniq.cid("xv"), uniq.topic()
    c = mqtt(broker, cid, version=4, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(broker, cid, version=5, clean=False, props=_expiry(60))
    assert c2.connack.session_present is True
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"cross-version", qos=1)
    assert c2.recv_publish().payload == b"cross-version"


# -- restarts -----------------------------------------------------------------------------------


def _prepare_state(b, mqtt, uniq):
    """Sessions with subscriptions, queued and in-flight messages, a retained message."""
    st = {
        "topic": uniq.topic(), "rtopic": uniq.topic("retained"),
        "c4": uniq.cid("r4"), "c5": uniq.cid("r5"), "cin": uniq.cid("rin"),
    }
    c4 = mqtt(b, st["c4"], version=4, clean=False)
    c4.subscribe(st["topic"], 1)
    c4.disconnect()
    c5 = mqtt(b, st["c5"], version=5, clean=False, props=_expiry(3600))
    c5.subscribe(st["topic"], 2)
    c5.disconnect()
    cin = mqtt(b, st["cin"], version=4, clean=False)
    cin.subscribe(st["topic"], 1)
    pub = mqtt(b, uniq.cid("p"), version=4)
    pub.publish(st["rtopic"], b"retained survives", qos=1, retain=True)
    for i in range(3):
        pub.publish(st["topic"], f"queued-{i}".encode(), qos=1)  # PUBACKed = durable
    inflight = cin.recv_publishes(3, ack=False)  # delivered, never acknowledged
    st["inflight_pids"] = [m.pid for m in inflight]
    pub.disconnect()
    return st


def _check_state(b, mqtt, uniq, st):
    expected = [f"queued-{i}".encode() for i in range(3)]
    c4 = mqtt(b, st["c4"], version=4, clean=False)
    assert c4.connack.session_present is True
    assert [m.payload for m in c4.recv_publishes(3, timeout=10)] == expected
    c5 = mqtt(b, st["c5"], version=5, clean=False, props=_expiry(3600))
    assert c5.connack.session_present is True
    assert [m.payload for m in c5.recv_publishes(3, timeout=10)] == expected
    cin = mqtt(b, st["cin"], version=4, clean=False)
    assert cin.connack.session_present is True
    again = cin.recv_publishes(3, timeout=10)
    assert [m.payload for m in again] == expected
    assert [m.pid for m in again] == st["inflight_pids"]
    assert all(m.dup for m in again), "re-sent in-flight messages must have DUP=1"
    # subscriptions still route live messages
    pub = mqtt(b, uniq.cid("p2"), version=4)
    pub.publish(st["topic"], b"after restart", qos=1)
    for c in (c4, c5, cin):
        assert c.recv_publish(10).payload == b"after restart"
    # retained message kept
    s = mqtt(b, uniq.cid("rs"), version=4)
    s.subscribe(st["rtopic"], 1)
    msg = s.recv_publish(10)
    assert (msg.payload, msg.retain) == (b"retained survives", True)


@pytest.mark.slow
def test_session_survives_clean_restart(make_broker, mqtt, uniq):
    b = make_broker(workers=2)
    st = _prepare_state(b, mqtt, uniq)
    mqtt.close_all()
    assert b.stop() == 0, "SIGTERM shutdown must exit 0"
    b.restart()
    _check_state(b, mqtt, uniq, st)


@pytest.mark.slow
def test_session_survives_kill9_of_whole_broker(make_broker, mqtt, uniq):
    b = make_broker(workers=2)
    st = _prepare_state(b, mqtt, uniq)
    b.kill9()
    mqtt.close_all()
    b.start()
    _check_state(b, mqtt, uniq, st)


@pytest.mark.slow
def test_qos2_exactly_once_across_kill9(make_broker, mqtt, uniq):
    b = make_broker(workers=2)
    topic, scid, pcid = uniq.topic(), uniq.cid("s"), uniq.cid("p")
    s = mqtt(b, scid, version=4, clean=False)
    s.subscribe(topic, 2)
    s.disconnect()
    p = mqtt(b, pcid, version=4, clean=False)
    p.send(mb.publish(topic, b"exactly once", qos=2, pid=77))
    assert mb.parse_ack(p.expect(mb.PUBREC)[2]).pid == 77  # acknowledged => durable
    b.kill9()
    mqtt.close_all()
    b.start()
    p2 = mqtt(b, pcid, version=4, clean=False)
    assert p2.connack.session_present is True
    p2.send(mb.publish(topic, b"exactly once", qos=2, pid=77, dup=True))
    assert mb.parse_ack(p2.expect(mb.PUBREC)[2]).pid == 77
    p2.send(mb.pubrel(77))
    assert mb.parse_ack(p2.expect(mb.PUBCOMP)[2]).pid == 77
    s2 = mqtt(b, scid, version=4, clean=False)
    assert s2.connack.session_present is True
    assert s2.recv_publish(10).payload == b"exactly once"
    assert_no_publish(s2, 0.8)


@pytest.mark.slow
def test_downtime_counts_toward_session_expiry_after_kill9(make_broker, mqtt, uniq):
    """A session connected when the broker was killed expires from the moment of the crash
    (the last "alive" mark), not from the restart."""
    b = make_broker(workers=1)
    short, long_ = uniq.cid("x"), uniq.cid("y")
    mqtt(b, short, version=5, clean=False, props=_expiry(2)).subscribe(uniq.topic(), 1)
    mqtt(b, long_, version=5, clean=False, props=_expiry(3600)).subscribe(uniq.topic(), 1)
    time.sleep(1.5)  # at least one alive mark after both connected
    b.kill9()
    mqtt.close_all()
    time.sleep(3)  # longer than the short expiry
    b.start()
    assert mqtt(b, short, version=5, clean=False, props=_expiry(2)).connack.session_present is False
    assert mqtt(b, long_, version=5, clean=False, props=_expiry(3600)).connack.session_present is True
