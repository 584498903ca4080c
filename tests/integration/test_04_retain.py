"""Retained messages: set, replace, delete, delivery flags and 5.0 Retain Handling."""

from __future__ import annotations

import mqttbytes as mb
import pytest
from conftest import assert_no_publish, collect_until


def _retain(broker, mqtt, uniq, topic, payload, qos=1, version=4):
    pub = mqtt(broker, uniq.cid("rp"), version=version)
    pub.publish(topic, payload, qos=qos, retain=True)
    pub.disconnect()


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
def test_retained_delivered_on_subscribe(broker, mqtt, uniq, version, pub_qos):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"kept", qos=pub_qos)
    sub = mqtt(broker, uniq.cid("s"), version=version)
    assert sub.subscribe(topic, 2) == [2]
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == (topic, b"kept", True, pub_qos)
    assert_no_publish(sub, 0.3)


def test_retained_qos_downgraded_to_subscription(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"q2", qos=2)
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    msg = sub.recv_publish()
    assert (msg.qos, msg.retain) == (1, True)


def test_retained_replace(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"old")
    _retain(broker, mqtt, uniq, topic, b"new")
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    assert [m.payload for m in sub.drain_publishes(0.4, first_timeout=5)] == [b"new"]


def test_retained_delete_with_empty_payload(broker, mqtt, uniq):
    topic, marker = uniq.topic("gone"), uniq.topic("marker")
    _retain(broker, mqtt, uniq, topic, b"soon deleted")
    live = mqtt(broker, uniq.cid("live"), version=4)
    live.subscribe(topic, 1)
    assert live.recv_publish().payload == b"soon deleted"  # the retained copy
    _retain(broker, mqtt, uniq, topic, b"")  # delete
    # Existing subscribers get the empty message as a normal one [MQTT-3.3.1-10 (3.1.1)]
    msg = live.recv_publish()
    assert (msg.payload, msg.retain) == (b"", False)
    _retain(broker, mqtt, uniq, marker, b"MARKER")
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe([(topic, 1), (marker, 1)])
    got = sub.drain_publishes(0.5, first_timeout=5)
    assert [m.payload for m in got] == [b"MARKER"], f"deleted retained message came back: {got}"


def test_empty_retained_publish_is_not_stored(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"")
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    assert_no_publish(sub, 0.4)


@pytest.mark.parametrize("version", [4, 5])
def test_live_message_has_retain_0(broker, mqtt, uniq, version):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=version)
    sub.subscribe(topic, 1)
    _retain(broker, mqtt, uniq, topic, b"live")
    msg = sub.recv_publish()
    assert (msg.payload, msg.retain) == (b"live", False)


def test_v5_retain_as_published(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([(topic, mb.subopts(1, retain_as_published=True))])
    _retain(broker, mqtt, uniq, topic, b"rap-retained")
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"rap-plain", qos=1)
    got = {m.payload: m.retain for m in sub.recv_publishes(2)}
    assert got == {b"rap-retained": True, b"rap-plain": False}


def test_retained_wildcard_subscribe_gets_all(broker, mqtt, uniq):
    base = uniq.topic()
    topics = [f"{base}/a", f"{base}/b/c", f"{base}/d/e/f"]
    for t in topics:
        _retain(broker, mqtt, uniq, t, t.encode())
    _retain(broker, mqtt, uniq, base + "x/other", b"not matched")
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(base + "/#", 1)
    got = sub.drain_publishes(0.5, first_timeout=5)
    assert sorted(m.topic for m in got) == sorted(topics)
    assert all(m.retain and m.payload == m.topic.encode() for m in got)


def test_retained_sent_after_suback(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"after-suback")
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.send(mb.subscribe(3, [(topic, 1)]))
    first = sub.recv_packet(5)
    assert first is not None and first[0] == mb.SUBACK, (
        f"SUBACK must precede the retained PUBLISH, got {mb.describe(first)}")
    assert sub.recv_publish().payload == b"after-suback"


def test_retained_and_resubscribe_v311_sends_again(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"again")
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    assert sub.recv_publish().payload == b"again"
    sub.subscribe(topic, 1)  # [MQTT-3.8.4-3]: retained messages are re-sent
    assert sub.recv_publish().payload == b"again"


# -- 5.0 Retain Handling ------------------------------------------------------------------


def test_v5_retain_handling_0_sends_on_every_subscribe(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"rh0")
    sub = mqtt(broker, uniq.cid("s"), version=5)
    for _ in range(2):
        sub.subscribe([(topic, mb.subopts(1, retain_handling=0))])
        msg = sub.recv_publish()
        assert (msg.payload, msg.retain) == (b"rh0", True)


def test_v5_retain_handling_1_only_for_new_subscription(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"rh1")
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([(topic, mb.subopts(1, retain_handling=1))])
    assert sub.recv_publish().payload == b"rh1"
    sub.subscribe([(topic, mb.subopts(1, retain_handling=1))])  # exists already
    assert_no_publish(sub, 0.4)
    sub.unsubscribe([topic])
    sub.subscribe([(topic, mb.subopts(1, retain_handling=1))])  # new again
    assert sub.recv_publish().payload == b"rh1"


def test_v5_retain_handling_2_never(broker, mqtt, uniq):
    topic = uniq.topic()
    _retain(broker, mqtt, uniq, topic, b"rh2")
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([(topic, mb.subopts(1, retain_handling=2))])
    assert_no_publish(sub, 0.4)
    # ... but live messages still flow on that subscription
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.publish(topic, b"live", qos=1)
    assert sub.recv_publish().payload == b"live"


def test_v5_retained_message_keeps_properties(broker, mqtt, uniq):
    topic = uniq.topic()
    props = (mb.prop_str(mb.CONTENT_TYPE, "text/plain")
             + mb.user_props([("k", "v1"), ("k", "v2")]))
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.publish(topic, b"with props", qos=1, retain=True, props=props)
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    msg = sub.recv_publish()
    assert msg.retain
    assert msg.props.get(mb.CONTENT_TYPE) == "text/plain"
    assert msg.props.get(mb.USER_PROPERTY) == [("k", "v1"), ("k", "v2")]


def test_retained_from_many_topics_each_once(broker, mqtt, uniq):
    base = uniq.topic()
    pub = mqtt(broker, uniq.cid("p"), version=4)
    for i in range(30):
        pub.publish(f"{base}/{i}", str(i).encode(), qos=1, retain=True)
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(base + "/+", 1)
    got = sorted(int(m.payload) for m in sub.drain_publishes(0.5, first_timeout=5))
    assert got == list(range(30))
    pub.publish(base + "/SENTINEL", b"SENTINEL", qos=1)
    assert collect_until(sub, b"SENTINEL") == []
