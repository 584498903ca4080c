"""Time-dependent state across a broker restart: delayed wills, message and retained
expiry, the outgoing QoS 2 PUBREL phase, session expiry.

Every test runs twice: ``clean`` (SIGTERM stop, then start on the same data dir) and
``kill9`` (SIGKILL of the whole process tree, then start). Clients that matter sit on
different shards of a 2-worker broker, so state crosses the inter-shard bus too.
"""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import assert_no_publish, client_id_on_shard, collect_until

pytestmark = pytest.mark.slow

WORKERS = 2
HOW = pytest.mark.parametrize("how", ["clean", "kill9"])


def _expiry(seconds: int) -> bytes:
    return mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, seconds)


def _msg_expiry(seconds: int) -> bytes:
    return mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, seconds)


def _cid(uniq, tag: str, shard: int) -> str:
    return client_id_on_shard(uniq.prefix(tag), shard, WORKERS)


@pytest.fixture
def b2(make_broker):
    """A fresh 2-worker broker; killed at the end (its data dir is thrown away, so the
    clean-stop wait of the normal teardown buys nothing)."""
    b = make_broker(workers=WORKERS)
    yield b
    b.kill9()


def _restart(b, mqtt, how: str, downtime: float = 0.0) -> float:
    """Stop the broker the ``how`` way, keep it down until ``downtime`` seconds have passed
    since the SIGTERM / SIGKILL, start it again. Returns the seconds from the signal until
    the broker accepts clients again on every shard."""
    t0 = time.monotonic()
    if how == "clean":
        assert b.stop() == 0, "SIGTERM shutdown must exit 0"
    else:
        b.kill9()
    mqtt.close_all()
    time.sleep(max(0.0, t0 + downtime - time.monotonic()))
    b.start()
    return time.monotonic() - t0


def _delayed_will(topic: str, delay: int, payload: bytes) -> mb.Will:
    return mb.Will(topic, payload, qos=1, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, delay))


# -- 1. a pending delayed will fires after the restart, on time ------------------------------------


@HOW
def test_delayed_will_survives_restart(b2, mqtt, uniq, how):
    b = b2
    topic = uniq.topic("will")
    wcid = _cid(uniq, "wd", 0)
    c = mqtt(b, wcid, version=5, props=_expiry(60), will=_delayed_will(topic, 2, b"late will"))
    c.ping()
    c.abort()  # TCP close without DISCONNECT: the will is due 2 s from now
    t_abort = time.monotonic()
    down = _restart(b, mqtt, how)
    sub = mqtt(b, _cid(uniq, "ws", 1), version=5)
    sub.subscribe(topic, 1)
    t_sub = time.monotonic() - t_abort
    left = t_abort + 6.0 - time.monotonic()
    try:
        msg = sub.recv_publish(max(left, 0.1))
    except mb.Timeout:
        raise AssertionError(
            f"[{how}] will (delay 2 s) not received within 6 s of the abort "
            f"(restart took {down:.2f}s, subscriber ready {t_sub:.2f}s after the abort)") from None
    elapsed = time.monotonic() - t_abort
    assert (msg.topic, msg.payload) == (topic, b"late will")
    assert mb.WILL_DELAY_INTERVAL not in msg.props
    assert elapsed >= 1.0, (
        f"[{how}] will with delay 2 s published {elapsed:.2f}s after the abort "
        f"(subscriber ready at {t_sub:.2f}s)")
    assert_no_publish(sub, 0.3)  # exactly once


# -- 2. a reconnect after the restart, within the delay, cancels the will ------------------------


@HOW
def test_delayed_will_cancelled_by_reconnect_after_restart(b2, mqtt, uniq, how):
    b = b2
    topic = uniq.topic("will")
    wcid = _cid(uniq, "wr", 0)
    c = mqtt(b, wcid, version=5, props=_expiry(60), will=_delayed_will(topic, 4, b"must not appear"))
    c.ping()
    c.abort()
    t_abort = time.monotonic()
    _restart(b, mqtt, how)
    sub = mqtt(b, _cid(uniq, "ws", 1), version=5)
    sub.subscribe(topic, 1)
    c2 = mqtt(b, wcid, version=5, clean=False, props=_expiry(60))
    t_reconnect = time.monotonic() - t_abort
    assert c2.connack.session_present is True, f"[{how}] session lost over the restart"
    assert t_reconnect < 4.0, f"reconnect came too late for this test ({t_reconnect:.2f}s)"
    # past the original 4 s delay (plus slack): no will
    assert_no_publish(sub, max(t_abort + 5.0 - time.monotonic(), 0.1))
    # the subscriber does receive other messages on the topic
    p = mqtt(b, _cid(uniq, "sn", 0), version=4)
    p.publish(topic, b"SENTINEL", qos=1)
    assert collect_until(sub, b"SENTINEL") == []
    c2.ping()


# -- 3. queued messages: message expiry counts the downtime -----------------------------------------


