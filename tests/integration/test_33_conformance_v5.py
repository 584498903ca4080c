"""MQTT 5.0 conformance, statement by statement.

One test per normative statement a Server must keep (or a Client statement whose violation
the Server must answer), in the order of the specification's conformance list (chapter 7 /
appendix B), each named after its statement and quoting it. Raw bytes from ``mqttbytes``
against a real broker with two workers shared by the module (and a second one for the
limits a default broker does not have). ``docs/CONFORMANCE.md`` maps each statement to its
test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mqttbytes as mb
import pytest
from conftest import Broker, Clients, Uniq, _checked, assert_disconnected, skip_unless_shardbroker

V = 5
Make = Callable[..., Broker]
MAL, PROTO = mb.RC_MALFORMED_PACKET, mb.RC_PROTOCOL_ERROR

CONFIG = """
[acl]
deny_publish = ["denied/#"]
"""
LIMITED = """
[limits]
retain_available = false
max_packet_size = 1024
topic_alias_maximum = 2
receive_maximum = 2
"""


@pytest.fixture(scope="module")
def _conf_broker(make_module_broker: Make) -> Broker:
    return make_module_broker(workers=2, config=CONFIG, name="conformance5")


@pytest.fixture(scope="module")
def _limited_broker(make_module_broker: Make) -> Broker:
    return make_module_broker(workers=1, config=LIMITED, name="conformance5limited")


@pytest.fixture
def b(_conf_broker: Broker) -> Iterator[Broker]:
    yield from _checked(_conf_broker)


@pytest.fixture
def lim(_limited_broker: Broker) -> Iterator[Broker]:
    yield from _checked(_limited_broker)


def disconnected(c: mb.RawClient, *reasons: int, timeout: float = 3.0) -> int | None:
    """5.0: DISCONNECT with one of ``reasons`` (a reason string may come with it), then close."""
    return assert_disconnected(c, V, set(reasons), timeout=timeout)


def refused(b: Broker, mqtt: Clients, data: bytes, *codes: int) -> list[mb.ConnAck]:
    """A CONNECT the server must refuse: at most a CONNACK >= 0x80 (one of ``codes`` if
    given), then the close. Never a DISCONNECT [MQTT-3.14.0-1]."""
    c = mqtt.raw(b)
    c.send(data)
    assert c.expect_closed(3), "server kept the connection after a refused CONNECT"
    acks = []
    for t, _, body in c.before_close:
        assert t == mb.CONNACK, f"only a CONNACK may come before the close: {mb.describe((t, 0, body))}"
        ack = mb.parse_connack(body, V)
        assert ack.rc >= 0x80 and not ack.session_present, ack
        if codes:
            assert ack.rc in codes, f"CONNACK 0x{ack.rc:02X}, expected {[hex(x) for x in codes]}"
        acks.append(ack)
    return acks


def body_connect(flags: int, payload: bytes, props: bytes = b"", level: int = 5,
                 name: bytes = b"MQTT") -> bytes:
    return mb.fixed(mb.CONNECT, 0, mb.mqtt_str(name) + bytes([level, flags]) + mb.u16(60)
                    + mb.props_block(props) + payload)


def quiet(c: mb.RawClient, timeout: float = 0.4) -> None:
    pkt = c.no_packet(timeout)
    assert pkt is None, f"expected nothing, got {mb.describe(pkt)}"


def client(mqtt: Clients, b: Broker, uniq: Uniq, **kw: object) -> mb.RawClient:
    return mqtt(b, uniq.cid("c"), version=V, **kw)


def sub(mqtt: Clients, b: Broker, uniq: Uniq, topic: str, qos: int = 1, **kw: object) -> mb.RawClient:
    c = client(mqtt, b, uniq, **kw)
    c.subscribe(topic, qos)
    return c


def send_bad(mqtt: Clients, b: Broker, uniq: Uniq, data: bytes, *reasons: int) -> None:
    c = client(mqtt, b, uniq)
    c.try_send(data)
    disconnected(c, *reasons)


SESSION_60 = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 60)


# -- 1.5 data representation ------------------------------------------------------------------


def test_MQTT_1_5_4_1_ill_formed_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.4-1] The character data in a UTF-8 Encoded String MUST be well-formed UTF-8
    ... In particular, the character data MUST NOT include encodings of code points between
    U+D800 and U+DFFF. (A receiver of ill-formed UTF-8: Malformed Packet, 4.13.)"""
    for topic in (b"a/\xff", b"a/\xed\xa0\x80", b"a/\xc0\xaf"):
        send_bad(mqtt, b, uniq, mb.publish(topic, b"x", version=V), MAL)


def test_MQTT_1_5_4_2_null_character(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.4-2] A UTF-8 Encoded String MUST NOT include an encoding of the null
    character U+0000."""
    send_bad(mqtt, b, uniq, mb.publish(b"a/\x00", b"x", version=V), MAL)
    send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", version=V, props=mb.prop_str(mb.CONTENT_TYPE, b"t\x00")), MAL)


def test_MQTT_1_5_4_3_bom_not_stripped(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.4-3] A UTF-8 encoded sequence 0xEF 0xBB 0xBF is always interpreted as U+FEFF
    ("ZERO WIDTH NO-BREAK SPACE") wherever it appears in a string and MUST NOT be skipped over
    or stripped off by a packet receiver."""
    plain = uniq.topic()
    s = sub(mqtt, b, uniq, "\ufeff" + plain)
    other = sub(mqtt, b, uniq, plain)
    client(mqtt, b, uniq).publish("\ufeff" + plain, b"bom", qos=1)
    assert s.recv_publish().topic == "\ufeff" + plain
    quiet(other)


def test_MQTT_1_5_5_1_variable_byte_integer_minimal(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.5-1] The encoded value MUST use the minimum number of bytes necessary to
    represent the value."""
    send_bad(mqtt, b, uniq, b"\xc0\x80\x00", MAL)


def test_MQTT_1_5_7_1_string_pair_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.7-1] Both strings [of a UTF-8 String Pair] MUST comply with the requirements
    for UTF-8 Encoded Strings."""
    for k, v in ((b"\xff", b"v"), (b"k", b"\xed\xb0\x80")):
        send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", version=V, props=mb.prop_pair(mb.USER_PROPERTY, k, v)), MAL)


# -- 2 packet format ----------------------------------------------------------------------------


def test_MQTT_2_1_3_1_reserved_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.1.3-1] Where a flag bit is marked as "Reserved" it is reserved for future use
    and MUST be set to the value listed. (Otherwise: Malformed Packet.)"""
    for bad in (mb.fixed(mb.PUBREL, 0, mb.u16(1)), mb.fixed(mb.PINGREQ, 1, b""),
                mb.subscribe(1, [("a/b", 0)], version=V, flags=0),
                mb.unsubscribe(1, ["a/b"], version=V, flags=3), mb.fixed(mb.PUBACK, 1, mb.u16(1))):
        send_bad(mqtt, b, uniq, bad, MAL)


def test_MQTT_2_2_1_2_qos0_publish_without_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.1-2] A PUBLISH packet MUST NOT contain a Packet Identifier if its QoS value is
    set to 0."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 0)
    client(mqtt, b, uniq).publish(topic, b"p", qos=1)
    assert s.expect(mb.PUBLISH) == (mb.PUBLISH, 0, mb.mqtt_str(topic) + b"\x00p")


def test_MQTT_2_2_1_3_client_identifier_zero(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.1-3] Each time a Client sends a new SUBSCRIBE, UNSUBSCRIBE, or PUBLISH (where
    QoS > 0) MQTT Control Packet it MUST assign it a non-zero Packet Identifier that is
    currently unused. (Zero: Malformed Packet or Protocol Error.)"""
    for bad in (mb.publish("a/b", b"x", qos=1, pid=0, version=V), mb.subscribe(0, [("a/b", 0)], version=V),
                mb.unsubscribe(0, ["a/b"], version=V)):
        send_bad(mqtt, b, uniq, bad, MAL, PROTO)


def test_MQTT_2_2_1_4_server_identifiers_nonzero_unused(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.1-4] Each time a Server sends a new PUBLISH (with QoS > 0) MQTT Control
    Packet it MUST assign it a non zero Packet Identifier that is currently unused."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    p = client(mqtt, b, uniq)
    for i in range(5):
        p.publish(topic, str(i), qos=1 + i % 2)
    pids = [m.pid for m in s.recv_publishes(5, ack=False)]
    assert all(pids) and len(set(pids)) == 5, pids


def test_MQTT_2_2_1_5_acks_same_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.1-5] A PUBACK, PUBREC, PUBREL, or PUBCOMP packet MUST contain the same Packet
    Identifier as the PUBLISH packet that was originally sent."""
    c = client(mqtt, b, uniq)
    c.send(mb.publish(uniq.topic(), b"1", qos=1, pid=0x1234, version=V))
    assert mb.parse_ack(c.expect(mb.PUBACK)[2], V).pid == 0x1234
    c.send(mb.publish(uniq.topic(), b"2", qos=2, pid=0xBEEF, version=V))
    assert mb.parse_ack(c.expect(mb.PUBREC)[2], V).pid == 0xBEEF
    c.send(mb.pubrel(0xBEEF, V))
    assert mb.parse_ack(c.expect(mb.PUBCOMP)[2], V).pid == 0xBEEF


def test_MQTT_2_2_1_6_suback_unsuback_same_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.1-6] A SUBACK and UNSUBACK MUST contain the Packet Identifier that was used in
    the corresponding SUBSCRIBE and UNSUBSCRIBE packet respectively."""
    c = client(mqtt, b, uniq)
    c.send(mb.subscribe(0x7777, [(uniq.topic(), 1)], version=V))
    assert mb.parse_suback(c.expect(mb.SUBACK)[2], V).pid == 0x7777
    c.send(mb.unsubscribe(0x8888, [uniq.topic()], version=V))
    assert mb.parse_unsuback(c.expect(mb.UNSUBACK)[2], V).pid == 0x8888


def test_MQTT_2_2_2_1_property_length_zero(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.2-1] If there are no properties, this MUST be indicated by including a
    Property Length of zero."""
    c = client(mqtt, b, uniq)
    c.send(mb.subscribe(3, [(uniq.topic(), 1)], version=V))
    assert c.expect(mb.SUBACK)[2] == b"\x00\x03\x00\x01"
    c.send(mb.unsubscribe(4, [uniq.topic()], version=V))
    assert c.expect(mb.UNSUBACK)[2] == b"\x00\x04\x00\x11"


# -- 3.1 CONNECT --------------------------------------------------------------------------------


def test_MQTT_3_1_0_1_first_packet_connect(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.0-1] After a Network Connection is established by a Client to a Server, the
    first packet sent from the Client to the Server MUST be a CONNECT packet."""
    for first in (mb.pingreq(), mb.publish("a/b", b"x", version=V), mb.auth(0x18)):
        c = mqtt.raw(b)
        c.send(first)
        assert c.expect_closed(3)
        assert all(p[0] == mb.CONNACK for p in c.before_close), c.before_close


def test_MQTT_3_1_0_2_second_connect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.0-2] The Server MUST process a second CONNECT packet sent from a Client as a
    Protocol Error and close the Network Connection."""
    cid = uniq.cid("c")
    c = mqtt(b, cid, version=V)
    c.try_send(mb.connect(cid, version=V))
    disconnected(c, PROTO)
    assert not any(p[0] == mb.CONNACK for p in c.before_close), "no second CONNACK [MQTT-3.2.0-2]"


def test_MQTT_3_1_2_1_protocol_name(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-1] The protocol name MUST be the UTF-8 String "MQTT". If the Server does
    not want to accept the CONNECT, and wishes to reveal that it is an MQTT Server it MAY send
    a CONNACK packet with Reason Code of 0x84 (Unsupported Protocol Version), and then it MUST
    close the Network Connection."""
    for name in (b"MQTX", b"mqtt", b"MQIsdp"):
        refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("n")), name=name), 0x84)


