"""SUBSCRIBE / UNSUBSCRIBE and message routing: filters, wildcards, $SYS, QoS, order."""

from __future__ import annotations

import mqttbytes as mb
import pytest
from conftest import assert_no_publish, collect_until


@pytest.mark.parametrize("version", [3, 4, 5])
def test_suback_grants_requested_qos(broker, mqtt, uniq, version):
    c = mqtt(broker, uniq.cid("sa"), version=version)
    base = uniq.topic()
    c.send(mb.subscribe(0x1234, [(f"{base}/0", 0), (f"{base}/1", 1), (f"{base}/2", 2)],
                        version=version))
    _ptype, flags, body = c.expect(mb.SUBACK)
    assert flags == 0
    ack = mb.parse_suback(body, version)
    assert ack.pid == 0x1234
    assert ack.codes == [0, 1, 2]


def test_suback_exact_bytes_v311(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("sb"), version=4)
    c.send(mb.subscribe(10, [(uniq.topic(), 1)]))
    assert c.recv_packet(5) == (mb.SUBACK, 0, b"\x00\x0a\x01")


@pytest.mark.parametrize("version", [3, 4, 5])
def test_qos0_roundtrip(broker, mqtt, uniq, version):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=version)
    assert sub.subscribe(topic, 0) == [0]
    pub = mqtt(broker, uniq.cid("p"), version=version)
    pub.publish(topic, b"hello qos0")
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload, msg.qos, msg.pid, msg.retain, msg.dup) == (
        topic, b"hello qos0", 0, None, False, False)


def test_cross_version_delivery(broker, mqtt, uniq):
    topic = uniq.topic()
    subs = {v: mqtt(broker, uniq.cid(f"s{v}"), version=v) for v in (3, 4, 5)}
    for s in subs.values():
        s.subscribe(topic, 1)
    for pv in (3, 4, 5):
        pub = mqtt(broker, uniq.cid(f"p{pv}"), version=pv)
        pub.publish(topic, f"from v{pv}".encode(), qos=1)
        for sv, s in subs.items():
            msg = s.recv_publish()
            assert (msg.topic, msg.payload, msg.qos) == (topic, f"from v{pv}".encode(), 1), sv


def test_empty_payload_delivered(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"", qos=1)
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload) == (topic, b"")


@pytest.mark.parametrize("size", [127, 128, 16_383, 16_384, 60_000])
def test_payload_sizes_across_length_encodings(broker, mqtt, uniq, size):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    payload = bytes(i % 251 for i in range(size))
    pub.publish(topic, payload, qos=1)
    msg = sub.recv_publish()
    assert msg.payload == payload


def test_utf8_topic_roundtrip(broker, mqtt, uniq):
    topic = uniq.topic() + "/\u00e9t\u00e9/\u6f22\u5b57/\U0001F600"
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 0)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"unicode")
    assert sub.recv_publish().topic == topic


def test_topic_is_case_sensitive_and_exact(broker, mqtt, uniq):
    base = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(f"{base}/a", 0)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    for t in (f"{base}/A", f"{base}/a/", f"{base}/a/b", f"{base}/a "):
        pub.publish(t, b"wrong")
    pub.publish(f"{base}/a", b"right")
    assert collect_until(sub, b"right") == []


# -- wildcards ----------------------------------------------------------------------------


def _routing(broker, mqtt, uniq, flt_suffix, publish_suffixes):
    base = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(base + flt_suffix, 0)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    for s in publish_suffixes:
        pub.publish(base + s, s.encode())
    sentinel_topic = base + "/zz-sentinel"
    sub.subscribe(sentinel_topic, 0)
    pub.publish(sentinel_topic, b"SENTINEL")
    got = collect_until(sub, b"SENTINEL")
    return base, sorted(m.topic[len(base):] for m in got)


def test_wildcard_plus(broker, mqtt, uniq):
    _, got = _routing(broker, mqtt, uniq, "/+/x",
                      ["/a/x", "/b/x", "//x", "/a/b/x", "/x", "/a/x/y", "/a/y"])
    assert got == sorted(["/a/x", "/b/x", "//x"])


def test_wildcard_hash(broker, mqtt, uniq):
    _, got = _routing(broker, mqtt, uniq, "/a/#",
                      ["/a", "/a/", "/a/b", "/a/b/c", "/ab", "/b/a", ""])
    # "a/#" also matches the parent level "a" [MQTT-4.7.1-2 non-normative example]
    assert got == sorted(["/a", "/a/", "/a/b", "/a/b/c"])


def test_wildcard_plus_and_hash_combined(broker, mqtt, uniq):
    _, got = _routing(broker, mqtt, uniq, "/+/b/#",
                      ["/a/b", "/a/b/c", "/x/b/c/d", "/a/c/b", "/b"])
    assert got == sorted(["/a/b", "/a/b/c", "/x/b/c/d"])


