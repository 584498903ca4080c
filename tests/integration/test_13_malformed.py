"""Malformed and illegal packets.

Each bad packet must get the spec's reaction: 3.1.1 close; 5.0 DISCONNECT with a reason
code the spec allows for that fault, then close. A bystander publisher and subscriber,
connected before the bad client, must keep working afterwards.
"""

from __future__ import annotations

import mqttbytes as mb
import pytest
from conftest import TARGET, assert_disconnected, check_bystanders

MAL = mb.RC_MALFORMED_PACKET
PROTO = mb.RC_PROTOCOL_ERROR
TOPIC_NAME_INVALID = mb.RC_TOPIC_NAME_INVALID


def _pub_body(topic: bytes, version: int, pid: bytes = b"", props: bytes = b"", payload: bytes = b"x") -> bytes:
    return mb.mqtt_str(topic) + pid + (mb.props_block(props) if version == 5 else b"") + payload


def _v5only(fn):
    fn.v5_only = True
    return fn


# name -> (builder(version) -> bytes, allowed 5.0 DISCONNECT reasons)
CASES = {
    # reserved fixed-header flag bits [MQTT-2.2.2-2]
    "subscribe_flags_0000": (lambda v: mb.subscribe(1, [("a/b", 0)], version=v, flags=0), {MAL}),
    "subscribe_flags_0011": (lambda v: mb.subscribe(1, [("a/b", 0)], version=v, flags=3), {MAL}),
    "unsubscribe_flags_0000": (lambda v: mb.unsubscribe(1, ["a/b"], version=v, flags=0), {MAL}),
    "pubrel_flags_0000": (lambda v: mb.fixed(mb.PUBREL, 0, mb.u16(1)), {MAL}),
    "pingreq_flags_0001": (lambda v: mb.fixed(mb.PINGREQ, 1, b""), {MAL}),
    "puback_flags_0010": (lambda v: mb.fixed(mb.PUBACK, 2, mb.u16(1)), {MAL}),
    # PUBLISH with QoS 3 [MQTT-3.3.1-4]
    "publish_qos3": (lambda v: mb.fixed(mb.PUBLISH, 0b0110, _pub_body(b"a/b", v, mb.u16(1))), {MAL}),
    # remaining length of 5 bytes
    "remaining_length_5_bytes": (lambda v: b"\x30\xff\xff\xff\xff\x01", {MAL}),
    # unknown / server-only packet types
    "packet_type_0": (lambda v: b"\x00\x00", {MAL, PROTO}),
    "connack_from_client": (lambda v: b"\x20\x02\x00\x00", {MAL, PROTO}),
    "suback_from_client": (lambda v: mb.fixed(mb.SUBACK, 0, mb.u16(1) + (b"\x00" if v != 5 else b"\x00\x00")), {MAL, PROTO}),
    "pingresp_from_client": (lambda v: b"\xd0\x00", {MAL, PROTO}),
    "pingreq_with_body": (lambda v: mb.fixed(mb.PINGREQ, 0, b"\x00"), {MAL}),
    # strings
    "topic_invalid_utf8": (lambda v: mb.publish(b"a/\xff\xfe", b"x", version=v), {MAL}),
    "topic_utf8_surrogate": (lambda v: mb.publish(b"a/\xed\xa0\x80", b"x", version=v), {MAL}),
    "topic_contains_nul": (lambda v: mb.publish(b"a/\x00b", b"x", version=v), {MAL}),
    "topic_length_beyond_packet": (lambda v: mb.fixed(mb.PUBLISH, 0, b"\x00\x10ab"), {MAL}),
    # topic names
    "publish_topic_plus": (lambda v: mb.publish("a/+/b", b"x", version=v), {MAL, PROTO, TOPIC_NAME_INVALID}),
    "publish_topic_hash": (lambda v: mb.publish("a/#", b"x", version=v), {MAL, PROTO, TOPIC_NAME_INVALID}),
    "publish_topic_empty": (lambda v: mb.publish("", b"x", version=v), {MAL, PROTO, TOPIC_NAME_INVALID}),
    # packet identifiers [MQTT-2.3.1-1]
    "publish_qos1_pid0": (lambda v: mb.publish("a/b", b"x", qos=1, pid=0, version=v), {MAL, PROTO}),
    "publish_qos2_pid0": (lambda v: mb.publish("a/b", b"x", qos=2, pid=0, version=v), {MAL, PROTO}),
    "subscribe_pid0": (lambda v: mb.subscribe(0, [("a/b", 0)], version=v), {MAL, PROTO}),
    "unsubscribe_pid0": (lambda v: mb.unsubscribe(0, ["a/b"], version=v), {MAL, PROTO}),
    # SUBSCRIBE / UNSUBSCRIBE payloads [MQTT-3.8.3-3], [MQTT-3.10.3-2]
    "subscribe_no_topics": (lambda v: mb.subscribe(1, [], version=v), {MAL, PROTO}),
    "unsubscribe_no_topics": (lambda v: mb.unsubscribe(1, [], version=v), {MAL, PROTO}),
    "subscribe_qos3": (lambda v: mb.subscribe(1, [("a/b", 3)], version=v), {MAL, PROTO}),
    "subscribe_reserved_option_bits": (lambda v: mb.subscribe(1, [("a/b", 0xC1)], version=v), {MAL}),
    "subscribe_filter_invalid_utf8": (lambda v: mb.subscribe(1, [(b"a/\xc3", 0)], version=v), {MAL}),
    "subscribe_missing_options_byte": (lambda v: mb.fixed(mb.SUBSCRIBE, 2, mb.u16(1) + (b"\x00" if v == 5 else b"") + mb.mqtt_str("a/b")), {MAL, PROTO}),
    # 5.0 properties
    "v5_unknown_property": (_v5only(lambda v: mb.publish("a/b", b"x", version=5, props=b"\x7f\x00")), {MAL, PROTO}),
    "v5_property_not_for_publish": (_v5only(lambda v: mb.publish("a/b", b"x", version=5, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 5))), {MAL, PROTO}),
    "v5_duplicate_property": (_v5only(lambda v: mb.publish("a/b", b"x", version=5, props=mb.prop_u8(1, 1) + mb.prop_u8(1, 1))), {MAL, PROTO}),
    "v5_property_length_overrun": (_v5only(lambda v: mb.fixed(mb.PUBLISH, 0, mb.mqtt_str("a/b") + b"\x0a\x01\x01")), {MAL}),
    "v5_user_property_invalid_utf8": (_v5only(lambda v: mb.publish("a/b", b"x", version=5, props=mb.prop_pair(mb.USER_PROPERTY, b"\xff", "v"))), {MAL}),
    "v5_subscription_identifier_zero": (_v5only(lambda v: mb.subscribe(1, [("a/b", 0)], version=5, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 0))), {MAL, PROTO}),
    "v5_two_subscription_identifiers": (_v5only(lambda v: mb.subscribe(1, [("a/b", 0)], version=5, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 1) + mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 2))), {MAL, PROTO}),
    "v5_subscription_identifier_in_publish": (_v5only(lambda v: mb.publish("a/b", b"x", version=5, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 3))), {MAL, PROTO}),
    "v5_retain_handling_3": (_v5only(lambda v: mb.subscribe(1, [("a/b", 0x30)], version=5)), {MAL, PROTO}),
    "v5_auth_without_method": (_v5only(lambda v: mb.auth(0x18)), {PROTO, mb.RC_BAD_AUTHENTICATION_METHOD}),
}