def test_MQTT_3_1_2_2_protocol_version(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-2] If the Protocol Version is not 5 and the Server does not want to accept
    the CONNECT packet, the Server MAY send a CONNACK packet with Reason Code 0x84 (Unsupported
    Protocol Version) and then MUST close the Network Connection."""
    for level in (6, 0x85):
        c = mqtt.raw(b)
        c.send(body_connect(0x02, mb.mqtt_str(uniq.cid("l")), level=level))
        assert c.expect_closed(3)
        # a client of an unknown version may not read a 5.0 CONNACK: 3.1.1's 0x01 is also fine
        assert [p[2][:2] for p in c.before_close] in ([], [b"\x00\x01"], [b"\x00\x84"]), c.before_close


def test_MQTT_3_1_2_3_reserved_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-3] The Server MUST validate that the reserved flag in the CONNECT packet is
    set to 0. (Otherwise: Malformed Packet.)"""
    refused(b, mqtt, mb.connect(uniq.cid("r"), version=V, flags_override=0x03), MAL)


def test_MQTT_3_1_2_4_clean_start_discards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-4] If a CONNECT packet is received with Clean Start is set to 1, the Client
    and Server MUST discard any existing Session and start a new Session."""
    cid, topic = uniq.cid("d"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(b, cid, version=V, clean=True, props=SESSION_60)
    assert not c2.connack.session_present  # type: ignore[attr-defined]
    client(mqtt, b, uniq).publish(topic, b"x", qos=1)
    quiet(c2)


def test_MQTT_3_1_2_5_clean_start_0_resumes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-5] If a CONNECT packet is received with Clean Start set to 0 and there is a
    Session associated with the Client Identifier, the Server MUST resume communications with
    the Client based on state from the existing Session."""
    cid, topic = uniq.cid("r"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    c.subscribe(topic, 1)
    c.disconnect()
    client(mqtt, b, uniq).publish(topic, b"queued", qos=1)
    c2 = mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    assert c2.connack.session_present  # type: ignore[attr-defined]
    assert c2.recv_publish().payload == b"queued"


def test_MQTT_3_1_2_6_clean_start_0_new_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-6] If a CONNECT packet is received with Clean Start set to 0 and there is no
    Session associated with the Client Identifier, the Server MUST create a new Session."""
    cid = uniq.cid("n")
    c = mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    assert not c.connack.session_present  # type: ignore[attr-defined]
    c.subscribe(uniq.topic(), 1)
    c.disconnect()
    assert mqtt(b, cid, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def _will(b: Broker, mqtt: Clients, uniq: Uniq, topic: str, retain: bool = False,
          props: bytes = b"", connect_props: bytes = b"", cid: str | None = None) -> mb.RawClient:
    return mqtt(b, cid or uniq.cid("w"), version=V, props=connect_props,
                will=mb.Will(topic, b"will", qos=1, retain=retain, props=props))


def test_MQTT_3_1_2_7_will_stored(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-7] If the Will Flag is set to 1 this indicates that, a Will Message MUST be
    stored on the Server and associated with the Session."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic).abort()
    assert s.recv_publish().payload == b"will"


def test_MQTT_3_1_2_8_will_after_delay(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed and either the Will Delay Interval has elapsed or the Session ends,
    unless the Will Message has been deleted by the Server on receipt of a DISCONNECT packet
    with Reason Code 0x00 (Normal disconnection) or a new Network Connection for the ClientID
    is opened before the Will Delay Interval has elapsed."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, 1),
          connect_props=SESSION_60).abort()
    quiet(s, 0.5)
    assert s.recv_publish(timeout=4).payload == b"will"
    _will(b, mqtt, uniq, topic, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, 30)).abort()
    assert s.recv_publish(timeout=4).payload == b"will", "the session ended first"


def test_MQTT_3_1_2_9_will_fields_present(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-9] If the Will Flag is set to 1, the Will Properties, Will Topic, and Will
    Payload fields MUST be present in the Payload."""
    refused(b, mqtt, body_connect(0x06, mb.mqtt_str(uniq.cid("w"))))
    refused(b, mqtt, body_connect(0x06, mb.mqtt_str(uniq.cid("w")) + b"\x00" + mb.mqtt_str("w/t")))


def test_MQTT_3_1_2_10_will_removed_on_normal_disconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-10] The Will Message MUST be removed from the stored Session State in the
    Server once it has been published or the Server has received a DISCONNECT packet with a
    Reason Code of 0x00 (Normal disconnection) from the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    cid = uniq.cid("w")
    _will(b, mqtt, uniq, topic, connect_props=SESSION_60, cid=cid).disconnect(0)
    mqtt(b, cid, version=V, clean=False, props=SESSION_60).abort()
    quiet(s, 0.8)


def test_MQTT_3_1_2_11_will_qos_0_without_will(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-11] If the Will Flag is set to 0, then the Will QoS MUST be set to 0
    (0x00)."""
    refused(b, mqtt, mb.connect(uniq.cid("q"), version=V, flags_override=0x0A), MAL, PROTO)


def test_MQTT_3_1_2_12_will_qos_3(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-12] If the Will Flag is set to 1, the value of Will QoS can be 0 (0x00), 1
    (0x01), or 2 (0x02). (3: Malformed Packet.)"""
    will = b"\x00" + mb.mqtt_str("w/t") + mb.mqtt_bin(b"p")
    refused(b, mqtt, body_connect(0x1E, mb.mqtt_str(uniq.cid("q")) + will), MAL, PROTO)


def test_MQTT_3_1_2_13_will_retain_0_without_will(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-13] If the Will Flag is set to 0, then Will Retain MUST be set to 0."""
    refused(b, mqtt, mb.connect(uniq.cid("r"), version=V, flags_override=0x22), MAL, PROTO)


def test_MQTT_3_1_2_14_will_not_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-14] If the Will Flag is set to 1 and Will Retain is set to 0, the Server
    MUST publish the Will Message as a non-retained message."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic).abort()
    s.recv_publish()
    quiet(sub(mqtt, b, uniq, topic))


def test_MQTT_3_1_2_15_will_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-15] If the Will Flag is set to 1 and Will Retain is set to 1, the Server
    MUST publish the Will Message as a retained message."""
    topic = uniq.topic()
    _will(b, mqtt, uniq, topic, retain=True).abort()
    msg = sub(mqtt, b, uniq, topic).recv_publish()
    assert msg.retain and msg.payload == b"will"


def test_MQTT_3_1_2_16_no_user_name_without_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-16] If the User Name Flag is set to 0, a User Name MUST NOT be present in
    the Payload."""
    refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("u")) + mb.mqtt_str("user")), MAL, PROTO)


def test_MQTT_3_1_2_17_user_name_with_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-17] If the User Name Flag is set to 1, a User Name MUST be present in the
    Payload."""
    refused(b, mqtt, body_connect(0x82, mb.mqtt_str(uniq.cid("u"))), MAL, PROTO)


def test_MQTT_3_1_2_18_no_password_without_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-18] If the Password Flag is set to 0, a Password MUST NOT be present in the
    Payload."""
    refused(b, mqtt, body_connect(0x82, mb.mqtt_str(uniq.cid("p")) + mb.mqtt_str("u") + mb.mqtt_bin(b"pw")), MAL, PROTO)


def test_MQTT_3_1_2_19_password_with_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-19] If the Password Flag is set to 1, a Password MUST be present in the
    Payload. (5.0 allows a Password without a User Name.)"""
    refused(b, mqtt, body_connect(0xC2, mb.mqtt_str(uniq.cid("p")) + mb.mqtt_str("u")), MAL, PROTO)
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("p"), version=V, password=b"pw"))
    assert mb.parse_connack(c.expect(mb.CONNACK)[2], V).rc in (0, 0x86, 0x87)