@HOW
def test_queued_message_expiry_counts_downtime(b2, mqtt, uniq, how):
    b = b2
    topic = uniq.topic("mx")
    s4cid, s5cid = _cid(uniq, "s4", 1), _cid(uniq, "s5", 0)
    s4 = mqtt(b, s4cid, version=4, clean=False)
    s4.subscribe(topic, 1)
    s4.disconnect()
    s5 = mqtt(b, s5cid, version=5, clean=False, props=_expiry(300))
    s5.subscribe(topic, 1)
    s5.disconnect()
    pub = mqtt(b, _cid(uniq, "p", 0), version=5)
    pub.publish(topic, b"short-1", qos=1, props=_msg_expiry(2))
    pub.publish(topic, b"long", qos=1, props=_msg_expiry(60))
    pub.publish(topic, b"short-2", qos=1, props=_msg_expiry(2))
    _restart(b, mqtt, how, downtime=3.0)

    r4 = mqtt(b, s4cid, version=4, clean=False)
    r5 = mqtt(b, s5cid, version=5, clean=False, props=_expiry(300))
    assert (r4.connack.session_present, r5.connack.session_present) == (True, True)
    got4 = r4.drain_publishes(quiet=0.3, first_timeout=5)
    got5 = r5.drain_publishes(quiet=0.3, first_timeout=5)
    assert [m.payload for m in got4] == [b"long"], f"[{how}] 3.1.1 subscriber got {got4}"
    assert [m.payload for m in got5] == [b"long"], f"[{how}] 5.0 subscriber got {got5}"
    mei = got5[0].props.get(mb.MESSAGE_EXPIRY_INTERVAL)
    assert mei is not None, "Message Expiry Interval not forwarded"
    assert 0 < mei < 60, f"forwarded Message Expiry Interval {mei}"
    assert mei <= 58, f"forwarded Message Expiry Interval {mei} after >= 3 s of downtime"


# -- 4. retained messages: expiry counts the downtime -----------------------------------------------


@HOW
def test_retained_message_expiry_counts_downtime(b2, mqtt, uniq, how):
    b = b2
    base = uniq.topic("rx")
    pub = mqtt(b, _cid(uniq, "p", 0), version=5)
    pub.publish(f"{base}/short", b"short", qos=1, retain=True, props=_msg_expiry(2))
    pub.publish(f"{base}/long", b"long", qos=1, retain=True, props=_msg_expiry(60))
    _restart(b, mqtt, how, downtime=3.0)

    sub = mqtt(b, _cid(uniq, "s", 1), version=5)
    sub.subscribe(f"{base}/#", 1)
    got = sub.drain_publishes(quiet=0.3, first_timeout=5)
    assert [(m.topic, m.payload) for m in got] == [(f"{base}/long", b"long")], f"[{how}] got {got}"
    assert got[0].retain is True
    mei = got[0].props.get(mb.MESSAGE_EXPIRY_INTERVAL)
    assert mei is not None and 0 < mei <= 58, f"retained Message Expiry Interval {mei}"


# -- 5. outgoing QoS 2 waiting for PUBCOMP: PUBREL (not PUBLISH) is resent -----------------------


@HOW
def test_outgoing_qos2_pubrel_phase_survives_restart(b2, mqtt, uniq, how):
    b = b2
    topic = uniq.topic("q2")
    scid = _cid(uniq, "s", 1)
    s = mqtt(b, scid, version=5, clean=False, props=_expiry(300))
    s.subscribe(topic, 2)
    pub = mqtt(b, _cid(uniq, "p", 0), version=4)
    pub.publish(topic, b"q2 in pubrel phase", qos=2)
    msg = s.recv_publish(ack=False)
    assert (msg.qos, msg.payload) == (2, b"q2 in pubrel phase")
    s.send(mb.pubrec(msg.pid, 5))
    _t, flags, body = s.expect(mb.PUBREL)
    assert flags == 0x02 and mb.parse_ack(body, 5).pid == msg.pid
    # no PUBCOMP: the broker must remember it is waiting for one
    _restart(b, mqtt, how)

    s2 = mqtt(b, scid, version=5, clean=False, props=_expiry(300))
    assert s2.connack.session_present is True
    pkt = s2.recv_packet(5)
    assert pkt is not None, f"[{how}] nothing re-sent on reconnect (PUBREL {msg.pid} expected)"
    assert pkt[0] == mb.PUBREL, (
        f"[{how}] expected PUBREL {msg.pid} on reconnect [MQTT-4.4.0-1], got {mb.describe(pkt)}")
    assert pkt[1] == 0x02
    assert mb.parse_ack(pkt[2], 5).pid == msg.pid
    s2.send(mb.pubcomp(msg.pid, 5))
    s2.ping()
    assert_no_publish(s2, 1.0)


# -- 6. session expiry counts the downtime ----------------------------------------------------------


@HOW
def test_session_expiry_counts_downtime(b2, mqtt, uniq, how):
    b = b2
    short, long_ = _cid(uniq, "x", 0), _cid(uniq, "y", 1)
    c = mqtt(b, short, version=5, props=_expiry(3))
    c.subscribe(uniq.topic(), 1)
    c.disconnect()
    k = mqtt(b, long_, version=5, props=_expiry(3600))
    k.subscribe(uniq.topic(), 1)
    k.disconnect()
    _restart(b, mqtt, how, downtime=4.0)
    c2 = mqtt(b, short, version=5, clean=False, props=_expiry(3))
    assert c2.connack.session_present is False, (
        f"[{how}] session with expiry 3 s still present after > 4 s of downtime")
    k2 = mqtt(b, long_, version=5, clean=False, props=_expiry(3600))
    assert k2.connack.session_present is True, f"[{how}] session with expiry 3600 s lost"