def _params():
    for name, (build, reasons) in CASES.items():
        versions = [5] if getattr(build, "v5_only", False) else [4, 5]
        for v in versions:
            yield pytest.param(name, v, id=f"{name}-v{v}")


@pytest.mark.parametrize("case, version", list(_params()))
def test_malformed_packet(broker, mqtt, uniq, case, version):
    build, reasons = CASES[case]
    topic = uniq.topic("bystander")
    sub = mqtt(broker, uniq.cid("bs"), version=version)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("bp"), version=version)
    bad = mqtt(broker, uniq.cid("bad"), version=version)
    bad.try_send(build(version))
    assert_disconnected(bad, version, reasons)
    # the others are untouched
    pub.publish(topic, b"after " + case.encode(), qos=1)
    msg = sub.recv_publish()
    assert msg.payload == b"after " + case.encode()
    sub.ping()


def test_malformed_packet_split_across_writes(broker, mqtt, uniq):
    """The codec must not depend on packet boundaries matching TCP reads."""
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    data = mb.publish(topic, b"split", qos=1, pid=3) + mb.pingreq()
    for i in range(len(data)):
        pub.send(data[i:i + 1])
    assert pub.expect(mb.PUBACK)[2] == b"\x00\x03"
    pub.expect(mb.PINGRESP)
    assert sub.recv_publish().payload == b"split"


def test_valid_then_malformed_in_one_write(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=4)
    sub.subscribe(topic, 1)
    bad = mqtt(broker, uniq.cid("b"), version=4)
    bad.send(mb.publish(topic, b"good first", qos=1, pid=1) + b"\x36\x05\x00\x01a\x00\x01")
    assert_disconnected(bad, 4)
    assert sub.recv_publish().payload == b"good first"


# -- invalid topic filters: refuse the subscription or disconnect -------------------------