def test_MQTT_3_1_2_22_keep_alive(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-22] If the Keep Alive value is non-zero and the Server does not receive an
    MQTT Control Packet from the Client within one and a half times the Keep Alive time
    period, it MUST close the Network Connection to the Client as if the network had
    failed."""
    c = mqtt(b, uniq.cid("k"), version=V, keepalive=1)
    quiet(c, 1.0)
    disconnected(c, mb.RC_KEEP_ALIVE_TIMEOUT, timeout=3.0)


def test_MQTT_3_1_2_23_session_stored_with_expiry(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-23] The Client and Server MUST store the Session State after the Network
    Connection is closed if the Session Expiry Interval is greater than 0."""
    cid, topic = uniq.cid("e"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 1)
    c.abort()
    client(mqtt, b, uniq).publish(topic, b"kept", qos=1)
    c2 = mqtt(b, cid, version=V, clean=False)
    assert c2.connack.session_present  # type: ignore[attr-defined]
    assert c2.recv_publish().payload == b"kept"
    cid0 = uniq.cid("z")
    mqtt(b, cid0, version=V).disconnect()
    assert not mqtt(b, cid0, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_3_1_2_24_connack_within_the_client_maximum_packet_size(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.2-24] The Server MUST NOT send packets exceeding Maximum Packet Size to the
    Client."""
    c = mqtt.raw(b)
    c.send(mb.connect("mps-20", version=V, props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 20)))
    pkt = c.expect(mb.CONNACK)
    size = 2 + len(pkt[2]) if len(pkt[2]) < 128 else 3 + len(pkt[2])
    assert size <= 20, f"CONNACK of {size} bytes for a client whose maximum is 20: {pkt[2]!r}"
    assert mb.parse_connack(pkt[2], V).rc == 0  # what only describes the broker was left out
    # An empty client ID needs an Assigned Client Identifier [MQTT-3.2.2-16] that cannot fit in
    # 20 bytes: the CONNECT is refused with Packet too large, in a CONNACK that fits.
    e = mqtt.raw(b)
    e.send(mb.connect("", version=V, props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 20)))
    pkt = e.expect(mb.CONNACK)
    assert len(pkt[2]) + 2 <= 20 and mb.parse_connack(pkt[2], V).rc == mb.RC_PACKET_TOO_LARGE


def test_MQTT_3_1_2_25_too_large_discarded(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-25] Where a Packet is too large to send, the Server MUST discard it without
    sending it and then behave as if it had completed sending that Application Message."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 200))
    p = client(mqtt, b, uniq)
    p.publish(topic, b"x" * 500, qos=1)
    p.publish(topic, b"small", qos=1)
    msgs = s.drain_publishes(first_timeout=3)
    assert [m.payload for m in msgs] == [b"small"]


def test_MQTT_3_1_2_26_topic_alias_within_maximum(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-26] The Server MUST NOT send a Topic Alias in a PUBLISH packet to the Client
    greater than Topic Alias Maximum."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u16(mb.TOPIC_ALIAS_MAXIMUM, 1))
    p = client(mqtt, b, uniq)
    for _ in range(3):
        p.publish(topic, b"a", qos=1)
    for m in s.recv_publishes(3):
        assert m.props.get(mb.TOPIC_ALIAS, 1) <= 1


def test_MQTT_3_1_2_27_no_topic_alias_without_maximum(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-27] If Topic Alias Maximum is absent or zero, the Server MUST NOT send any
    Topic Aliases to the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    p = client(mqtt, b, uniq)
    for _ in range(3):
        p.publish(topic, b"a", qos=1)
    assert all(mb.TOPIC_ALIAS not in m.props and m.topic == topic for m in s.recv_publishes(3))


def test_MQTT_3_1_2_28_no_response_information_unless_asked(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-28] A value of 0 [Request Response Information] indicates that the Server
    MUST NOT return Response Information."""
    for props in (b"", mb.prop_u8(mb.REQUEST_RESPONSE_INFORMATION, 0)):
        ack = mqtt(b, uniq.cid("r"), version=V, props=props).connack  # type: ignore[attr-defined]
        assert mb.RESPONSE_INFORMATION not in ack.props


def test_MQTT_3_1_2_29_problem_information_0(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-29] If the value of Request Problem Information is 0, the Server MAY return
    a Reason String or User Properties on a CONNACK or DISCONNECT packet, but MUST NOT send a
    Reason String or User Properties on any packet other than PUBLISH, CONNACK, or
    DISCONNECT."""
    c = mqtt(b, uniq.cid("p"), version=V, props=mb.prop_u8(mb.REQUEST_PROBLEM_INFORMATION, 0))
    ack = c.publish("denied/x", b"no", qos=1)
    assert ack is not None and ack.reason == mb.RC_NOT_AUTHORIZED
    assert mb.REASON_STRING not in ack.props and mb.USER_PROPERTY not in ack.props
    c.send(mb.subscribe(1, [("a/#/b", 1), ("$share/g+/x", 1)], version=V))
    suback = mb.parse_suback(c.expect(mb.SUBACK)[2], V)
    assert not suback.props, suback


def test_MQTT_3_1_3_1_payload_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-1] The Payload of the CONNECT packet ... fields, if present, MUST appear in
    the order Client Identifier, Will Properties, Will Topic, Will Payload, User Name,
    Password."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    mqtt(b, uniq.cid("o"), version=V, will=mb.Will(topic, b"ordered", props=mb.prop_u8(1, 1)),
         username="u", password=b"p").abort()
    assert s.recv_publish().payload == b"ordered"


def test_MQTT_3_1_3_2_client_id_identifies_state(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-2] The ClientID MUST be used by Clients and by Servers to identify state
    that they hold relating to this MQTT Session between the Client and the Server."""
    cid = uniq.cid("i")
    mqtt(b, cid, version=V, props=SESSION_60).disconnect()
    assert not mqtt(b, uniq.cid("o"), version=V, clean=False).connack.session_present  # type: ignore[attr-defined]
    assert mqtt(b, cid, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_3_1_3_3_client_id_present(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-3] The ClientID MUST be present and is the first field in the CONNECT packet
    Payload."""
    refused(b, mqtt, body_connect(0x02, b""))


def test_MQTT_3_1_3_4_client_id_utf8(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-4] The ClientID MUST be a UTF-8 Encoded String."""
    refused(b, mqtt, mb.connect(b"\xff\xfe", version=V), MAL, 0x85)


def test_MQTT_3_1_3_5_client_ids_allowed(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-5] The Server MUST allow ClientID's which are between 1 and 23 UTF-8
    encoded bytes in length, and that contain only the characters
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"."""
    chars = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for cid in ("5", chars[:23], chars[39:]):
        mqtt(b, cid, version=V).disconnect()


def test_MQTT_3_1_3_6_and_7_assigned_client_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-6] A Server MAY allow a Client to supply a ClientID that has a length of
    zero bytes, however if it does so the Server MUST treat this as a special case and assign
    a unique ClientID to that Client. [MQTT-3.1.3-7] It MUST then process the CONNECT packet
    as if the Client had provided that unique ClientID, and MUST return the Assigned Client
    Identifier in the CONNACK packet."""
    a = mqtt(b, "", version=V).connack.props[mb.ASSIGNED_CLIENT_IDENTIFIER]  # type: ignore[attr-defined]
    c2 = mqtt(b, "", version=V, props=SESSION_60)
    bb = c2.connack.props[mb.ASSIGNED_CLIENT_IDENTIFIER]  # type: ignore[attr-defined]
    assert a and bb and a != bb
    c2.subscribe(uniq.topic(), 1)
    c2.disconnect()
    assert mqtt(b, bb, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_3_1_3_8_rejected_client_id(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-8] If the Server rejects the ClientID it MAY respond to the CONNECT packet
    with a CONNACK using Reason Code 0x85 (Client Identifier not valid) as described in section
    4.13 Handling errors, and then it MUST close the Network Connection."""
    refused(b, mqtt, mb.connect("x" * 2000, version=V), 0x85)


def test_MQTT_3_1_3_9_no_will_when_reconnected_in_time(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-9] If a new Network Connection to this Session is made before the Will Delay
    Interval has passed, the Server MUST NOT send the Will Message."""
    topic, cid = uniq.topic(), uniq.cid("w")
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, 2),
          connect_props=SESSION_60, cid=cid).abort()
    mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    quiet(s, 3.0)


def test_MQTT_3_1_3_10_will_user_properties_in_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-10] The Server MUST maintain the order of User Properties when publishing
    the Will Message."""
    topic = uniq.topic()
    pairs = [("z", "1"), ("a", "2"), ("z", "0")]
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic, props=mb.user_props(pairs)).abort()
    assert s.recv_publish().props[mb.USER_PROPERTY] == pairs


def test_MQTT_3_1_3_11_will_topic_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-11] The Will Topic MUST be a UTF-8 Encoded String."""
    refused(b, mqtt, mb.connect(uniq.cid("w"), version=V, will=mb.Will(b"w/\xff", b"p")), MAL)


def test_MQTT_3_1_3_12_user_name_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-12] If the User Name Flag is set to 1, the User Name is the next field in
    the Payload. The User Name MUST be a UTF-8 Encoded String."""
    refused(b, mqtt, mb.connect(uniq.cid("u"), version=V, username=b"\xc3\x28"), MAL)


def test_MQTT_3_1_4_1_connect_validated(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-1] The Server MUST validate that the CONNECT packet matches the format
    described in section 3.1 and close the Network Connection if it does not match."""
    refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("t")) + b"trailing"))
    refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("t")), props=b"\x7f\x01"), MAL, PROTO)
    refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("t")), props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 0)), MAL, PROTO)
    refused(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("t")), props=mb.prop_u16(mb.TOPIC_ALIAS, 1)), MAL, PROTO)


def test_MQTT_3_1_4_2_failed_authentication_closes(make_broker: Make, tmp_path: Path, mqtt: Clients,
                                                   uniq: Uniq) -> None:
    """[MQTT-3.1.4-2] The Server MAY check that the contents of the CONNECT packet meet any
    further restrictions and SHOULD perform authentication and authorization checks. If any of
    these checks fail, it MUST close the Network Connection. (Before closing, it MAY send a
    CONNACK with a Reason Code of 0x80 or greater: 0x86 for bad credentials, 0x87 for an
    anonymous client where none is allowed; nothing sent after the CONNECT is processed.)"""
    skip_unless_shardbroker("ShardBroker's password file")
    pw = tmp_path / "passwords"
    subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "passwd", str(pw), "alice", "--stdin",
                    "--iterations", "1000"], input="right\n", text=True, check=True, capture_output=True)
    nb = make_broker(workers=1, config=f'[auth]\npassword_file = "{pw}"\nallow_anonymous = false\n')
    topic = uniq.topic()
    for kw, code in (({"username": "alice", "password": b"wrong"}, mb.RC_BAD_USERNAME_OR_PASSWORD),
                     ({"username": "mallory", "password": b"x"}, mb.RC_BAD_USERNAME_OR_PASSWORD),
                     ({"username": "alice"}, mb.RC_BAD_USERNAME_OR_PASSWORD),
                     ({}, mb.RC_NOT_AUTHORIZED)):
        c = mqtt.raw(nb)
        c.send(mb.connect(uniq.cid("f"), version=V, **kw) + mb.publish(topic, b"no", retain=True, version=V))
        assert c.expect_closed(5), f"{kw}: still open"
        got = [(t, mb.parse_connack(body, V).rc) for t, _, body in c.before_close]
        assert got == [(mb.CONNACK, code)], f"{kw}: {got}"
    ok = mqtt(nb, uniq.cid("ok"), version=V, username="alice", password=b"right")
    ok.subscribe(topic, 1)
    quiet(ok)  # no refused client left a retained message


def test_MQTT_3_1_4_3_session_taken_over(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-3] If the ClientID represents a Client already connected to the Server, the
    Server sends a DISCONNECT packet to the existing Client with Reason Code of 0x8E (Session
    taken over) as described in section 4.13 and MUST close the Network Connection of the
    existing Client."""
    cid = uniq.cid("t")
    old = mqtt(b, cid, version=V)
    new = mqtt(b, cid, version=V)
    disconnected(old, mb.RC_SESSION_TAKEN_OVER)
    new.ping()


def test_MQTT_3_1_4_4_clean_start_processed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-4] The Server MUST perform the processing of Clean Start."""
    cid = uniq.cid("c")
    mqtt(b, cid, version=V, props=SESSION_60).disconnect()
    assert not mqtt(b, cid, version=V, clean=True).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_3_1_4_5_connack_success(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-5] The Server MUST acknowledge the CONNECT packet with a CONNACK packet
    containing a 0x00 (Success) Reason Code."""
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("a"), version=V))
    _t, flags, body = c.expect(mb.CONNACK)
    assert flags == 0 and body[:2] == b"\x00\x00"


def test_MQTT_3_1_4_6_nothing_processed_after_refusal(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-6] If the Server rejects the CONNECT, it MUST NOT process any data sent by
    the Client after the CONNECT packet except AUTH packets."""
    topic = uniq.topic()
    c = mqtt.raw(b)
    c.send(mb.connect("x" * 2000, version=V) + mb.publish(topic, b"no", retain=True, version=V))
    assert c.expect_closed(3)
    quiet(sub(mqtt, b, uniq, topic))


# -- 3.2 CONNACK -------------------------------------------------------------------------------


def test_MQTT_3_2_0_1_connack_first(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.0-1] The Server MUST send a CONNACK with a 0x00 (Success) Reason Code before
    sending any Packet other than AUTH."""
    cid, topic = uniq.cid("q"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 1)
    c.disconnect()
    client(mqtt, b, uniq).publish(topic, b"waiting", qos=1)
    c2 = mqtt.raw(b)
    c2.send(mb.connect(cid, version=V, clean=False))
    first = c2.recv_packet()
    assert first is not None and first[0] == mb.CONNACK


def test_MQTT_3_2_0_2_one_connack(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.0-2] The Server MUST NOT send more than one CONNACK in a Network
    Connection."""
    cid = uniq.cid("o")
    c = mqtt(b, cid, version=V)
    c.try_send(mb.connect(cid, version=V))
    c.expect_closed(3)
    assert not [p for p in c.before_close if p[0] == mb.CONNACK]


def test_MQTT_3_2_2_1_connack_flags_reserved(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-1] Byte 1 is the "Connect Acknowledge Flags". Bits 7-1 are reserved and
    MUST be set to 0."""
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("f"), version=V, clean=False, props=SESSION_60))
    assert c.expect(mb.CONNACK)[2][0] & 0xFE == 0


def test_MQTT_3_2_2_2_session_present_0_on_clean_start(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-2] If the Server accepts a connection with Clean Start set to 1, the Server
    MUST set Session Present to 0 in the CONNACK packet in addition to setting a 0x00
    (Success) Reason Code in the CONNACK packet."""
    cid = uniq.cid("s")
    mqtt(b, cid, version=V, props=SESSION_60).disconnect()
    ack = mqtt(b, cid, version=V, clean=True).connack  # type: ignore[attr-defined]
    assert (ack.session_present, ack.rc) == (False, 0)


def test_MQTT_3_2_2_3_session_present_reflects_state(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-3] If the Server accepts a connection with Clean Start set to 0 and the
    Server has Session State for the ClientID, it MUST set Session Present to 1 in the CONNACK
    packet, otherwise it MUST set Session Present to 0 in the CONNACK packet. In both cases it
    MUST set a 0x00 (Success) Reason Code in the CONNACK packet."""
    cid = uniq.cid("s")
    first = mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    assert (first.connack.session_present, first.connack.rc) == (False, 0)  # type: ignore[attr-defined]
    first.disconnect()
    ack = mqtt(b, cid, version=V, clean=False).connack  # type: ignore[attr-defined]
    assert (ack.session_present, ack.rc) == (True, 0)


