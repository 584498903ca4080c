"""MQTT 5.0 properties and features: user properties, request/response, payload format,
message expiry, topic aliases, subscription identifiers, No Local, flow control, packet
size limits, server keep alive, enhanced auth, shared subscriptions."""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import (
    CONFIG_SMALL_LIMITS,
    TARGET,
    assert_disconnected,
    assert_no_publish,
    check_bystanders,
    client_id_on_shard,
    collect_until,
)


def _pair(broker, mqtt, uniq, sub_qos=1, sub_props=b"", sub_connect_props=b""):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5, props=sub_connect_props)
    sub.subscribe([(topic, sub_qos)], props=sub_props)
    pub = mqtt(broker, uniq.cid("p"), version=5)
    return topic, sub, pub


# -- forwarded properties ------------------------------------------------------------------


def test_user_properties_preserved_in_order_with_duplicates(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pairs = [("a", "1"), ("b", "2"), ("a", "1"), ("a", "3"), ("\u00fc", ""), ("", "empty name")]
    pub.publish(topic, b"up", qos=1, props=mb.user_props(pairs))
    assert sub.recv_publish().props.get(mb.USER_PROPERTY) == pairs


def test_response_topic_and_correlation_data_forwarded(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    props = (mb.prop_str(mb.RESPONSE_TOPIC, "reply/to/me")
             + mb.prop_bin(mb.CORRELATION_DATA, b"\x00\xffid-42"))
    pub.publish(topic, b"request", qos=1, props=props)
    msg = sub.recv_publish()
    assert msg.props.get(mb.RESPONSE_TOPIC) == "reply/to/me"
    assert msg.props.get(mb.CORRELATION_DATA) == b"\x00\xffid-42"


def test_content_type_and_payload_format_forwarded(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    props = mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1) + mb.prop_str(mb.CONTENT_TYPE, "text/plain; charset=utf-8")
    pub.publish(topic, "h\u00e9llo".encode(), qos=1, props=props)
    msg = sub.recv_publish()
    assert msg.payload == "h\u00e9llo".encode()
    assert msg.props.get(mb.PAYLOAD_FORMAT_INDICATOR) == 1
    assert msg.props.get(mb.CONTENT_TYPE) == "text/plain; charset=utf-8"


def test_no_properties_invented(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.publish(topic, b"plain", qos=1)
    msg = sub.recv_publish()
    assert set(msg.props) <= {mb.TOPIC_ALIAS}, f"unexpected properties {msg.props}"


def test_invalid_utf8_payload_with_format_indicator_rejected(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.send(mb.publish(topic, b"\xff\xfe bad", qos=1, pid=5, version=5,
                        props=mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1)))
    pkt = pub.recv_packet(5)
    assert pkt is not None, "no answer to a PUBLISH with an invalid UTF-8 payload"
    if pkt[0] == mb.PUBACK:
        ack = mb.parse_ack(pkt[2], 5)
        assert (ack.pid, ack.reason) == (5, mb.RC_PAYLOAD_FORMAT_INVALID)
    else:
        assert pkt[0] == mb.DISCONNECT, mb.describe(pkt)
        assert mb.parse_disconnect(pkt[2]).reason == mb.RC_PAYLOAD_FORMAT_INVALID
        assert pub.expect_closed(3)
    other = mqtt(broker, uniq.cid("o"), version=5)
    other.publish(topic, b"SENTINEL", qos=1)
    assert collect_until(sub, b"SENTINEL") == []


def test_message_expiry_forwarded_live(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.publish(topic, b"exp", qos=1, props=mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 100))
    value = sub.recv_publish().props.get(mb.MESSAGE_EXPIRY_INTERVAL)
    assert value is not None and 0 < value <= 100


@pytest.mark.slow
def test_message_expiry_counts_down_and_expired_are_dropped(broker, mqtt, uniq):
    cid, topic, rtopic = uniq.cid("me"), uniq.topic(), uniq.topic("retained")
    session = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 60)
    c = mqtt(broker, cid, version=5, props=session)
    c.subscribe(topic, 1)
    c.disconnect()
    pub = mqtt(broker, uniq.cid("p"), version=5)
    mei = mb.MESSAGE_EXPIRY_INTERVAL
    pub.publish(topic, b"short", qos=1, props=mb.prop_u32(mei, 1))
    pub.publish(topic, b"long", qos=1, props=mb.prop_u32(mei, 60))
    pub.publish(topic, b"forever", qos=1)
    pub.publish(rtopic, b"short retained", qos=1, retain=True, props=mb.prop_u32(mei, 1))
    time.sleep(2.2)
    c2 = mqtt(broker, cid, version=5, clean=False, props=session)
    assert c2.connack.session_present is True
    msgs = c2.recv_publishes(2)
    assert [m.payload for m in msgs] == [b"long", b"forever"], "expired queued message delivered"
    remaining = msgs[0].props.get(mei)
    assert remaining is not None and 0 < remaining <= 58, (
        f"Message Expiry Interval must be reduced by the time waited (60 - 2.2 s), got {remaining}")
    assert mei not in msgs[1].props
    assert_no_publish(c2, 0.3)
    s = mqtt(broker, uniq.cid("rs"), version=5)
    s.subscribe(rtopic, 1)
    assert_no_publish(s, 0.5)  # expired retained message is gone


# -- topic aliases ----------------------------------------------------------------------------


def _alias(n):
    return mb.prop_u16(mb.TOPIC_ALIAS, n)


def test_topic_alias_from_client(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    topic2 = topic + "/two"
    sub.subscribe(topic2, 1)
    tam = pub.connack.props.get(mb.TOPIC_ALIAS_MAXIMUM, 0)
    assert tam >= 1, "broker must accept topic aliases (CONNACK Topic Alias Maximum)"
    pub.publish(topic, b"set", qos=1, props=_alias(1))
    pub.publish("", b"alias only", qos=1, props=_alias(1))
    pub.publish(topic2, b"remap", qos=1, props=_alias(1))  # same alias, new topic
    pub.publish("", b"alias only 2", qos=0, props=_alias(1))
    got = [(m.topic, m.payload) for m in sub.recv_publishes(4)]
    assert got == [(topic, b"set"), (topic, b"alias only"), (topic2, b"remap"),
                   (topic2, b"alias only 2")]


def test_topic_alias_not_sent_to_client_without_alias_maximum(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    for i in range(3):
        pub.publish(topic, b"x", qos=1)
    for m in sub.recv_publishes(3):
        assert m.topic == topic and mb.TOPIC_ALIAS not in m.props


def test_broker_topic_aliases_to_client_resolve(broker, mqtt, uniq):
    base = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5, props=mb.prop_u16(mb.TOPIC_ALIAS_MAXIMUM, 2))
    sub.subscribe(base + "/#", 1)
    pub = mqtt(broker, uniq.cid("p"), version=5)
    sent = [f"{base}/{t}" for t in "abcabcaa"]
    for t in sent:
        pub.publish(t, t.encode(), qos=1)
    aliases: dict[int, str] = {}
    resolved = []
    for m in sub.recv_publishes(len(sent)):
        alias = m.props.get(mb.TOPIC_ALIAS)
        if alias is not None:
            assert 1 <= alias <= 2, f"alias {alias} above our maximum 2"
        if m.topic:
            if alias is not None:
                aliases[alias] = m.topic
            resolved.append(m.topic)
        else:
            assert alias in aliases, f"empty topic with unknown alias {alias}"
            resolved.append(aliases[alias])
        assert m.payload == resolved[-1].encode()
    assert resolved == sent


def test_topic_alias_above_maximum_disconnects_0x94(broker, mqtt, uniq):
    pub = mqtt(broker, uniq.cid("p"), version=5)
    tam = pub.connack.props.get(mb.TOPIC_ALIAS_MAXIMUM, 0)
    pub.send(mb.publish(uniq.topic(), b"x", version=5, props=_alias(tam + 1)))
    assert_disconnected(pub, 5, {mb.RC_TOPIC_ALIAS_INVALID})
    check_bystanders(broker, mqtt, uniq, 5)


def test_topic_alias_zero_disconnects_0x94(broker, mqtt, uniq):
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.send(mb.publish(uniq.topic(), b"x", version=5, props=_alias(0)))
    assert_disconnected(pub, 5, {mb.RC_TOPIC_ALIAS_INVALID, mb.RC_PROTOCOL_ERROR})


def test_unknown_topic_alias_with_empty_topic_is_error(broker, mqtt, uniq):
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.send(mb.publish("", b"x", version=5, props=_alias(1)))
    assert_disconnected(pub, 5, {mb.RC_PROTOCOL_ERROR, mb.RC_TOPIC_ALIAS_INVALID})


def test_topic_aliases_are_per_connection(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.publish(topic, b"set", qos=1, props=_alias(1))
    other = mqtt(broker, uniq.cid("o"), version=5)
    other.send(mb.publish("", b"x", version=5, props=_alias(1)))  # not set on *this* link
    assert_disconnected(other, 5, {mb.RC_PROTOCOL_ERROR, mb.RC_TOPIC_ALIAS_INVALID})
    assert sub.recv_publish().payload == b"set"
    assert_no_publish(sub, 0.3)


# -- subscription identifiers, overlap, No Local ---------------------------------------------


def _sid(n):
    return mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, n)


@pytest.mark.parametrize("sid", [1, 127, 128, 16_384, 268_435_455])
def test_subscription_identifier_delivered(broker, mqtt, uniq, sid):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_props=_sid(sid))
    pub.publish(topic, b"sid", qos=1)
    assert sub.recv_publish().props.get(mb.SUBSCRIPTION_IDENTIFIER) == [sid]


def test_subscription_identifier_on_retained_delivery(broker, mqtt, uniq):
    topic = uniq.topic()
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.publish(topic, b"kept", qos=1, retain=True)
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([(topic, 1)], props=_sid(33))
    msg = sub.recv_publish()
    assert msg.retain and msg.props.get(mb.SUBSCRIPTION_IDENTIFIER) == [33]


def test_subscription_identifier_replaced_on_resubscribe(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_props=_sid(1))
    sub.subscribe([(topic, 1)], props=_sid(2))
    pub.publish(topic, b"x", qos=1)
    assert sub.recv_publish().props.get(mb.SUBSCRIPTION_IDENTIFIER) == [2]
    sub.subscribe([(topic, 1)])  # no identifier now
    pub.publish(topic, b"y", qos=1)
    assert mb.SUBSCRIPTION_IDENTIFIER not in sub.recv_publish().props


def test_overlapping_subscriptions_one_copy_max_qos_all_identifiers(broker, mqtt, uniq):
    base = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe([(base + "/+", 1)], props=_sid(11))
    sub.subscribe([(base + "/#", 2)], props=_sid(22))
    sub.subscribe([(base + "/x", 0)], props=_sid(33))
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.publish(base + "/x", b"overlap", qos=2)
    msg = sub.recv_publish()
    assert msg.qos == 2
    assert sorted(msg.props.get(mb.SUBSCRIPTION_IDENTIFIER, [])) == [11, 22, 33]
    assert_no_publish(sub, 0.4)


def test_no_local(broker, mqtt, uniq):
    topic = uniq.topic()
    c = mqtt(broker, uniq.cid("nl"), version=5)
    c.subscribe([(topic, mb.subopts(1, no_local=True))])
    watcher = mqtt(broker, uniq.cid("w"), version=5)
    watcher.subscribe(topic, 1)
    c.publish(topic, b"own", qos=1)
    assert watcher.recv_publish().payload == b"own"
    other = mqtt(broker, uniq.cid("o"), version=5)
    other.publish(topic, b"foreign", qos=1)
    assert c.recv_publish().payload == b"foreign"  # and not b"own" before it
    assert_no_publish(c, 0.3)


# -- flow control -------------------------------------------------------------------------------


def test_receive_maximum_exceeded_disconnects_0x93(broker, mqtt, uniq):
    pub = mqtt(broker, uniq.cid("p"), version=5)
    window = pub.connack.props.get(mb.RECEIVE_MAXIMUM, 65535)
    assert window == (100 if TARGET == "shardbroker" else 20)  # the brokers' defaults
    topic = uniq.topic()
    # QoS 2 without PUBREL keeps each message counted against the window.
    pub.send(b"".join(mb.publish(topic, b"x", qos=2, pid=i, version=5)
                      for i in range(1, window + 2)))
    assert_disconnected(pub, 5, {mb.RC_RECEIVE_MAXIMUM_EXCEEDED})
    recs = [mb.parse_ack(p[2], 5).pid for p in pub.before_close if p[0] == mb.PUBREC]
    assert recs == list(range(1, len(recs) + 1)) and len(recs) <= window


def test_disconnect_readable_by_a_client_that_keeps_sending(broker, mqtt, uniq):
    """After DISCONNECT the broker half-closes and drains: a client still answering
    PUBRECs with PUBRELs is not reset before it reads the 0x93 [MQTT-3.14.4-2]."""
    pub = mqtt(broker, uniq.cid("p"), version=5)
    window = pub.connack.props.get(mb.RECEIVE_MAXIMUM, 65535)
    topic = uniq.topic()
    pub.send(b"".join(mb.publish(topic, b"x", qos=2, pid=i, version=5)
                      for i in range(1, window + 2)))
    reasons = []
    while True:
        try:
            pkt = pub.recv_packet(5)
        except mb.ConnectionClosed:
            break
        assert pkt is not None, "no DISCONNECT and no close within 5 s"
        if pkt[0] == mb.PUBREC:
            pub.send(mb.pubrel(mb.parse_ack(pkt[2], 5).pid, 5))  # raises on a reset
        elif pkt[0] == mb.DISCONNECT:
            reasons.append(mb.parse_disconnect(pkt[2], 5).reason)
    assert reasons == [mb.RC_RECEIVE_MAXIMUM_EXCEEDED]


def test_receive_maximum_window_reused_after_pubcomp(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=2)
    window = pub.connack.props.get(mb.RECEIVE_MAXIMUM, 65535)
    for rnd in range(3):  # 3 full windows in a row, each completed: never exceeds
        pub.send(b"".join(mb.publish(topic, b"w", qos=2, pid=i, version=5)
                          for i in range(1, window + 1)))
        for i in range(1, window + 1):
            assert mb.parse_ack(pub.expect(mb.PUBREC)[2], 5).pid == i
        pub.send(b"".join(mb.pubrel(i, 5) for i in range(1, window + 1)))
        for i in range(1, window + 1):
            assert mb.parse_ack(pub.expect(mb.PUBCOMP)[2], 5).pid == i
    assert len(sub.recv_publishes(3 * window, timeout=20)) == 3 * window


def test_broker_respects_client_receive_maximum(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=1,
                            sub_connect_props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 2))
    for i in range(6):
        pub.publish(topic, str(i).encode(), qos=1)
    first = sub.recv_publishes(2, ack=False)
    assert_no_publish(sub, 0.5)  # window of 2 is full
    sub.send(mb.puback(first[0].pid, 5))
    third = sub.recv_publish(ack=False)
    assert_no_publish(sub, 0.3)
    sub.send(mb.puback(first[1].pid, 5) + mb.puback(third.pid, 5))
    rest = sub.recv_publishes(3)
    assert [int(m.payload) for m in first + [third] + rest] == list(range(6))


def test_client_maximum_packet_size_respected(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq,
                            sub_connect_props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 200))
    pub.publish(topic, b"B" * 500, qos=1)  # too big for the subscriber: dropped for it
    pub.publish(topic, b"small", qos=1)
    msg = sub.recv_publish()
    assert msg.payload == b"small", "a packet over the client's Maximum Packet Size was sent"
    assert_no_publish(sub, 0.3)