def test_plus_alone_matches_single_level(broker, mqtt, uniq):
    # A filter of only "+" matches one-level topics; use an exact prefix-free name.
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe("+", 0)
    lvl = "single" + uniq.cid()
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(lvl + "/two", b"no")
    pub.publish(lvl, b"yes")
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload) == (lvl, b"yes")


# -- $SYS ------------------------------------------------------------------------------


def test_hash_does_not_match_dollar_topics(broker, mqtt, uniq):
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([("#", 0), ("+/+", 0)])
    topic = uniq.topic()
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish("$SYS/" + uniq.cid("x"), b"sys")
    pub.publish("$other/x", b"dollar")
    pub.publish(topic, b"SENTINEL")
    seen = collect_until(sub, b"SENTINEL")
    seen += sub.drain_publishes(0.5)
    dollar = [m.topic for m in seen if m.topic.startswith("$")]
    assert dollar == [], f"'#' / '+/+' matched $-topics: {dollar}"


@pytest.mark.parametrize("version", [4, 5])
def test_client_publish_to_sys_is_not_delivered(broker, mqtt, uniq, version):
    sys_topic = "$SYS/" + uniq.cid("fake")
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([("$SYS/#", 1), (sys_topic, 1)])
    sentinel = uniq.topic()
    sub.subscribe(sentinel, 1)
    pub = mqtt(broker, uniq.cid("p"), version=version)
    pub.publish(sys_topic, b"forged", qos=0)
    ack = pub.publish(sys_topic, b"forged-qos1", qos=1)
    if version == 4:
        assert ack is not None and ack.reason == 0
    pub.publish(sentinel, b"SENTINEL", qos=1)
    seen = collect_until(sub, b"SENTINEL")
    seen += sub.drain_publishes(0.4)
    forged = [m for m in seen if m.topic == sys_topic]
    assert forged == [], "a client publish to $SYS/ reached subscribers"


# -- QoS downgrade --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_delivered_qos_is_min_of_pub_and_sub(broker, mqtt, uniq, version, pub_qos, sub_qos):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=version)
    assert sub.subscribe(topic, sub_qos) == [sub_qos]
    pub = mqtt(broker, uniq.cid("p"), version=version)
    pub.publish(topic, b"q", qos=pub_qos)
    msg = sub.recv_publish()
    assert msg.qos == min(pub_qos, sub_qos)
    assert (msg.pid is None) == (msg.qos == 0)
    if msg.pid is not None:
        assert msg.pid != 0
    assert_no_publish(sub, 0.2)


def test_resubscribe_replaces_subscription(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    assert sub.subscribe(topic, 2) == [2]
    assert sub.subscribe(topic, 0) == [0]  # same filter: replaces [MQTT-3.8.4-3]
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"once", qos=2)
    msg = sub.recv_publish()
    assert (msg.payload, msg.qos) == (b"once", 0)
    assert_no_publish(sub, 0.3)


def test_each_subscriber_gets_a_copy(broker, mqtt, uniq):
    topic = uniq.topic()
    subs = [mqtt(broker, uniq.cid(f"s{i}"), version=4 + i % 2) for i in range(5)]
    for s in subs:
        s.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"fan", qos=1)
    for s in subs:
        assert s.recv_publish().payload == b"fan"
        assert_no_publish(s, 0.1)


def test_publisher_receives_own_message_when_subscribed(broker, mqtt, uniq):
    topic = uniq.topic()
    c = mqtt(broker, uniq.cid("self"), version=4)
    c.subscribe(topic, 1)
    c.publish(topic, b"echo", qos=1)
    assert c.recv_publish().payload == b"echo"


# -- UNSUBSCRIBE ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_unsubscribe_stops_delivery(broker, mqtt, uniq, version):
    topic, sentinel = uniq.topic("a"), uniq.topic("sentinel")
    sub = mqtt(broker, uniq.cid("s"), version=version)
    sub.subscribe([(topic, 1), (sentinel, 1)])
    sub.send(mb.unsubscribe(77, [topic], version=version))
    _ptype, flags, body = sub.expect(mb.UNSUBACK)
    assert flags == 0
    ack = mb.parse_unsuback(body, version)
    assert ack.pid == 77
    if version == 5:
        assert ack.codes == [0x00]
    else:
        assert body == b"\x00\x4d"
    pub = mqtt(broker, uniq.cid("p"), version=4)
    pub.publish(topic, b"after unsubscribe", qos=1)
    pub.publish(sentinel, b"SENTINEL", qos=1)
    assert collect_until(sub, b"SENTINEL") == []