def test_MQTT_3_2_2_6_session_present_0_on_refusal(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.2.2-6] If a Server sends a CONNACK packet containing a non-zero Reason Code it
    MUST set Session Present to 0."""
    assert refused(b, mqtt, mb.connect("x" * 2000, version=V, clean=False), 0x85)


def test_MQTT_3_2_2_7_refusal_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-7] If a Server sends a CONNACK packet containing a Reason code of 0x80 or
    greater it MUST then close the Network Connection."""
    assert len(refused(b, mqtt, mb.connect("x" * 2000, version=V))) == 1


def test_MQTT_3_2_2_8_connect_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-8] The Server sending the CONNACK packet MUST use one of the Connect Reason
    Code values."""
    allowed = {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C,
               0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
    for data in (mb.connect("x" * 2000, version=V), mb.connect(uniq.cid("f"), version=V, flags_override=0x01),
                 mb.connect(uniq.cid("w"), version=V, will=mb.Will("denied/w", b"p"))):
        for ack in refused(b, mqtt, data):
            assert ack.rc in allowed, hex(ack.rc)


def test_MQTT_3_2_2_10_subscribe_any_qos_accepted(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-10] A Server that does not support QoS 1 or QoS 2 PUBLISH packets MUST still
    accept SUBSCRIBE packets containing a Requested QoS of 0, 1 or 2."""
    maxqos = client(mqtt, b, uniq).connack.props.get(mb.MAXIMUM_QOS, 2)  # type: ignore[attr-defined]
    codes = client(mqtt, b, uniq).subscribe([(uniq.topic(), 0), (uniq.topic(), 1), (uniq.topic(), 2)])
    assert codes == [0, min(1, maxqos), min(2, maxqos)]


def test_MQTT_3_2_2_13_will_retain_without_retain_support(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-13] If a Server receives a CONNECT packet containing a Will Message with the
    Will Retain set to 1, and it does not support retained messages, the Server MUST reject
    the connection request. It SHOULD send CONNACK with Reason Code 0x9A (Retain not
    supported) and then it MUST close the Network Connection."""
    assert client(mqtt, lim, uniq).connack.props.get(mb.RETAIN_AVAILABLE) == 0  # type: ignore[attr-defined]
    refused(lim, mqtt, mb.connect(uniq.cid("w"), version=V, will=mb.Will("w/t", b"p", retain=True)), 0x9A)


def test_MQTT_3_2_2_14_retained_publish_without_retain_support(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-14] A Client receiving Retain Available set to 0 from the Server MUST NOT
    send a PUBLISH packet with the RETAIN flag set to 1. (Server: DISCONNECT 0x9A.)"""
    c = client(mqtt, lim, uniq)
    c.try_send(mb.publish(uniq.topic(), b"r", retain=True, version=V))
    disconnected(c, 0x9A)


def test_MQTT_3_2_2_15_client_exceeds_maximum_packet_size(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-15] The Client MUST NOT send packets exceeding Maximum Packet Size to the
    Server. (Server: DISCONNECT 0x95 Packet too large.)"""
    c = client(mqtt, lim, uniq)
    assert c.connack.props.get(mb.MAXIMUM_PACKET_SIZE) == 1024  # type: ignore[attr-defined]
    c.try_send(mb.publish(uniq.topic(), b"x" * 1100, version=V))
    disconnected(c, mb.RC_PACKET_TOO_LARGE)


def test_MQTT_3_2_2_16_assigned_id_unused(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.2.2-16] If the Client connects using a zero length Client Identifier, the Server
    MUST respond with a CONNACK containing an Assigned Client Identifier. The Assigned Client
    Identifier MUST be a new Client Identifier not used by any other Session currently in the
    Server."""
    ids = {mqtt(b, "", version=V).connack.props[mb.ASSIGNED_CLIENT_IDENTIFIER] for _ in range(5)}  # type: ignore[attr-defined]
    assert len(ids) == 5


def test_MQTT_3_2_2_17_topic_alias_above_maximum(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-17] The Client MUST NOT send a Topic Alias in a PUBLISH packet to the Server
    greater than this value. (Server: DISCONNECT 0x94 Topic Alias invalid.)"""
    c = client(mqtt, lim, uniq)
    assert c.connack.props.get(mb.TOPIC_ALIAS_MAXIMUM) == 2  # type: ignore[attr-defined]
    c.try_send(mb.publish(uniq.topic(), b"x", version=V, props=mb.prop_u16(mb.TOPIC_ALIAS, 3)))
    disconnected(c, mb.RC_TOPIC_ALIAS_INVALID)


def test_MQTT_3_2_2_22_client_keep_alive_used(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-22] If the Server does not send the Server Keep Alive, the Server MUST use
    the Keep Alive value set by the Client on CONNECT."""
    c = mqtt(b, uniq.cid("k"), version=V, keepalive=2)
    assert mb.SERVER_KEEP_ALIVE not in c.connack.props  # type: ignore[attr-defined]
    time.sleep(1.5)
    c.ping()
    quiet(c, 2.0)
    disconnected(c, mb.RC_KEEP_ALIVE_TIMEOUT, timeout=2.5)


# -- 3.3 PUBLISH --------------------------------------------------------------------------------


def _unacked_then_back(b: Broker, mqtt: Clients, uniq: Uniq, qos: int) -> tuple[mb.RawClient, mb.Publish]:
    cid, topic = uniq.cid("r"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, qos)
    client(mqtt, b, uniq).publish(topic, b"again", qos=qos)
    first = c.recv_publish(ack=False)
    c.abort()
    return mqtt(b, cid, version=V, clean=False), first


def test_MQTT_3_3_1_1_dup_on_redelivery(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-1] The DUP flag MUST be set to 1 by the Client or Server when it attempts to
    re-deliver a PUBLISH packet."""
    c2, first = _unacked_then_back(b, mqtt, uniq, 1)
    again = c2.recv_publish()
    assert not first.dup and again.dup and again.pid == first.pid


def test_MQTT_3_3_1_2_dup_0_for_qos_0(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-2] The DUP flag MUST be set to 0 for all QoS 0 messages."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 0)
    p = client(mqtt, b, uniq)
    p.send(mb.publish(topic, b"d", qos=1, pid=2, dup=True, version=V))
    p.expect(mb.PUBACK)
    assert s.expect(mb.PUBLISH)[1] == 0


def test_MQTT_3_3_1_3_dup_set_independently(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-3] The DUP flag in the outgoing PUBLISH packet is set independently to the
    incoming PUBLISH packet, its value MUST be determined solely by whether the outgoing
    PUBLISH packet is a retransmission."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    p = client(mqtt, b, uniq)
    p.send(mb.publish(topic, b"d", qos=1, pid=3, dup=True, version=V))
    p.expect(mb.PUBACK)
    assert not s.recv_publish().dup


def test_MQTT_3_3_1_4_qos_3(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-4] A PUBLISH Packet MUST NOT have both QoS bits set to 1. (Malformed
    Packet.)"""
    send_bad(mqtt, b, uniq, mb.fixed(mb.PUBLISH, 6, mb.mqtt_str("a/b") + mb.u16(1) + b"\x00x"), MAL)


def test_MQTT_3_3_1_5_retained_replaced(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-5] If the RETAIN flag is set to 1 in a PUBLISH packet sent by a Client to a
    Server, the Server MUST replace any existing retained message for this topic and store
    the Application Message."""
    topic = uniq.topic()
    p = client(mqtt, b, uniq)
    p.publish(topic, b"old", qos=1, retain=True)
    p.publish(topic, b"new", qos=1, retain=True)
    assert [m.payload for m in sub(mqtt, b, uniq, topic).drain_publishes(first_timeout=3)] == [b"new"]


def test_MQTT_3_3_1_6_and_7_empty_retained_removes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-6] If the Payload contains zero bytes it is processed normally by the Server
    but any retained message with the same topic name MUST be removed and any future
    subscribers for the topic will not receive a retained message. [MQTT-3.3.1-7] A retained
    message with a Payload containing zero bytes MUST NOT be stored as a retained message on
    the Server."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    p = client(mqtt, b, uniq)
    p.publish(topic, b"x", qos=1, retain=True)
    p.publish(topic, b"", qos=1, retain=True)
    assert [m.payload for m in s.recv_publishes(2)] == [b"x", b""]
    quiet(sub(mqtt, b, uniq, topic))


def test_MQTT_3_3_1_8_retain_0_leaves_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-8] If the RETAIN flag is 0 in a PUBLISH packet sent by a Client to a Server,
    the Server MUST NOT store the message as a retained message and MUST NOT remove or
    replace any existing retained message."""
    topic = uniq.topic()
    p = client(mqtt, b, uniq)
    p.publish(topic, b"kept", qos=1, retain=True)
    p.publish(topic, b"plain", qos=1)
    p.publish(topic, b"", qos=1)
    assert [m.payload for m in sub(mqtt, b, uniq, topic).drain_publishes(first_timeout=3)] == [b"kept"]


def _retained(b: Broker, mqtt: Clients, uniq: Uniq) -> str:
    topic = uniq.topic()
    client(mqtt, b, uniq).publish(topic, b"ret", qos=1, retain=True)
    return topic


def test_MQTT_3_3_1_9_retain_handling_0(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-9] If Retain Handling is set to 0 the Server MUST send the retained messages
    matching the Topic Filter of the subscription to the Client."""
    topic = _retained(b, mqtt, uniq)
    c = client(mqtt, b, uniq)
    c.subscribe(topic, 1)
    assert c.recv_publish().payload == b"ret"
    c.subscribe(topic, 1)
    assert c.recv_publish().payload == b"ret"


def test_MQTT_3_3_1_10_retain_handling_1(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-10] If Retain Handling is set to 1 then if the subscription did not
    already exist, the Server MUST send all retained message matching the Topic Filter of the
    subscription to the Client, and if the subscription did exist the Server MUST NOT send the
    retained messages."""
    topic = _retained(b, mqtt, uniq)
    c = client(mqtt, b, uniq)
    c.subscribe(topic, 1 | 0x10)
    assert c.recv_publish().payload == b"ret"
    c.subscribe(topic, 1 | 0x10)
    quiet(c)


def test_MQTT_3_3_1_11_retain_handling_2(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-11] If Retain Handling is set to 2, the Server MUST NOT send the retained
    messages."""
    topic = _retained(b, mqtt, uniq)
    c = client(mqtt, b, uniq)
    c.subscribe(topic, 1 | 0x20)
    quiet(c)


def test_MQTT_3_3_1_12_retain_as_published_0(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-12] If the value of Retain As Published subscription option is set to 0, the
    Server MUST set the RETAIN flag to 0 when forwarding an Application Message regardless of
    how the RETAIN flag was set in the received PUBLISH packet."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1)
    client(mqtt, b, uniq).publish(topic, b"r", qos=1, retain=True)
    assert not s.recv_publish().retain


def test_MQTT_3_3_1_13_retain_as_published_1(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-13] If the value of Retain As Published subscription option is set to 1, the
    Server MUST set the RETAIN flag equal to the RETAIN flag in the received PUBLISH
    packet."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1 | 0x08)
    p = client(mqtt, b, uniq)
    p.publish(topic, b"r", qos=1, retain=True)
    p.publish(topic, b"n", qos=1)
    assert [(m.payload, m.retain) for m in s.recv_publishes(2)] == [(b"r", True), (b"n", False)]


def test_MQTT_3_3_2_1_topic_name_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-1] The Topic Name MUST be present as the first field in the PUBLISH packet
    Variable Header. It MUST be a UTF-8 Encoded String."""
    send_bad(mqtt, b, uniq, mb.fixed(mb.PUBLISH, 0, b"\x00\x10ab"), MAL)
    send_bad(mqtt, b, uniq, mb.publish(b"a\xc3", b"x", version=V), MAL)