@pytest.mark.parametrize("flt", ["a/#/b", "a#", "a/b#", "a+/b", "a/+b", "#/a", ""])
@pytest.mark.parametrize("version", [4, 5])
def test_invalid_topic_filter(broker, mqtt, uniq, flt, version):
    c = mqtt(broker, uniq.cid("f"), version=version)
    c.send(mb.subscribe(9, [(flt, 1)], version=version))
    try:
        pkt = c.recv_packet(3)
    except mb.ConnectionClosed:  # closed without a word: fine for 3.1.1 only
        assert version != 5 or TARGET != "shardbroker", "5.0: expected SUBACK or DISCONNECT"
        pkt = None
        c.closed = True
    if c.closed:
        pass
    elif pkt is not None and pkt[0] == mb.SUBACK:
        ack = mb.parse_suback(pkt[2], version)
        assert ack.pid == 9
        if version == 5:
            assert ack.codes[0] in (0x80, 0x83, mb.RC_TOPIC_FILTER_INVALID), hex(ack.codes[0])
        else:
            assert ack.codes == [0x80]
        c.ping()
    else:
        if pkt is not None:
            c._pending.appendleft(pkt)
        assert_disconnected(c, version, {MAL, PROTO, mb.RC_TOPIC_FILTER_INVALID})
    check_bystanders(broker, mqtt, uniq, version)


# -- malformed CONNECT ---------------------------------------------------------------------------


def _connect_cases():
    will = mb.mqtt_str("w/t") + mb.mqtt_bin(b"p")
    return {
        "reserved_flag_bit": (4, mb.connect("rf", version=4, flags_override=0x03)),
        "reserved_flag_bit_v5": (5, mb.connect("rf5", version=5, flags_override=0x03)),
        "will_qos_without_will_flag": (4, mb.connect("wq", version=4, flags_override=0x0A)),
        "will_retain_without_will_flag": (4, mb.connect("wr", version=4, flags_override=0x22)),
        "will_qos_3": (4, mb.fixed(mb.CONNECT, 0, mb.mqtt_str("MQTT") + bytes([4, 0x1E]) + mb.u16(60)
                                   + mb.mqtt_str("wq3") + will)),
        "password_without_username_v311": (4, mb.connect("pw", version=4, password=b"x", flags_override=0x42)),
        "client_id_invalid_utf8": (4, mb.connect(b"\xff\xfe", version=4)),
        "client_id_invalid_utf8_v5": (5, mb.connect(b"\xff\xfe", version=5)),
        "truncated_payload": (4, mb.fixed(mb.CONNECT, 0, mb.mqtt_str("MQTT") + bytes([4, 2]) + mb.u16(60) + b"\x00\x05ab")),
        "connect_flags_in_fixed_header": (4, b"\x11" + mb.connect("ff", version=4)[1:]),
        "v5_receive_maximum_zero": (5, mb.connect("rm0", version=5, props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 0))),
        "v5_maximum_packet_size_zero": (5, mb.connect("mp0", version=5, props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 0))),
        "v5_unknown_property": (5, mb.connect("up", version=5, props=b"\x7f\x01")),
        "v5_will_property_not_allowed": (5, mb.connect("wp", version=5, will=mb.Will("w/t", b"p", props=mb.prop_u16(mb.TOPIC_ALIAS, 1)))),
        "v5_will_topic_wildcard": (5, mb.connect("wt", version=5, will=mb.Will("w/#", b"p"))),
    }


@pytest.mark.parametrize("case", list(_connect_cases()))
def test_malformed_connect(broker, mqtt, uniq, case):
    version, data = _connect_cases()[case]
    c = mqtt.raw(broker)
    c.send(data)
    assert c.expect_closed(3), f"server kept a connection after a bad CONNECT ({case})"
    connacks = [mb.parse_connack(p[2], version) for p in c.before_close if p[0] == mb.CONNACK]
    others = [mb.describe(p) for p in c.before_close if p[0] != mb.CONNACK]
    assert not others, f"unexpected packets: {others}"
    for ack in connacks:
        if version == 5:
            assert ack.rc >= 0x80, f"bad CONNECT accepted: {ack}"
        else:
            assert ack.rc != 0, f"bad CONNECT accepted: {ack}"
    check_bystanders(broker, mqtt, uniq, 4)


def test_wrong_protocol_name_refused(broker, mqtt):
    c = mqtt.raw(broker)
    c.send(mb.connect("pn", version=4, protocol_name="MQTX"))
    assert c.expect_closed(3)
    assert all(p[0] == mb.CONNACK and p[2][1] != 0 for p in c.before_close)


def test_many_bad_clients_do_not_hurt_good_ones(broker, mqtt, uniq):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=5)
    bads = [mqtt(broker, uniq.cid("bad"), version=4 + i % 2) for i in range(20)]
    kinds = ["publish_qos3", "remaining_length_5_bytes", "packet_type_0", "subscribe_flags_0000",
             "topic_invalid_utf8", "subscribe_no_topics", "publish_qos1_pid0"]
    for i, b in enumerate(bads):
        b.try_send(CASES[kinds[i % len(kinds)]][0](b.version))
        pub.publish(topic, str(i).encode(), qos=1)
    for b in bads:
        assert b.expect_closed(3)
    assert [int(m.payload) for m in sub.recv_publishes(20)] == list(range(20))
