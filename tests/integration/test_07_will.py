"""Will messages: when they are and are not published, delay, retain, QoS, properties."""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import assert_no_publish, collect_until


def _watch(broker, mqtt, uniq, topic, qos=2, version=4):
    sub = mqtt(broker, uniq.cid("w"), version=version)
    sub.subscribe(topic, qos)
    return sub


def _no_will(broker, mqtt, uniq, sub, will_topic, wait=0.5):
    """Prove the will did not arrive: a sentinel on the same topic from another client
    arrives first and nothing else follows within ``wait``."""
    p = mqtt(broker, uniq.cid("sn"), version=4)
    p.publish(will_topic, b"SENTINEL", qos=1)
    before = collect_until(sub, b"SENTINEL")
    assert before == [], f"will published: {before}"
    assert_no_publish(sub, wait)


@pytest.mark.parametrize("version", [3, 4, 5])
def test_will_published_on_socket_close(broker, mqtt, uniq, version):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=version, will=mb.Will(topic, b"bye", qos=1))
    c.ping()
    c.close()  # no DISCONNECT
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"bye", 1, False)


def test_will_published_on_abortive_close(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=4, will=mb.Will(topic, b"reset"))
    c.abort()  # TCP RST
    assert sub.recv_publish().payload == b"reset"


@pytest.mark.parametrize("version", [4, 5])
def test_no_will_on_normal_disconnect(broker, mqtt, uniq, version):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=version, will=mb.Will(topic, b"must not appear"))
    c.disconnect(reason=0 if version == 5 else None)
    _no_will(broker, mqtt, uniq, sub, topic)


def test_v5_disconnect_with_will_message_0x04(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=5, will=mb.Will(topic, b"asked for it", qos=1))
    c.disconnect(reason=mb.RC_DISCONNECT_WITH_WILL)
    assert sub.recv_publish().payload == b"asked for it"


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_on_protocol_error(broker, mqtt, uniq, version):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=version, will=mb.Will(topic, b"broken"))
    c.send(mb.fixed(mb.PUBLISH, 0b0110, mb.mqtt_str("a") + b"\x00\x01"))  # QoS 3
    assert c.expect_closed(3)
    assert sub.recv_publish().payload == b"broken"


def test_v5_will_published_on_takeover(broker, mqtt, uniq):
    """5.0 3.1.4: on takeover "If the existing Client has a Will Message, that Will Message
    is published as described in section 3.1.2.5" (delay 0 here: at once)."""
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    cid = uniq.cid("wt")
    a = mqtt(broker, cid, version=5, will=mb.Will(topic, b"taken over"))
    mqtt(broker, cid, version=5)
    assert a.expect_closed(3)
    assert sub.recv_publish().payload == b"taken over"


@pytest.mark.parametrize("will_qos, sub_qos", [(0, 2), (1, 1), (2, 2), (2, 1), (1, 0)])
def test_will_qos(broker, mqtt, uniq, will_qos, sub_qos):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, qos=sub_qos)
    c = mqtt(broker, uniq.cid("wc"), version=4, will=mb.Will(topic, b"q", qos=will_qos))
    c.close()
    assert sub.recv_publish().qos == min(will_qos, sub_qos)


@pytest.mark.parametrize("version", [4, 5])
def test_will_retain(broker, mqtt, uniq, version):
    topic = uniq.topic("will")
    live = _watch(broker, mqtt, uniq, topic, qos=1)
    c = mqtt(broker, uniq.cid("wc"), version=version,
             will=mb.Will(topic, b"retained will", qos=1, retain=True))
    c.close()
    msg = live.recv_publish()
    assert (msg.payload, msg.retain) == (b"retained will", False)  # live copy
    late = mqtt(broker, uniq.cid("late"), version=version)
    late.subscribe(topic, 1)
    msg = late.recv_publish()
    assert (msg.payload, msg.retain) == (b"retained will", True)


def test_v5_will_properties_forwarded(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    props = (mb.prop_str(mb.CONTENT_TYPE, "application/json")
             + mb.prop_str(mb.RESPONSE_TOPIC, "reply/here")
             + mb.prop_bin(mb.CORRELATION_DATA, b"\x00\x01corr")
             + mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1)
             + mb.user_props([("a", "1"), ("b", "2"), ("a", "3")]))
    c = mqtt(broker, uniq.cid("wc"), version=5, will=mb.Will(topic, b'{"x":1}', qos=1, props=props))
    c.close()
    msg = sub.recv_publish()
    assert msg.payload == b'{"x":1}'
    assert msg.props.get(mb.CONTENT_TYPE) == "application/json"
    assert msg.props.get(mb.RESPONSE_TOPIC) == "reply/here"
    assert msg.props.get(mb.CORRELATION_DATA) == b"\x00\x01corr"
    assert msg.props.get(mb.PAYLOAD_FORMAT_INDICATOR) == 1
    assert msg.props.get(mb.USER_PROPERTY) == [("a", "1"), ("b", "2"), ("a", "3")]
    assert mb.WILL_DELAY_INTERVAL not in msg.props