def test_v5_3_3_2_1_empty_topic_name_without_alias_is_a_protocol_error(b: Broker, mqtt: Clients,
                                                                      uniq: Uniq) -> None:
    """3.3.2.1: "It is a Protocol Error if the Topic Name is zero length and there is no Topic
    Alias." (DISCONNECT 0x82, not 0x90; QoS 0 and QoS 1 alike.)"""
    send_bad(mqtt, b, uniq, mb.publish("", b"x", version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.publish("", b"x", qos=1, pid=1, version=V), PROTO)


def test_MQTT_3_3_2_2_topic_name_without_wildcards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-2] The Topic Name in the PUBLISH packet MUST NOT contain wildcard
    characters. (Server: 0x90 Topic Name invalid, or Malformed / Protocol Error.)"""
    for topic in ("a/+", "#", "a/b#"):
        send_bad(mqtt, b, uniq, mb.publish(topic, b"x", version=V), mb.RC_TOPIC_NAME_INVALID, MAL, PROTO)


def test_MQTT_3_3_2_3_topic_name_matches_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-3] The Topic Name in a PUBLISH packet sent by a Server to a subscribing
    Client MUST match the Subscription's Topic Filter."""
    base = uniq.topic()
    s = sub(mqtt, b, uniq, base + "/+/z")
    p = client(mqtt, b, uniq)
    p.publish(base + "/y/q", b"n", qos=1)
    p.publish(base + "/y/z", b"y", qos=1)
    assert [(m.topic, m.payload) for m in s.drain_publishes(first_timeout=3)] == [(base + "/y/z", b"y")]


def _forwarded(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes, payload: bytes = b"p") -> mb.Publish:
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    client(mqtt, b, uniq).publish(topic, payload, qos=1, props=props)
    return s.recv_publish()


def test_MQTT_3_3_2_4_payload_format_indicator_unaltered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-4] A Server MUST send the Payload Format Indicator unaltered to all
    subscribers receiving the Application Message."""
    assert _forwarded(b, mqtt, uniq, mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1)).props[mb.PAYLOAD_FORMAT_INDICATOR] == 1
    assert _forwarded(b, mqtt, uniq, mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 0)).props.get(mb.PAYLOAD_FORMAT_INDICATOR, 0) == 0


def test_MQTT_3_3_2_5_expired_not_delivered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-5] If the Message Expiry Interval has passed and the Server has not managed
    to start onward delivery to a matching subscriber, then it MUST delete the copy of the
    message for that subscriber."""
    cid, topic = uniq.cid("x"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 1)
    c.disconnect()
    p = client(mqtt, b, uniq)
    p.publish(topic, b"short", qos=1, props=mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 1))
    p.publish(topic, b"long", qos=1, props=mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 60))
    time.sleep(2.2)
    got = mqtt(b, cid, version=V, clean=False).drain_publishes(first_timeout=3)
    assert [m.payload for m in got] == [b"long"]


def test_MQTT_3_3_2_6_expiry_interval_reduced(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-6] The PUBLISH packet sent to a Client by the Server MUST contain a Message
    Expiry Interval set to the received value minus the time that the Application Message has
    been waiting in the Server."""
    cid, topic = uniq.cid("x"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 1)
    c.disconnect()
    client(mqtt, b, uniq).publish(topic, b"m", qos=1, props=mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 60))
    time.sleep(2.1)
    msg = mqtt(b, cid, version=V, clean=False).recv_publish()
    assert 55 <= msg.props[mb.MESSAGE_EXPIRY_INTERVAL] <= 58, msg.props


def test_MQTT_3_3_2_7_aliases_not_carried_over(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-7] A receiver MUST NOT carry forward any Topic Alias mappings from one
    Network Connection to another."""
    cid, topic = uniq.cid("a"), uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.publish(topic, b"set", qos=1, props=mb.prop_u16(mb.TOPIC_ALIAS, 1))
    c.disconnect()
    assert s.recv_publish().payload == b"set"
    c2 = mqtt(b, cid, version=V, clean=False)
    c2.try_send(mb.publish("", b"use", qos=1, pid=1, version=V, props=mb.prop_u16(mb.TOPIC_ALIAS, 1)))
    disconnected(c2, PROTO, mb.RC_TOPIC_ALIAS_INVALID)
    quiet(s)


def test_MQTT_3_3_2_8_topic_alias_zero(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-8] A sender MUST NOT send a PUBLISH packet containing a Topic Alias which
    has the value 0. (Server: DISCONNECT 0x94.)"""
    send_bad(mqtt, b, uniq, mb.publish(uniq.topic(), b"x", version=V, props=mb.prop_u16(mb.TOPIC_ALIAS, 0)),
             mb.RC_TOPIC_ALIAS_INVALID)


def test_MQTT_3_3_2_12_server_accepts_aliases_up_to_maximum(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-12] A Server MUST accept all Topic Alias values greater than 0 and less
    than or equal to the Topic Alias Maximum value that it returned in the CONNACK packet."""
    t1, t2 = uniq.topic(), uniq.topic()
    s = mqtt(lim, uniq.cid("s"), version=V)
    s.subscribe([(t1, 1), (t2, 1)])
    p = client(mqtt, lim, uniq)
    p.publish(t1, b"1", qos=1, props=mb.prop_u16(mb.TOPIC_ALIAS, 1))
    p.publish(t2, b"2", qos=1, props=mb.prop_u16(mb.TOPIC_ALIAS, 2))
    p.publish("", b"3", qos=1, props=mb.prop_u16(mb.TOPIC_ALIAS, 2))
    p.publish("", b"4", qos=1, props=mb.prop_u16(mb.TOPIC_ALIAS, 1))
    got = [(m.topic, m.payload) for m in s.recv_publishes(4)]
    assert got == [(t1, b"1"), (t2, b"2"), (t2, b"3"), (t1, b"4")]


def test_MQTT_3_3_2_14_response_topic_without_wildcards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-14] The Response Topic MUST NOT contain wildcard characters."""
    send_bad(mqtt, b, uniq, mb.publish(uniq.topic(), b"x", version=V, props=mb.prop_str(mb.RESPONSE_TOPIC, "r/#")),
             PROTO, MAL, mb.RC_TOPIC_NAME_INVALID)


def test_MQTT_3_3_2_15_response_topic_unaltered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-15] The Server MUST send the Response Topic unaltered to all subscribers
    receiving the Application Message."""
    assert _forwarded(b, mqtt, uniq, mb.prop_str(mb.RESPONSE_TOPIC, "reply/\u00e9/x")).props[mb.RESPONSE_TOPIC] == "reply/\u00e9/x"


def test_MQTT_3_3_2_16_correlation_data_unaltered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-16] The Server MUST send the Correlation Data unaltered to all subscribers
    receiving the Application Message."""
    data = bytes(range(256))
    assert _forwarded(b, mqtt, uniq, mb.prop_bin(mb.CORRELATION_DATA, data)).props[mb.CORRELATION_DATA] == data


def test_MQTT_3_3_2_17_and_18_user_properties_unaltered_in_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-17] The Server MUST send all User Properties unaltered in a PUBLISH packet
    when forwarding the Application Message to a Client. [MQTT-3.3.2-18] The Server MUST
    maintain the order of User Properties when forwarding the Application Message."""
    pairs = [("b", "1"), ("a", "2"), ("b", "0"), ("", ""), ("k", "v\u00e9")]
    assert _forwarded(b, mqtt, uniq, mb.user_props(pairs)).props[mb.USER_PROPERTY] == pairs


def test_MQTT_3_3_2_19_content_type_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-19] The Content Type MUST be a UTF-8 Encoded String."""
    send_bad(mqtt, b, uniq, mb.publish(uniq.topic(), b"x", version=V, props=mb.prop_str(mb.CONTENT_TYPE, b"\xff")), MAL)


def test_MQTT_3_3_2_20_content_type_unaltered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-20] A Server MUST send the Content Type unaltered to all subscribers
    receiving the Application Message."""
    assert _forwarded(b, mqtt, uniq, mb.prop_str(mb.CONTENT_TYPE, "application/x; q=1")).props[mb.CONTENT_TYPE] == "application/x; q=1"


def test_MQTT_3_3_4_1_response_by_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-1] The receiver of a PUBLISH Packet MUST respond with the packet as
    determined by the QoS in the PUBLISH Packet."""
    c = client(mqtt, b, uniq)
    t = uniq.topic()
    c.send(mb.publish(t, b"0", version=V) + mb.publish(t, b"1", qos=1, pid=1, version=V)
           + mb.publish(t, b"2", qos=2, pid=2, version=V))
    assert mb.parse_ack(c.expect(mb.PUBACK)[2], V).pid == 1
    assert mb.parse_ack(c.expect(mb.PUBREC)[2], V).pid == 2
    quiet(c)


def test_MQTT_3_3_4_2_overlapping_max_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-2] In this case [overlapping subscriptions] the Server MUST deliver the
    message to the Client respecting the maximum QoS of all the matching subscriptions."""
    base = uniq.topic()
    s = client(mqtt, b, uniq)
    s.subscribe([(base + "/+", 0), (base + "/x", 2)])
    client(mqtt, b, uniq).publish(base + "/x", b"o", qos=2)
    got = s.drain_publishes(first_timeout=3)
    assert got and max(m.qos for m in got) == 2


def test_MQTT_3_3_4_3_and_4_subscription_identifiers(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-3] If the Client specified a Subscription Identifier for any of the
    overlapping subscriptions the Server MUST send those Subscription Identifiers in the
    message which is published as the result of the subscriptions. [MQTT-3.3.4-4] If the
    Server sends a single copy of the message it MUST include in the PUBLISH packet the
    Subscription Identifiers for all matching subscriptions which have a Subscription
    Identifiers, their order is not significant."""
    base = uniq.topic()
    s = client(mqtt, b, uniq)
    s.subscribe(base + "/+", 1, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 7))
    s.subscribe(base + "/#", 1, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 300))
    s.subscribe(base + "/x", 1)
    client(mqtt, b, uniq).publish(base + "/x", b"ids", qos=1)
    got = s.drain_publishes(first_timeout=3)
    ids = sorted(i for m in got for i in m.props.get(mb.SUBSCRIPTION_IDENTIFIER, []))
    assert ids == [7, 300], got


def test_MQTT_3_3_4_6_no_subscription_identifier_from_client(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-6] A PUBLISH packet sent from a Client to a Server MUST NOT contain a
    Subscription Identifier."""
    send_bad(mqtt, b, uniq, mb.publish(uniq.topic(), b"x", version=V, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 1)),
             PROTO, MAL)