def test_v5_unsuback_reason_codes(broker, mqtt, uniq):
    topic = uniq.topic()
    c = mqtt(broker, uniq.cid("u"), version=5)
    c.subscribe(topic, 0)
    codes = c.unsubscribe([topic, uniq.topic("never")])
    assert codes == [mb.RC_SUCCESS, mb.RC_NO_SUBSCRIPTION_EXISTED]


def test_unsubscribe_unknown_filter_v311_acknowledged(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("u"), version=4)
    c.send(mb.unsubscribe(5, [uniq.topic("never")]))
    assert c.recv_packet(5) == (mb.UNSUBACK, 0, b"\x00\x05")


# -- ordering and packet identifiers -------------------------------------------------------


@pytest.mark.parametrize("sub_version", [4, 5])
def test_200_qos1_messages_arrive_in_order(broker, mqtt, uniq, sub_version):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=sub_version)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    # Pipeline all PUBLISHes, then collect the PUBACKs: they must come in order [MQTT-4.6.0-2].
    pub.send(b"".join(mb.publish(topic, str(i).encode(), qos=1, pid=i + 1) for i in range(200)))
    got = [int(m.payload) for m in sub.recv_publishes(200, timeout=20)]
    acks = [mb.parse_ack(pub.expect(mb.PUBACK, 10)[2]).pid for _ in range(200)]
    assert got == list(range(200))
    assert acks == list(range(1, 201))


def test_qos1_from_v5_publisher_in_order_within_receive_maximum(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 2)
    pub = mqtt(broker, uniq.cid("p"), version=5)
    window = pub.connack.props.get(mb.RECEIVE_MAXIMUM, 65535)
    batch = min(window, 10)
    sent = 0
    for _ in range(10):
        pub.send(b"".join(mb.publish(topic, str(sent + i).encode(), qos=1, pid=sent + i + 1,
                                     version=5) for i in range(batch)))
        for i in range(batch):
            assert mb.parse_ack(pub.expect(mb.PUBACK)[2], 5).pid == sent + i + 1
        sent += batch
    got = [int(m.payload) for m in sub.recv_publishes(sent, timeout=20)]
    assert got == list(range(sent))


def test_packet_id_spaces_are_separate_per_direction_qos1(broker, mqtt, uniq):
    topic, other = uniq.topic("in"), uniq.topic("out")
    c = mqtt(broker, uniq.cid("c"), version=4)
    c.subscribe(topic, 1)
    watcher = mqtt(broker, uniq.cid("w"), version=4)
    watcher.subscribe(other, 1)
    feeder = mqtt(broker, uniq.cid("f"), version=4)
    feeder.publish(topic, b"to-c", qos=1)
    msg = c.recv_publish(ack=False)  # broker -> c, pid X, left unacknowledged
    x = msg.pid
    # c -> broker with the same pid X: a separate space, so a normal PUBACK X follows
    c.send(mb.publish(other, b"from-c", qos=1, pid=x))
    _ptype, _, body = c.expect(mb.PUBACK)
    assert mb.parse_ack(body).pid == x
    assert watcher.recv_publish().payload == b"from-c"
    c.send(mb.puback(x))  # now acknowledge the broker's message
    c.ping()
    assert_no_publish(c, 0.3)  # nothing re-sent


def test_packet_id_spaces_are_separate_per_direction_qos2(broker, mqtt, uniq):
    topic, other = uniq.topic("in"), uniq.topic("out")
    c = mqtt(broker, uniq.cid("c"), version=5)
    c.subscribe(topic, 2)
    watcher = mqtt(broker, uniq.cid("w"), version=4)
    watcher.subscribe(other, 2)
    feeder = mqtt(broker, uniq.cid("f"), version=4)
    feeder.publish(topic, b"to-c", qos=2)
    msg = c.recv_publish(ack=False)
    assert msg.qos == 2
    x = msg.pid
    c.send(mb.pubrec(x, 5))
    rel = mb.parse_ack(c.expect(mb.PUBREL)[2], 5)
    assert rel.pid == x
    # Broker->c flow waits for PUBCOMP x; c starts its own QoS 2 flow with the same x.
    c.send(mb.publish(other, b"from-c", qos=2, pid=x, version=5))
    rec = mb.parse_ack(c.expect(mb.PUBREC)[2], 5)
    assert (rec.pid, rec.reason) == (x, 0)
    c.send(mb.pubrel(x, 5))
    comp = mb.parse_ack(c.expect(mb.PUBCOMP)[2], 5)
    assert (comp.pid, comp.reason) == (x, 0)
    c.send(mb.pubcomp(x, 5))  # finish the broker's flow
    c.ping()
    got = watcher.recv_publish()
    assert got.payload == b"from-c"
    assert_no_publish(watcher, 0.3)
    assert_no_publish(c, 0.2)