def test_will_only_once(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic)
    c = mqtt(broker, uniq.cid("wc"), version=4, will=mb.Will(topic, b"once", qos=1))
    c.close()
    assert sub.recv_publish().payload == b"once"
    assert_no_publish(sub, 0.5)


# -- will delay (5.0) --------------------------------------------------------------------


def _delayed_will(topic, delay, payload=b"delayed"):
    return mb.Will(topic, payload, qos=1, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, delay))


@pytest.mark.slow
def test_v5_will_delay(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    c = mqtt(broker, uniq.cid("wd"), version=5, will=_delayed_will(topic, 2),
             props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 30))
    c.close()
    t0 = time.monotonic()
    assert_no_publish(sub, 1.4)
    msg = sub.recv_publish(3.5)
    elapsed = time.monotonic() - t0
    assert msg.payload == b"delayed"
    assert 1.5 <= elapsed <= 4.0, f"will with delay 2 s published after {elapsed:.2f}s"


@pytest.mark.slow
def test_v5_will_delay_cancelled_by_reconnect(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    cid = uniq.cid("wr")
    session = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 30)
    c = mqtt(broker, cid, version=5, will=_delayed_will(topic, 2), props=session)
    c.close()
    time.sleep(0.5)
    c2 = mqtt(broker, cid, version=5, clean=False, props=session)
    assert c2.connack.session_present is True
    time.sleep(2.3)  # past the original delay
    _no_will(broker, mqtt, uniq, sub, topic, wait=0.2)


@pytest.mark.slow
def test_v5_will_published_when_session_ends_before_delay(broker, mqtt, uniq):
    """Published when the Will Delay Interval passes or the session ends, whichever
    comes first (3.1.3.2.2): session expiry 1 s beats will delay 30 s."""
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    c = mqtt(broker, uniq.cid("ws"), version=5, will=_delayed_will(topic, 30, b"session over"),
             props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 1))
    c.close()
    t0 = time.monotonic()
    msg = sub.recv_publish(4)
    assert msg.payload == b"session over"
    assert time.monotonic() - t0 <= 3.5


def test_v5_will_delay_with_session_expiry_zero_is_immediate(broker, mqtt, uniq):
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    c = mqtt(broker, uniq.cid("wz"), version=5, will=_delayed_will(topic, 30, b"now"))
    c.close()  # session expiry 0: the session ends now, so the will goes now
    assert sub.recv_publish(2.5).payload == b"now"


def test_v5_disconnect_0x04_with_delay_respects_delay(broker, mqtt, uniq):
    """0x04 publishes the will, but the delay still applies; a reconnect cancels it."""
    topic = uniq.topic("will")
    sub = _watch(broker, mqtt, uniq, topic, version=5)
    cid = uniq.cid("w4")
    session = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 30)
    c = mqtt(broker, cid, version=5, will=_delayed_will(topic, 5), props=session)
    c.disconnect(reason=mb.RC_DISCONNECT_WITH_WILL)
    assert_no_publish(sub, 0.5)
    mqtt(broker, cid, version=5, clean=False, props=session)


def test_a_storm_of_2000_disconnects_delivers_every_will(make_broker, mqtt, uniq):
    """2,000 clients with QoS 1 wills lose their connections at once; a connected QoS 1
    subscriber that acknowledges gets every will (none dropped by a queue limit)."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    b = make_broker(workers=2)
    topic = uniq.topic("storm")
    sub = mqtt(b, uniq.cid("w"), version=4)
    sub.subscribe(topic + "/#", 1)
    n = 2000
    socks = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", b.port))
            s.sendall(mb.connect(f"storm{i}x{uniq.prefix()}", will=mb.Will(f"{topic}/{i}", b"gone", qos=1),
                                 keepalive=600))
            socks.append(s)
        for s in socks:  # every CONNACK in: all of them are connected
            s.settimeout(10)
            assert s.recv(4)[:1] == b"\x20"
    finally:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # RST: lost, no DISCONNECT
    got = set()
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        got.add(sub.recv_publish(timeout=10).topic)
    assert len(got) == n, f"{n - len(got)} of {n} wills never arrived"