def test_MQTT_3_3_4_7_client_exceeds_receive_maximum(lim: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-7] The Client MUST NOT send more than Receive Maximum QoS 1 and QoS 2
    PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason
    Code of 128 or greater from the Server. (Server: DISCONNECT 0x93.)"""
    c = client(mqtt, lim, uniq)
    assert c.connack.props.get(mb.RECEIVE_MAXIMUM) == 2  # type: ignore[attr-defined]
    t = uniq.topic()
    c.try_send(b"".join(mb.publish(t, b"x", qos=2, pid=i, version=V) for i in (1, 2, 3)))
    disconnected(c, mb.RC_RECEIVE_MAXIMUM_EXCEEDED)


def test_MQTT_3_3_4_9_server_respects_receive_maximum(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-9] The Server MUST NOT send more than Receive Maximum QoS 1 and QoS 2
    PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason
    Code of 128 or greater from the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 2))
    p = client(mqtt, b, uniq)
    for i in range(4):
        p.publish(topic, str(i), qos=1)
    first = s.recv_publishes(2, ack=False)
    quiet(s)
    assert first[0].pid is not None
    s.send(mb.puback(first[0].pid, V))
    assert s.recv_publish(ack=False).payload == b"2"
    quiet(s)


def test_MQTT_3_3_4_10_other_packets_not_delayed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-10] The Server MUST NOT delay the sending of any packets other than PUBLISH
    packets due to having sent Receive Maximum PUBLISH packets without receiving
    acknowledgements for them."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 1))
    p = client(mqtt, b, uniq)
    p.publish(topic, b"1", qos=1)
    p.publish(topic, b"2", qos=1)
    s.recv_publish(ack=False)
    s.ping()
    s.send(mb.subscribe(50, [(uniq.topic(), 0)], version=V))
    s.expect(mb.SUBACK)


# -- 3.4 - 3.7 acknowledgements ------------------------------------------------------------------


def test_MQTT_3_4_2_1_puback_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.4.2-1] The Client or Server sending the PUBACK packet MUST use one of the PUBACK
    Reason Codes."""
    c = client(mqtt, b, uniq)
    allowed = {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}
    for topic in (uniq.topic(), "denied/x"):
        ack = c.publish(topic, b"x", qos=1)
        assert ack is not None and ack.reason in allowed


def test_MQTT_3_5_2_1_pubrec_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.5.2-1] The Client or Server sending the PUBREC packet MUST use one of the PUBREC
    Reason Code values."""
    c = client(mqtt, b, uniq)
    for i, topic in enumerate((uniq.topic(), "denied/x"), 1):
        c.send(mb.publish(topic, b"x", qos=2, pid=i, version=V))
        rec = mb.parse_ack(c.expect(mb.PUBREC)[2], V)
        assert rec.reason in {0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}


def test_MQTT_3_6_1_1_pubrel_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.6.1-1] Bits 3,2,1 and 0 of the Fixed Header in the PUBREL packet are reserved
    and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other value as
    malformed and close the Network Connection."""
    c = client(mqtt, b, uniq)
    c.send(mb.publish(uniq.topic(), b"x", qos=2, pid=1, version=V))
    c.expect(mb.PUBREC)
    c.try_send(mb.fixed(mb.PUBREL, 0, mb.u16(1)))
    disconnected(c, MAL)


def test_MQTT_3_6_2_1_pubrel_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.6.2-1] The Client or Server sending the PUBREL packet MUST use one of the PUBREL
    Reason Code values."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    client(mqtt, b, uniq).publish(topic, b"x", qos=2)
    msg = s.recv_publish(ack=False)
    assert msg.pid is not None
    s.send(mb.pubrec(msg.pid, V))
    assert mb.parse_ack(s.expect(mb.PUBREL)[2], V).reason in {0x00, 0x92}


def test_MQTT_3_7_2_1_pubcomp_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.7.2-1] The Client or Server sending the PUBCOMP packet MUST use one of the
    PUBCOMP Reason Code values. (An unknown Packet Identifier: 0x92.)"""
    c = client(mqtt, b, uniq)
    c.send(mb.pubrel(999, V))
    comp = mb.parse_ack(c.expect(mb.PUBCOMP)[2], V)
    assert (comp.pid, comp.reason) == (999, mb.RC_PACKET_IDENTIFIER_NOT_FOUND)


# -- 3.8 - 3.11 SUBSCRIBE, UNSUBSCRIBE ------------------------------------------------------------


def test_MQTT_3_8_1_1_subscribe_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.1-1] Bits 3,2,1 and 0 of the Fixed Header of the SUBSCRIBE packet are reserved
    and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other value as
    malformed and close the Network Connection."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 0)], version=V, flags=0), MAL)


def test_MQTT_3_8_3_1_filters_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-1] The Topic Filters MUST be a UTF-8 Encoded String."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [(b"a/\xc3", 0)], version=V), MAL)


def test_MQTT_3_8_3_2_at_least_one_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-2] The Payload MUST contain at least one Topic Filter and Subscription
    Options pair."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [], version=V), PROTO, MAL)


def test_MQTT_3_8_3_3_no_local(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-3] Bit 2 of the Subscription Options represents the No Local option. If the
    value is 1, Application Messages MUST NOT be forwarded to a connection with a ClientID
    equal to the ClientID of the publishing connection."""
    topic = uniq.topic()
    c = client(mqtt, b, uniq)
    c.subscribe(topic, 1 | 0x04)
    c.publish(topic, b"self", qos=1)
    quiet(c)
    client(mqtt, b, uniq).publish(topic, b"other", qos=1)
    assert c.recv_publish().payload == b"other"


def test_MQTT_3_8_3_4_no_local_on_shared_subscription(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-4] It is a Protocol Error to set the No Local bit to 1 on a Shared
    Subscription."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("$share/g/a", 1 | 0x04)], version=V), PROTO)


def test_MQTT_3_8_3_5_reserved_option_bits(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-5] The Server MUST treat a SUBSCRIBE packet as malformed if any of Reserved
    bits in the Payload are non-zero."""
    for options in (0x40, 0x80, 0xC1):
        send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", options)], version=V), MAL)
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 3)], version=V), PROTO)  # 3.8.3.1
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 0x30)], version=V), PROTO)  # 3.8.3.1


def test_v5_3_8_3_1_maximum_qos_3_is_a_protocol_error(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the value 3." (DISCONNECT
    0x82; 3.1.1 calls it malformed [MQTT-3.8.3-4].) A SUBSCRIBE that does not parse further
    on stays a Malformed Packet, whatever came before in it."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 3)], version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 0), ("c/d", 0x04 | 3)], version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 3), ("c/d", 0x80)], version=V), MAL)


def test_MQTT_3_8_4_1_and_2_suback(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-1] When the Server receives a SUBSCRIBE packet from a Client, the Server
    MUST respond with a SUBACK packet. [MQTT-3.8.4-2] The SUBACK packet MUST have the same
    Packet Identifier as the SUBSCRIBE packet that it is acknowledging."""
    c = client(mqtt, b, uniq)
    for pid in (1, 0xFFFF):
        c.send(mb.subscribe(pid, [(uniq.topic(), 2)], version=V))
        ack = mb.parse_suback(c.expect(mb.SUBACK)[2], V)
        assert (ack.pid, ack.codes) == (pid, [2])


def test_MQTT_3_8_4_3_and_4_subscription_replaced(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-3] If a Server receives a SUBSCRIBE packet containing a Topic Filter that is
    identical to a Non-shared Subscription's Topic Filter for the current Session, then it
    MUST replace that existing Subscription with a new Subscription. [MQTT-3.8.4-4] If the
    Retain Handling option is 0, any existing retained messages matching the Topic Filter MUST
    be re-sent, but Application Messages MUST NOT be lost due to replacing the
    Subscription."""
    topic = _retained(b, mqtt, uniq)
    c = client(mqtt, b, uniq)
    assert c.subscribe(topic, 0) == [0]
    c.recv_publish()
    assert c.subscribe(topic, 2) == [2]
    assert c.recv_publish().payload == b"ret"
    client(mqtt, b, uniq).publish(topic, b"once", qos=2)
    assert [(m.payload, m.qos) for m in c.drain_publishes(first_timeout=3)] == [(b"once", 2)]


def test_MQTT_3_8_4_5_and_6_several_filters(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-5] If a Server receives a SUBSCRIBE packet that contains multiple Topic
    Filters it MUST handle that packet as if it had received a sequence of multiple SUBSCRIBE
    packets, except that it combines their responses into a single SUBACK response.
    [MQTT-3.8.4-6] The SUBACK packet sent by the Server to the Client MUST contain a Reason
    Code for each Topic Filter/Subscription Option pair."""
    t1, t2 = uniq.topic(), uniq.topic()
    c = client(mqtt, b, uniq)
    c.send(mb.subscribe(5, [(t1, 1), ("a/#/b", 1), (t2, 0)], version=V))
    assert mb.parse_suback(c.expect(mb.SUBACK)[2], V).codes == [1, mb.RC_TOPIC_FILTER_INVALID, 0]
    quiet(c)


def test_MQTT_3_8_4_7_granted_qos_or_failure(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-7] This Reason Code MUST either show the maximum QoS that was granted for
    that Subscription or indicate that the subscription failed."""
    c = client(mqtt, b, uniq)
    codes = c.subscribe([(uniq.topic(), 0), (uniq.topic(), 1), (uniq.topic(), 2), ("a+", 1)])
    assert codes[:3] == [0, 1, 2] and codes[3] >= 0x80


def test_MQTT_3_8_4_8_delivered_at_minimum_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-8] The QoS of Application Messages sent in response to a Subscription MUST
    be the minimum of the QoS of the originally published message and the Maximum QoS granted
    by the Server."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1)
    p = client(mqtt, b, uniq)
    p.publish(topic, b"2", qos=2)
    p.publish(topic, b"0", qos=0)
    assert [(m.payload, m.qos) for m in s.recv_publishes(2)] == [(b"2", 1), (b"0", 0)]


def test_MQTT_3_9_3_1_suback_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.9.3-1] The order of Reason Codes in the SUBACK packet MUST match the order of
    Topic Filters in the SUBSCRIBE packet."""
    assert client(mqtt, b, uniq).subscribe([(uniq.topic(), 2), (uniq.topic(), 0), (uniq.topic(), 1)]) == [2, 0, 1]


def test_MQTT_3_9_3_2_subscribe_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.9.3-2] The Server sending a SUBACK packet MUST use one of the Subscribe Reason
    Codes for each Topic Filter received."""
    allowed = {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
    codes = client(mqtt, b, uniq).subscribe([("a#", 1), ("$share/g+/a", 1), ("$share/g", 1), ("$SYS/#", 1),
                                             (uniq.topic(), 2)])
    assert set(codes) <= allowed, codes


def test_MQTT_3_10_1_1_unsubscribe_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.1-1] Bits 3,2,1 and 0 of the Fixed Header of the UNSUBSCRIBE packet are
    reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
    value as malformed and close the Network Connection."""
    send_bad(mqtt, b, uniq, mb.unsubscribe(1, ["a/b"], version=V, flags=0), MAL)


def test_MQTT_3_10_3_1_unsubscribe_filters_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.3-1] The Topic Filters in an UNSUBSCRIBE packet MUST be UTF-8 Encoded
    Strings."""
    send_bad(mqtt, b, uniq, mb.unsubscribe(1, [b"a\xff"], version=V), MAL)


def test_MQTT_3_10_3_2_unsubscribe_at_least_one_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.3-2] The Payload of an UNSUBSCRIBE packet MUST contain at least one Topic
    Filter."""
    send_bad(mqtt, b, uniq, mb.unsubscribe(1, [], version=V), PROTO, MAL)


def test_MQTT_3_10_4_1_exact_match_deleted(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-1] The Topic Filters (whether they contain wildcards or not) supplied in an
    UNSUBSCRIBE packet MUST be compared character-by-character with the current set of Topic
    Filters held by the Server for the Client. If any filter matches exactly then its owning
    Subscription MUST be deleted."""
    base = uniq.topic()
    c = client(mqtt, b, uniq)
    c.subscribe(base + "/+", 1)
    assert c.unsubscribe([base + "/x", base + "/#"]) == [0x11, 0x11]
    assert c.unsubscribe([base + "/+"]) == [0]
    client(mqtt, b, uniq).publish(base + "/x", b"gone", qos=1)
    quiet(c)


def test_MQTT_3_10_4_2_no_new_messages(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-2] When a Server receives UNSUBSCRIBE It MUST stop adding any new messages
    which match the Topic Filters, for delivery to the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    s.unsubscribe([topic])
    client(mqtt, b, uniq).publish(topic, b"late", qos=1)
    quiet(s)


def test_MQTT_3_10_4_3_inflight_completed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-3] When a Server receives UNSUBSCRIBE It MUST complete the delivery of any
    QoS 1 or QoS 2 messages which match the Topic Filters and it has started to send to the
    Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    client(mqtt, b, uniq).publish(topic, b"x", qos=2)
    msg = s.recv_publish(ack=False)
    s.unsubscribe([topic])
    assert msg.pid is not None
    s.send(mb.pubrec(msg.pid, V))
    assert mb.parse_ack(s.expect(mb.PUBREL)[2], V) == mb.Ack(msg.pid, 0, {})


def test_MQTT_3_10_4_4_and_5_unsuback(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-4] The Server MUST respond to an UNSUBSCRIBE request by sending an
    UNSUBACK packet. [MQTT-3.10.4-5] The UNSUBACK packet MUST have the same Packet Identifier
    as the UNSUBSCRIBE packet. Even where no Topic Subscriptions are deleted, the Server MUST
    respond with an UNSUBACK."""
    c = client(mqtt, b, uniq)
    c.send(mb.unsubscribe(0x4242, [uniq.topic()], version=V))
    ack = mb.parse_unsuback(c.expect(mb.UNSUBACK)[2], V)
    assert (ack.pid, ack.codes) == (0x4242, [0x11])