def test_client_maximum_packet_size_drops_user_properties_or_message(broker, mqtt, uniq):
    """Every packet sent to the client fits in its Maximum Packet Size."""
    topic, sub, pub = _pair(broker, mqtt, uniq,
                            sub_connect_props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 120))
    pub.publish(topic, b"p" * 60, qos=1, props=mb.user_props([("k", "v" * 80)]))
    pub.publish(topic, b"SENTINEL", qos=1)
    while True:
        pkt = sub.recv_packet(5)
        assert pkt is not None
        size = 1 + len(mb.varint(len(pkt[2]))) + len(pkt[2])
        assert size <= 120, f"sent a {size}-byte packet to a client with maximum 120"
        msg = mb.parse_publish(pkt[1], pkt[2], 5)
        sub.send(mb.puback(msg.pid, 5))
        if msg.payload == b"SENTINEL":
            break


# -- broker limits (config) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(make_module_broker):
    return make_module_broker(workers=1, config=CONFIG_SMALL_LIMITS, name="broker-limits")


def test_broker_advertises_maximum_packet_size(limited, mqtt, uniq):
    c = mqtt(limited, uniq.cid("m"), version=5)
    assert c.connack.props.get(mb.MAXIMUM_PACKET_SIZE) == 2048


def test_publish_under_broker_maximum_packet_size_ok(limited, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(limited, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    pub = mqtt(limited, uniq.cid("p"), version=5)
    pub.publish(topic, b"x" * 1900, qos=1)
    assert len(sub.recv_publish().payload) == 1900


@pytest.mark.parametrize("version", [4, 5])
def test_oversize_publish_rejected(limited, mqtt, uniq, version):
    topic = uniq.topic()
    sub = mqtt(limited, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    pub = mqtt(limited, uniq.cid("p"), version=version)
    pub.try_send(mb.publish(topic, b"x" * 3000, qos=1, pid=1, version=version))
    assert_disconnected(pub, version, {mb.RC_PACKET_TOO_LARGE})
    assert_no_publish(sub, 0.3)
    check_bystanders(limited, mqtt, uniq, version)


def test_oversize_remaining_length_header_rejected_before_body(limited, mqtt, uniq):
    """Only the fixed header of a 100 MB packet is sent: the broker must not wait for
    (or buffer) the body, it must refuse on the length alone."""
    pub = mqtt(limited, uniq.cid("p"), version=5)
    pub.send(b"\x30" + mb.varint(100_000_000) + b"\x00\x01a")
    assert_disconnected(pub, 5, {mb.RC_PACKET_TOO_LARGE})


def test_server_keep_alive_caps_client_keepalive(limited, mqtt, uniq):
    c = mqtt(limited, uniq.cid("k"), version=5, keepalive=60)
    assert c.connack.props.get(mb.SERVER_KEEP_ALIVE) == 10


def test_server_keep_alive_not_raised(limited, mqtt, uniq):
    c = mqtt(limited, uniq.cid("k"), version=5, keepalive=5)
    assert c.connack.props.get(mb.SERVER_KEEP_ALIVE, 5) == 5


# -- authentication --------------------------------------------------------------------------------


def test_unsupported_authentication_method_refused_0x8c(broker, mqtt, uniq):
    c = mqtt.raw(broker)
    ack = c.connect_mqtt(uniq.cid("au"), version=5,
                         props=mb.prop_str(mb.AUTHENTICATION_METHOD, "SCRAM-SHA-256")
                         + mb.prop_bin(mb.AUTHENTICATION_DATA, b"client-first"))
    assert ack.rc == mb.RC_BAD_AUTHENTICATION_METHOD
    assert ack.session_present is False
    assert c.expect_closed(3)


def test_auth_packet_without_auth_method_is_protocol_error(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("ap"), version=5)
    c.send(mb.auth(0x19, mb.prop_str(mb.AUTHENTICATION_METHOD, "SCRAM-SHA-256")))
    assert_disconnected(c, 5, {mb.RC_PROTOCOL_ERROR, mb.RC_BAD_AUTHENTICATION_METHOD})


# -- shared subscriptions -----------------------------------------------------------------------------


def _gather(clients, n, timeout=10.0):
    """Read PUBLISHes from several clients until ``n`` arrived in total."""
    got: list[tuple[int, mb.Publish]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for idx, c in enumerate(clients):
            pkt = c.recv_packet(0.02)
            if pkt is None:
                continue
            assert pkt[0] == mb.PUBLISH, mb.describe(pkt)
            c._pending.appendleft(pkt)
            got.append((idx, c.recv_publish(5)))
    return got


def _members(broker4, mqtt, uniq, group_filter, shards=(1, 2), qos=1):
    out = []
    for s in shards:
        cid = client_id_on_shard(uniq.prefix("m"), s, broker4.workers)
        m = mqtt(broker4, cid, version=5)
        assert m.subscribe(group_filter, qos) == [qos]
        out.append(m)
    return out


def test_shared_subscription_each_message_once_across_shards(broker4, mqtt, uniq):
    topic = uniq.topic()
    shared = f"$share/g{uniq.cid()}/{topic}"
    members = _members(broker4, mqtt, uniq, shared)
    normal = mqtt(broker4, client_id_on_shard(uniq.prefix("n"), 0, broker4.workers), version=5)
    normal.subscribe(topic, 1)
    pub = mqtt(broker4, client_id_on_shard(uniq.prefix("p"), 3, broker4.workers), version=5)
    for i in range(20):
        pub.publish(topic, str(i).encode(), qos=1)
    got = _gather(members, 20)
    payloads = sorted(int(m.payload) for _, m in got)
    assert payloads == list(range(20)), f"shared group got {payloads}"
    for c in members:
        assert_no_publish(c, 0.3)
    # a non-shared subscriber still gets every message
    assert sorted(int(m.payload) for m in normal.recv_publishes(20)) == list(range(20))
    assert all(m.topic == topic for _, m in got)


@pytest.mark.parametrize("leave", ["unsubscribe", "disconnect"])
def test_shared_subscription_member_leaving_strands_nothing(broker4, mqtt, uniq, leave):
    topic = uniq.topic()
    shared = f"$share/g{uniq.cid()}/{topic}"
    a, b = _members(broker4, mqtt, uniq, shared)
    pub = mqtt(broker4, client_id_on_shard(uniq.prefix("p"), 3, broker4.workers), version=5)
    for i in range(10):
        pub.publish(topic, str(i).encode(), qos=1)
    first = _gather([a, b], 10)
    assert sorted(int(m.payload) for _, m in first) == list(range(10))
    if leave == "unsubscribe":
        assert a.unsubscribe([shared]) == [0]
    else:
        a.disconnect()
    for i in range(10, 20):
        pub.publish(topic, str(i).encode(), qos=1)
    rest = b.recv_publishes(10, timeout=10)
    assert sorted(int(m.payload) for m in rest) == list(range(10, 20))
    assert_no_publish(b, 0.3)


def test_shared_subscription_gets_no_retained_messages(broker4, mqtt, uniq):
    topic = uniq.topic()
    pub = mqtt(broker4, uniq.cid("p"), version=5)
    pub.publish(topic, b"retained", qos=1, retain=True)
    (m,) = _members(broker4, mqtt, uniq, f"$share/g{uniq.cid()}/{topic}", shards=(2,))
    assert_no_publish(m, 0.5)  # [MQTT-4.8.2] not sent on a new shared subscription


def test_shared_subscription_with_no_local_is_protocol_error(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("sn"), version=5)
    c.send(mb.subscribe(1, [(f"$share/g/{uniq.topic()}", mb.subopts(1, no_local=True))], version=5))
    assert_disconnected(c, 5, {mb.RC_PROTOCOL_ERROR})


def test_shared_subscription_qos_downgrade(broker4, mqtt, uniq):
    topic = uniq.topic()
    (m,) = _members(broker4, mqtt, uniq, f"$share/g{uniq.cid()}/{topic}", shards=(0,), qos=0)
    pub = mqtt(broker4, uniq.cid("p"), version=5)
    pub.publish(topic, b"q2", qos=2)
    msg = m.recv_publish()
    assert (msg.payload, msg.qos) == (b"q2", 0)