def test_MQTT_3_10_4_6_and_3_11_3_1_several_filters_one_unsuback(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-6] If a Server receives an UNSUBSCRIBE packet that contains multiple Topic
    Filters, it MUST process that packet as if it had received a sequence of multiple
    UNSUBSCRIBE packets, except that it sends just one UNSUBACK response. [MQTT-3.11.3-1] The
    order of Reason Codes in the UNSUBACK packet MUST match the order of Topic Filters in the
    UNSUBSCRIBE packet."""
    t1, t2 = uniq.topic(), uniq.topic()
    c = client(mqtt, b, uniq)
    c.subscribe(t2, 1)
    c.send(mb.unsubscribe(6, [t1, t2], version=V))
    assert mb.parse_unsuback(c.expect(mb.UNSUBACK)[2], V).codes == [0x11, 0x00]
    quiet(c)


def test_MQTT_3_11_3_2_unsubscribe_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.11.3-2] The Server sending an UNSUBACK packet MUST use one of the Unsubscribe
    Reason Code values for each Topic Filter received."""
    codes = client(mqtt, b, uniq).unsubscribe(["a#", "$share/g/a", uniq.topic()])
    assert set(codes) <= {0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}, codes


# -- 3.12 PINGREQ, 3.14 DISCONNECT, 3.15 AUTH ------------------------------------------------------


def test_MQTT_3_12_4_1_pingresp(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.12.4-1] The Server MUST send a PINGRESP packet in response to a PINGREQ
    packet."""
    c = client(mqtt, b, uniq)
    c.send(mb.pingreq())
    assert c.recv_packet() == (mb.PINGRESP, 0, b"")


def test_MQTT_3_14_0_1_no_disconnect_before_connack(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.0-1] A Server MUST NOT send a DISCONNECT until after it has sent a CONNACK
    with Reason Code of less than 0x80."""
    for data in (mb.connect(uniq.cid("d"), version=V, flags_override=0x01), b"\x10\x03\x00\x04M",
                 mb.connect(uniq.cid("d"), version=V, props=b"\x7f\x00") , mb.pingreq()):
        c = mqtt.raw(b)
        c.send(data)
        assert c.expect_closed(3)
        assert not [p for p in c.before_close if p[0] == mb.DISCONNECT], c.before_close


def test_MQTT_3_14_1_1_disconnect_reserved_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.1-1] The Client or Server MUST validate that reserved bits are set to 0. If
    they are not zero it sends a DISCONNECT packet with a Reason code of 0x81 (Malformed
    Packet)."""
    send_bad(mqtt, b, uniq, mb.fixed(mb.DISCONNECT, 1, b""), MAL)


def test_v5_3_14_2_2_2_no_session_expiry_from_zero(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """(3.14.2.2.2, no statement number) If the Session Expiry Interval in the CONNECT packet was zero, then it
    is a Protocol Error to set a non-zero Session Expiry Interval in the DISCONNECT packet
    sent by the Client."""
    c = client(mqtt, b, uniq)
    c.try_send(mb.disconnect(V, 0, mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 60)))
    disconnected(c, PROTO)


def test_v5_3_14_2_2_2_judged_by_the_connect_not_by_the_cap(make_broker, mqtt: Clients, uniq: Uniq) -> None:
    """(3.14.2.2.2) The rule is about the CONNECT's interval: a client that asked for 60 s, capped
    to 0 by ``limits.max_session_expiry = 0``, may still send one on DISCONNECT; it is a normal
    DISCONNECT (no Protocol Error, its will discarded)."""
    nb = make_broker(config="[limits]\nmax_session_expiry = 0\n")
    topic = uniq.topic()
    s = sub(mqtt, nb, uniq, topic)
    c = _will(nb, mqtt, uniq, topic, connect_props=SESSION_60)
    c.try_send(mb.disconnect(V, 0, mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 30)))
    assert c.expect_closed(3)
    assert not [p for p in c.before_close if p[0] == mb.DISCONNECT], c.before_close
    quiet(s, 0.8)


def test_MQTT_3_14_2_2_server_disconnect_without_session_expiry(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.2-2] The Session Expiry Interval MUST NOT be sent on a DISCONNECT by the
    Server."""
    cid = uniq.cid("t")
    old = mqtt(b, cid, version=V, props=SESSION_60)
    mqtt(b, cid, version=V, clean=False, props=SESSION_60)
    old.expect_closed(3)
    discs = [mb.parse_disconnect(p[2]) for p in old.before_close if p[0] == mb.DISCONNECT]
    assert discs and all(mb.SESSION_EXPIRY_INTERVAL not in d.props for d in discs)


def test_MQTT_3_14_4_1_and_2_nothing_after_disconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.4-1] After sending a DISCONNECT packet the sender MUST NOT send any more MQTT
    Control Packets on that Network Connection. [MQTT-3.14.4-2] After sending a DISCONNECT
    packet the sender MUST close the Network Connection."""
    topic = uniq.topic()
    c = sub(mqtt, b, uniq, topic)
    c.try_send(mb.fixed(mb.PUBLISH, 6, b"\x00\x01a\x00\x01") + mb.pingreq())
    disconnected(c, MAL)


def test_MQTT_3_14_4_3_normal_disconnect_discards_will(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.4-3] On receipt of DISCONNECT with a Reason Code of 0x00 (Success) the
    Server MUST discard any Will Message associated with the current Connection without
    publishing it."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will(b, mqtt, uniq, topic).disconnect(0)
    quiet(s, 0.8)
    _will(b, mqtt, uniq, topic).disconnect(mb.RC_DISCONNECT_WITH_WILL)
    assert s.recv_publish().payload == b"will", "0x04 asks for the will"


def test_MQTT_3_15_1_1_auth_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.15.1-1] Bits 3,2,1 and 0 of the Fixed Header of the AUTH packet are reserved and
    MUST all be set to 0. The Client or Server MUST treat any other value as malformed and
    close the Network Connection."""
    send_bad(mqtt, b, uniq, mb.fixed(mb.AUTH, 1, b"\x18\x00"), MAL)


def test_MQTT_3_15_2_1_auth_reason_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.15.2-1] The sender of the AUTH Packet MUST use one of the Authenticate Reason
    Codes. (An AUTH with another code: Malformed Packet or Protocol Error.)"""
    send_bad(mqtt, b, uniq, mb.fixed(mb.AUTH, 0, b"\x01\x00"), MAL, PROTO)


# -- 4 operational behaviour ---------------------------------------------------------------------


def test_MQTT_4_1_0_1_session_kept_while_connected(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.1.0-1] The Client and Server MUST NOT discard the Session State while the
    Network Connection is open."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 1))
    time.sleep(1.5)
    client(mqtt, b, uniq).publish(topic, b"still", qos=1)
    assert s.recv_publish().payload == b"still"


def test_MQTT_4_1_0_2_session_discarded_after_expiry(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.1.0-2] The Server MUST discard the Session State when the Network Connection is
    closed and the Session Expiry Interval has passed."""
    cid = uniq.cid("x")
    mqtt(b, cid, version=V, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 1)).disconnect()
    time.sleep(2.0)
    assert not mqtt(b, cid, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_4_3_2_and_4_3_3_qos_flows(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.2-1..5], [MQTT-4.3.3-1..12]: the QoS 1 and QoS 2 protocols as sender (unused
    identifier, DUP 0, PUBREL after PUBREC, the PUBLISH not re-sent after it) and receiver
    (PUBACK / PUBREC with the identifier, a repeated QoS 2 PUBLISH acknowledged and not
    delivered twice, PUBCOMP for PUBREL, the identifier new after PUBACK / PUBCOMP)."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    p = client(mqtt, b, uniq)
    p.send(mb.publish(topic, b"once", qos=2, pid=21, version=V))
    assert mb.parse_ack(p.expect(mb.PUBREC)[2], V).pid == 21
    p.send(mb.publish(topic, b"once", qos=2, pid=21, dup=True, version=V))
    assert mb.parse_ack(p.expect(mb.PUBREC)[2], V).pid == 21
    p.send(mb.pubrel(21, V))
    assert mb.parse_ack(p.expect(mb.PUBCOMP)[2], V) == mb.Ack(21, 0, {})
    p.send(mb.publish(topic, b"one", qos=1, pid=21, version=V))
    p.expect(mb.PUBACK)
    p.send(mb.publish(topic, b"two", qos=1, pid=21, dup=True, version=V))
    p.expect(mb.PUBACK)
    msgs = s.recv_publishes(3, ack=False)
    assert [m.payload for m in msgs] == [b"once", b"one", b"two"]
    assert all(not m.dup for m in msgs) and len({m.pid for m in msgs}) == 3


def test_MQTT_4_3_3_7_and_13_no_expiry_once_sent(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.3-7] ... the sender MUST NOT apply Message expiry if a PUBLISH packet has
    been sent. [MQTT-4.3.3-13] The receiver MUST continue the QoS 2 acknowledgement sequence
    even if it has applied message expiry."""
    cid, topic = uniq.cid("e"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 2)
    client(mqtt, b, uniq).publish(topic, b"m", qos=2, props=mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 1))
    first = c.recv_publish(ack=False)
    c.abort()
    time.sleep(1.6)
    again = mqtt(b, cid, version=V, clean=False).recv_publish()
    assert again.pid == first.pid and again.dup


def test_MQTT_4_4_0_1_resend_only_on_reconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.4.0-1] When a Client reconnects with Clean Start set to 0 and a session is
    present, both the Client and Server MUST resend any unacknowledged PUBLISH packets (where
    QoS > 0) and PUBREL packets using their original Packet Identifiers. This is the only
    circumstance where a Client or Server is REQUIRED to resend messages. Clients and Servers
    MUST NOT resend messages at any other time."""
    c2, first = _unacked_then_back(b, mqtt, uniq, 2)
    again = c2.recv_publish(ack=False)
    assert (again.pid, again.payload, again.dup) == (first.pid, first.payload, True)
    quiet(c2, 1.0)


def test_MQTT_4_4_0_2_negative_ack_not_retransmitted(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.4.0-2] If PUBACK or PUBREC is received containing a Reason Code of 0x80 or
    greater the corresponding PUBLISH packet is treated as acknowledged, and MUST NOT be
    retransmitted."""
    cid, topic = uniq.cid("n"), uniq.topic()
    c = mqtt(b, cid, version=V, props=SESSION_60)
    c.subscribe(topic, 2)
    p = client(mqtt, b, uniq)
    p.publish(topic, b"q1", qos=1)
    p.publish(topic, b"q2", qos=2)
    m1, m2 = c.recv_publishes(2, ack=False)
    assert m1.pid is not None and m2.pid is not None
    c.send(mb.puback(m1.pid, V, 0x80) + mb.pubrec(m2.pid, V, 0x80))
    c.ping()
    c.disconnect()
    quiet(mqtt(b, cid, version=V, clean=False), 0.8)


def test_MQTT_4_5_0_1_added_to_matching_sessions(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.5.0-1] When a Server takes ownership of an incoming Application Message it MUST
    add it to the Session State for those Clients that have matching Subscriptions."""
    base, cid = uniq.topic(), uniq.cid("o")
    online = sub(mqtt, b, uniq, base + "/#")
    off = mqtt(b, cid, version=V, props=SESSION_60)
    off.subscribe(base + "/+", 1)
    off.disconnect()
    client(mqtt, b, uniq).publish(base + "/m", b"owned", qos=1)
    assert online.recv_publish().payload == b"owned"
    assert mqtt(b, cid, version=V, clean=False).recv_publish().payload == b"owned"


def test_MQTT_4_6_0_5_and_6_ordered(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.6.0-5] When a Server processes a message that has been published to an Ordered
    Topic, it MUST send PUBLISH packets to consumers (for the same Topic and QoS) in the order
    that they were received from any given Client. [MQTT-4.6.0-6] By default, a Server MUST
    treat every Topic as an Ordered Topic when it is forwarding messages on Non-shared
    Subscriptions."""
    topic = uniq.topic()
    subs = [sub(mqtt, b, uniq, topic, 1) for _ in range(2)]
    p = client(mqtt, b, uniq)
    p.send(b"".join(mb.publish(topic, str(i), qos=1, pid=i + 1, version=V) for i in range(20)))
    for s in subs:
        assert [m.payload for m in s.recv_publishes(20)] == [str(i).encode() for i in range(20)]


def test_MQTT_4_7_0_1_wildcards_not_in_topic_names(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.0-1] The wildcard characters can be used in Topic Filters, but MUST NOT be
    used within a Topic Name."""
    send_bad(mqtt, b, uniq, mb.publish("a/+/b", b"x", version=V), mb.RC_TOPIC_NAME_INVALID, MAL, PROTO)


def test_MQTT_4_7_1_1_multi_level_wildcard_last(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.1-1] The multi-level wildcard character MUST be specified either on its own or
    following a topic level separator. In either case it MUST be the last character specified
    in the Topic Filter."""
    codes = client(mqtt, b, uniq).subscribe([("a/#/b", 1), ("a#", 1), ("#", 0), ("a/#", 0)])
    assert codes == [0x8F, 0x8F, 0, 0]


def test_MQTT_4_7_1_2_single_level_wildcard_whole_level(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.1-2] The single-level wildcard can be used at any level in the Topic Filter,
    including first and last levels. Where it is used, it MUST occupy an entire level of the
    filter."""
    codes = client(mqtt, b, uniq).subscribe([("a+/b", 1), ("a/+b", 1), ("+", 0), ("+/+", 0)])
    assert codes == [0x8F, 0x8F, 0, 0]


def test_MQTT_4_7_2_1_dollar_topics(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.2-1] The Server MUST NOT match Topic Filters starting with a wildcard
    character (# or +) with Topic Names beginning with a $ character."""
    name = "$" + uniq.cid("d")
    wild = [sub(mqtt, b, uniq, "#"), sub(mqtt, b, uniq, "+/x")]
    exact = sub(mqtt, b, uniq, name + "/x")
    wild[0].drain_publishes(0.2)
    client(mqtt, b, uniq).publish(name + "/x", b"$", qos=1)
    assert exact.recv_publish().payload == b"$"
    for s in wild:
        assert all(not m.topic.startswith("$") for m in s.drain_publishes(0.5))


def test_MQTT_4_7_3_1_topics_at_least_one_character(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-1] All Topic Names and Topic Filters MUST be at least one character long.
    (An empty Topic Name without a Topic Alias: 0x82, 3.3.2.1; an empty filter: Malformed
    Packet.)"""
    send_bad(mqtt, b, uniq, mb.publish("", b"x", version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("", 0)], version=V), MAL)
    send_bad(mqtt, b, uniq, mb.unsubscribe(1, [""], version=V), MAL)


def test_MQTT_4_7_3_2_no_null_character(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-2] Topic Names and Topic Filters MUST NOT include the null character
    (Unicode U+0000)."""
    send_bad(mqtt, b, uniq, mb.subscribe(1, [(b"a\x00", 0)], version=V), MAL)


def test_MQTT_4_7_3_4_no_normalisation(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-4] When it performs subscription matching the Server MUST NOT perform any
    normalization of Topic Names or Topic Filters, or any modification or substitution of
    unrecognized characters."""
    base = uniq.topic()
    s = sub(mqtt, b, uniq, base + "/a//b")
    p = client(mqtt, b, uniq)
    for t in (base + "/a/b", base + "/A//b", base + "/a//b/"):
        p.publish(t, b"no", qos=1)
    p.publish(base + "/a//b", b"yes", qos=1)
    assert [m.payload for m in s.drain_publishes(first_timeout=3)] == [b"yes"]


def test_MQTT_4_8_2_1_and_2_share_name(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.2-1] A Shared Subscription's Topic Filter MUST start with $share/ and MUST
    contain a ShareName that is at least one character long. [MQTT-4.8.2-2] The ShareName
    MUST NOT contain the characters "/", "+" or "#", but MUST be followed by a "/" character.
    This "/" character MUST be followed by a Topic Filter."""
    c = client(mqtt, b, uniq)
    codes = c.subscribe([("$share//a", 1), ("$share/g+/a", 1), ("$share/g#/a", 1), ("$share/g", 1),
                         ("$share/g/", 1), ("$share/g/" + uniq.topic(), 1)])
    assert all(x >= 0x80 for x in codes[:5]) and codes[5] == 1, codes


def test_MQTT_4_8_2_3_shared_granted_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.2-3] The Server MUST respect the granted QoS for the Client's subscription."""
    topic = uniq.topic()
    s = client(mqtt, b, uniq)
    s.subscribe("$share/g/" + topic, 1)
    client(mqtt, b, uniq).publish(topic, b"s", qos=2)
    assert s.recv_publish().qos == 1


def test_MQTT_4_8_2_6_negative_ack_not_sent_elsewhere(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.2-6] If a Client responds with a PUBACK or PUBREC containing a Reason Code of
    0x80 or greater to a PUBLISH packet from the Server, the Server MUST discard the
    Application Message and not attempt to send it to any other Subscriber."""
    topic = uniq.topic()
    group = "$share/g/" + topic
    a, c = client(mqtt, b, uniq), client(mqtt, b, uniq)
    a.subscribe(group, 1)
    c.subscribe(group, 1)
    client(mqtt, b, uniq).publish(topic, b"one", qos=1)
    got = None
    for x, y in ((a, c), (c, a)):
        pkt = x.no_packet(1.0)
        if pkt is not None and pkt[0] == mb.PUBLISH:
            got = mb.parse_publish(pkt[1], pkt[2], V)
            assert got.pid is not None
            x.send(mb.puback(got.pid, V, 0x80))
            quiet(y, 0.8)
            break
    assert got is not None, "no member got the message"


def test_MQTT_4_9_0_3_other_packets_with_zero_quota(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.9.0-3] The Client and Server MUST continue to process and respond to all other
    MQTT Control Packets even if the quota is zero."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1, props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 1))
    p = client(mqtt, b, uniq)
    p.publish(topic, b"1", qos=1)
    s.recv_publish(ack=False)
    s.send(mb.publish(topic + "/x", b"in", qos=1, pid=77, version=V))
    assert mb.parse_ack(s.expect(mb.PUBACK)[2], V).pid == 77
    s.ping()


def test_MQTT_4_12_0_1_unsupported_auth_method(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.12.0-1] If the Server does not support the Authentication Method supplied by the
    Client, it MAY send a CONNACK with a Reason Code of 0x8C (Bad authentication method) or
    0x87 (Not Authorized) as described in section 4.13 and MUST close the Network
    Connection."""
    refused(b, mqtt, mb.connect(uniq.cid("a"), version=V, props=mb.prop_str(mb.AUTHENTICATION_METHOD, "NOPE-1")), 0x8C, 0x87)


def test_MQTT_4_12_0_6_no_auth_without_method(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.12.0-6] If the Client does not include an Authentication Method in the CONNECT,
    the Server MUST NOT send an AUTH packet, and it MUST NOT send an Authentication Method in
    the CONNACK packet."""
    c = client(mqtt, b, uniq)
    assert mb.AUTHENTICATION_METHOD not in c.connack.props  # type: ignore[attr-defined]
    c.ping()


def test_MQTT_4_12_0_7_no_auth_from_client_without_method(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.12.0-7] If the Client does not include an Authentication Method in the CONNECT,
    the Client MUST NOT send an AUTH packet to the Server. (Server: Protocol Error.)"""
    send_bad(mqtt, b, uniq, mb.auth(0x18, mb.prop_str(mb.AUTHENTICATION_METHOD, "X")), PROTO)


def test_MQTT_4_13_1_1_malformed_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.13.1-1] When a Server detects a Malformed Packet or Protocol Error, and a Reason
    Code is given in the specification, it MUST close the Network Connection."""
    send_bad(mqtt, b, uniq, b"\x30\xff\xff\xff\xff\x01", MAL)
    send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", version=V, props=mb.prop_u8(1, 1) + mb.prop_u8(1, 1)), MAL, PROTO)


def test_MQTT_4_13_2_1_disconnect_above_0x80_then_close(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.13.2-1] The CONNACK and DISCONNECT packets allow a Reason Code of 0x80 or
    greater to indicate that the Network Connection will be closed. If a Reason Code of 0x80
    or greater is specified, then the Network Connection MUST be closed whether or not the
    CONNACK or DISCONNECT is sent."""
    c = client(mqtt, b, uniq)
    c.try_send(mb.publish("a/b", b"x", version=V, props=mb.prop_u16(mb.TOPIC_ALIAS, 0)))
    reason = disconnected(c, mb.RC_TOPIC_ALIAS_INVALID)
    assert reason is None or reason >= 0x80


def test_v5_malformed_packet_wins_over_an_earlier_protocol_error(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """1.2: a Protocol Error is "detected after the packet has been parsed"; a packet that
    does not parse is a Malformed Packet (0x81) even when a Protocol Error comes before the
    bytes that break it, and the same packets whole are Protocol Errors (0x82)."""
    bad_prop = b"\x7f\x00"  # no property has identifier 0x7F
    send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", qos=1, pid=0, version=V, props=bad_prop), MAL)
    send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", qos=1, pid=0, version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.subscribe(0, [("a/b", 0), ("c", 0xC0)], version=V), MAL)
    send_bad(mqtt, b, uniq, mb.subscribe(0, [("a/b", 0)], version=V), PROTO)
    send_bad(mqtt, b, uniq, mb.disconnect(V, 0x05, bad_prop), MAL)
    send_bad(mqtt, b, uniq, mb.disconnect(V, 0x05), PROTO)


def test_v5_properties_not_valid_in_client_packets(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """2.2.2.2: a property not valid in a packet is a Malformed Packet (0x81)."""
    send_bad(mqtt, b, uniq, mb.publish("a/b", b"x", version=V, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 5)), MAL)
    send_bad(mqtt, b, uniq, mb.subscribe(1, [("a/b", 0)], version=V, props=mb.prop_u16(mb.RECEIVE_MAXIMUM, 5)), MAL)
    send_bad(mqtt, b, uniq, mb.unsubscribe(1, ["a/b"], version=V, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 5)), MAL)
    send_bad(mqtt, b, uniq, mb.puback(1, V, 0, mb.prop_u16(mb.TOPIC_ALIAS, 1)), MAL)
    send_bad(mqtt, b, uniq, mb.disconnect(V, 0, mb.prop_u16(mb.TOPIC_ALIAS_MAXIMUM, 1)), MAL)
