"""MQTT 3.1.1 (and 3.1) conformance, statement by statement.

One test per normative statement a Server must keep (or a Client statement whose violation
the Server must answer), in the order of the specification's conformance list, each named
after its statement and quoting it. Raw bytes from ``mqttbytes`` against a real broker with
two workers, shared by the module. ``docs/CONFORMANCE.md`` maps each statement to its test.

3.1.1 has no DISCONNECT from the Server: every violation is a plain close ([MQTT-4.8.0-1]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mqttbytes as mb
import pytest
from conftest import (
    CONFIG_STORE_1_MIB,
    Broker,
    Clients,
    Uniq,
    _checked,
    assert_disconnected,
    skip_unless_shardbroker,
    wait_until,
)

V = 4
Make = Callable[..., Broker]

CONFIG = """
[acl]
deny_publish = ["denied/#"]
"""


@pytest.fixture(scope="module")
def _conf_broker(make_module_broker: Make) -> Broker:
    return make_module_broker(workers=2, config=CONFIG, name="conformance311")


@pytest.fixture
def b(_conf_broker: Broker) -> Iterator[Broker]:
    yield from _checked(_conf_broker)


def closed(c: mb.RawClient, timeout: float = 3.0) -> None:
    """The server closes ``c`` without a word (3.1.1)."""
    assert_disconnected(c, V, timeout=timeout)


def refused_connect(b: Broker, mqtt: Clients, data: bytes) -> list[mb.Packet]:
    """Send a bad CONNECT; the server must close; returns what it sent first (never an
    accepting CONNACK, never anything but a CONNACK)."""
    c = mqtt.raw(b)
    c.send(data)
    assert c.expect_closed(3), "server kept the connection after a bad CONNECT"
    for t, _, body in c.before_close:
        assert t == mb.CONNACK, f"only a CONNACK may come before the close: {mb.describe((t, 0, body))}"
        assert len(body) == 2, f"a 3.1.1 CONNACK has remaining length 2: {body!r}"
        assert body[1] != 0, "a bad CONNECT was accepted"
    return c.before_close


def closed_silently_after_connect(b: Broker, mqtt: Clients, data: bytes) -> None:
    """A CONNECT that does not conform: closed without a CONNACK [MQTT-3.1.4-1]."""
    sent = refused_connect(b, mqtt, data)
    assert not sent, f"expected a close without CONNACK, got {[mb.describe(p) for p in sent]}"


def body_connect(flags: int, payload: bytes, level: int = 4, name: bytes = b"MQTT") -> bytes:
    return mb.fixed(mb.CONNECT, 0, mb.mqtt_str(name) + bytes([level, flags]) + mb.u16(60) + payload)


def quiet(c: mb.RawClient, timeout: float = 0.4) -> None:
    pkt = c.no_packet(timeout)
    assert pkt is None, f"expected nothing, got {mb.describe(pkt)}"


def sub(mqtt: Clients, b: Broker, uniq: Uniq, topic: str, qos: int = 1, **kw: object) -> mb.RawClient:
    c = mqtt(b, uniq.cid("s"), version=V, **kw)
    c.subscribe(topic, qos)
    return c


# -- 1.5.3 UTF-8 encoded strings ---------------------------------------------------------------


def test_MQTT_1_5_3_1_ill_formed_utf8_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.3-1] The character data in a UTF-8 encoded string MUST be well-formed UTF-8
    ... In particular this data MUST NOT include encodings of code points between U+D800 and
    U+DFFF. If a Server or Client receives a Control Packet containing ill-formed UTF-8 it
    MUST close the Network Connection."""
    for topic in (b"a/\xff\xfe", b"a/\xed\xa0\x80", b"a/\xc3"):
        c = mqtt(b, uniq.cid("u"), version=V)
        c.try_send(mb.publish(topic, b"x"))
        closed(c)


def test_MQTT_1_5_3_2_null_character_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.3-2] A UTF-8 encoded string MUST NOT include an encoding of the null
    character U+0000. If a receiver (Server or Client) receives a Control Packet containing
    U+0000 it MUST close the Network Connection."""
    c = mqtt(b, uniq.cid("n"), version=V)
    c.try_send(mb.subscribe(1, [(b"a/\x00b", 0)]))
    closed(c)


def test_MQTT_1_5_3_3_bom_is_not_stripped(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-1.5.3-3] A UTF-8 encoded sequence 0xEF 0xBB 0xBF is always to be interpreted to
    mean U+FEFF ("ZERO WIDTH NO-BREAK SPACE") wherever it appears in a string and MUST NOT be
    skipped over or stripped off by a packet receiver."""
    plain = uniq.topic("bom")
    bom = "\ufeff" + plain
    with_bom = sub(mqtt, b, uniq, bom)
    without = sub(mqtt, b, uniq, plain)
    mqtt(b, uniq.cid("p"), version=V).publish(bom, b"b", qos=1)
    msg = with_bom.recv_publish()
    assert msg.topic == bom and msg.payload == b"b"
    quiet(without)


# -- 2.2.2 flags, 2.3.1 packet identifiers -------------------------------------------------------


def test_MQTT_2_2_2_1_reserved_flags_must_be_as_listed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.2-1] Where a flag bit is marked as "Reserved" in Table 2.2 - Flag Bits, it is
    reserved for future use and MUST be set to the value listed in that table."""
    for bad in (mb.fixed(mb.PUBREL, 0, mb.u16(1)), mb.fixed(mb.PINGREQ, 1, b""),
                mb.fixed(mb.DISCONNECT, 2, b"")):
        c = mqtt(b, uniq.cid("f"), version=V)
        c.try_send(bad)
        closed(c)


def test_MQTT_2_2_2_2_invalid_flags_close(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.2.2-2] If invalid flags are received, the receiver MUST close the Network
    Connection."""
    for bad in (mb.subscribe(1, [("a/b", 0)], flags=0), mb.unsubscribe(1, ["a/b"], flags=0xF),
                mb.fixed(mb.PUBACK, 2, mb.u16(1))):
        c = mqtt(b, uniq.cid("f"), version=V)
        c.try_send(bad)
        closed(c)


def test_MQTT_2_3_1_1_packet_identifier_zero_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.3.1-1] SUBSCRIBE, UNSUBSCRIBE, and PUBLISH (in cases where QoS > 0) Control
    Packets MUST contain a non-zero 16-bit Packet Identifier."""
    for bad in (mb.publish("a/b", b"x", qos=1, pid=0), mb.publish("a/b", b"x", qos=2, pid=0),
                mb.subscribe(0, [("a/b", 0)]), mb.unsubscribe(0, ["a/b"])):
        c = mqtt(b, uniq.cid("z"), version=V)
        c.try_send(bad)
        closed(c)


def test_MQTT_2_3_1_4_server_packet_identifiers_nonzero_and_unused(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.3.1-4] The same conditions apply to a Server when it sends a PUBLISH with QoS > 0
    (those of [MQTT-2.3.1-2, 2.3.1-3]: each new one gets a currently unused, non-zero Packet
    Identifier)."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    p = mqtt(b, uniq.cid("p"), version=V)
    for i in range(5):
        p.publish(topic, str(i), qos=2)
    msgs = s.recv_publishes(5, ack=False)
    pids = [m.pid for m in msgs]
    assert all(pids) and len(set(pids)) == 5, pids


def test_MQTT_2_3_1_5_qos0_publish_has_no_packet_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.3.1-5] A PUBLISH Packet MUST NOT contain a Packet Identifier if its QoS value
    is set to 0."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 0)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"payload", qos=1)
    _t, flags, body = s.expect(mb.PUBLISH)
    assert (flags >> 1) & 3 == 0
    assert body == mb.mqtt_str(topic) + b"payload"


def test_MQTT_2_3_1_6_acks_carry_the_publish_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.3.1-6] A PUBACK, PUBREC or PUBREL Packet MUST contain the same Packet
    Identifier as the PUBLISH Packet that was originally sent."""
    c = mqtt(b, uniq.cid("a"), version=V)
    c.send(mb.publish(uniq.topic(), b"1", qos=1, pid=0x1234))
    assert c.expect(mb.PUBACK)[2] == b"\x12\x34"
    c.send(mb.publish(uniq.topic(), b"2", qos=2, pid=0xBEEF))
    assert c.expect(mb.PUBREC)[2] == b"\xbe\xef"
    c.send(mb.pubrel(0xBEEF))
    assert c.expect(mb.PUBCOMP)[2] == b"\xbe\xef"


def test_MQTT_2_3_1_7_suback_unsuback_carry_the_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-2.3.1-7] Similarly SUBACK and UNSUBACK MUST contain the Packet Identifier that
    was used in the corresponding SUBSCRIBE and UNSUBSCRIBE Packet respectively."""
    c = mqtt(b, uniq.cid("a"), version=V)
    c.send(mb.subscribe(0x7777, [(uniq.topic(), 1)]))
    assert mb.parse_suback(c.expect(mb.SUBACK)[2]).pid == 0x7777
    c.send(mb.unsubscribe(0x8888, [uniq.topic()]))
    assert c.expect(mb.UNSUBACK)[2] == b"\x88\x88"


# -- 3.1 CONNECT ---------------------------------------------------------------------------------


def test_MQTT_3_1_0_1_first_packet_must_be_connect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.0-1] After a Network Connection is established by a Client to a Server, the
    first Packet sent from the Client to the Server MUST be a CONNECT Packet."""
    for first in (mb.pingreq(), mb.publish("a/b", b"x"), mb.subscribe(1, [("a/b", 0)])):
        c = mqtt.raw(b)
        c.send(first)
        assert c.expect_closed(3)
        assert not c.before_close, [mb.describe(p) for p in c.before_close]


def test_MQTT_3_1_0_2_second_connect_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.0-2] The Server MUST process a second CONNECT Packet sent from a Client as a
    protocol violation and disconnect the Client."""
    cid = uniq.cid("c")
    c = mqtt(b, cid, version=V)
    c.try_send(mb.connect(cid, version=V))
    closed(c)


def test_MQTT_3_1_2_1_wrong_protocol_name(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-1] If the protocol name is incorrect the Server MAY disconnect the Client,
    or it MAY continue processing the CONNECT packet in accordance with some other
    specification. In the latter case, the Server MUST NOT continue to process the CONNECT
    packet in line with this specification."""
    for name in (b"MQTX", b"mqtt", b"MQIsdp"):
        refused_connect(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("n")), level=4, name=name))


def test_MQTT_3_1_2_2_unsupported_protocol_level(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-2] The Server MUST respond to the CONNECT Packet with a CONNACK return code
    0x01 (unacceptable protocol level) and then disconnect the Client if the Protocol Level is
    not supported by the Server."""
    for level in (0, 2, 6, 7, 0x84):
        sent = refused_connect(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("l")), level=level))
        assert [p[2] for p in sent] == [b"\x00\x01"], (level, sent)


def test_MQTT_3_1_2_3_reserved_connect_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-3] The Server MUST validate that the reserved flag in the CONNECT Control
    Packet is set to zero and disconnect the Client if it is not zero."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("r"), version=V, flags_override=0x03))


def test_MQTT_3_1_2_4_clean_session_0_resumes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-4] If CleanSession is set to 0, the Server MUST resume communications with
    the Client based on state from the current Session (as identified by the Client
    identifier)."""
    cid, topic = uniq.cid("r"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(b, cid, version=V, clean=False)
    assert c2.connack.session_present  # type: ignore[attr-defined]
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"resumed", qos=1)
    assert c2.recv_publish().payload == b"resumed"


def test_MQTT_3_1_2_5_session_kept_after_disconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-5] After the disconnection of a Session that had CleanSession set to 0,
    the Server MUST store further QoS 1 and QoS 2 messages that match any subscriptions that
    the client had at the time of disconnection as part of the Session state."""
    cid, topic = uniq.cid("k"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 2)
    c.disconnect()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"q1", qos=1)
    p.publish(topic, b"q2", qos=2)
    p.publish(topic, b"q0", qos=0)
    c2 = mqtt(b, cid, version=V, clean=False)
    got = [m.payload for m in c2.drain_publishes(first_timeout=3)]
    assert got[:2] == [b"q1", b"q2"], got


def test_MQTT_3_1_2_6_clean_session_1_discards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-6] If CleanSession is set to 1, the Client and Server MUST discard any
    previous Session and start a new one. This Session lasts as long as the Network
    Connection."""
    cid, topic = uniq.cid("d"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    c2 = mqtt(b, cid, version=V, clean=True)
    assert not c2.connack.session_present  # type: ignore[attr-defined]
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"gone", qos=1)
    quiet(c2)
    c2.disconnect()
    c3 = mqtt(b, cid, version=V, clean=False)
    assert not c3.connack.session_present, "a clean session outlived its connection"  # type: ignore[attr-defined]


def test_MQTT_3_1_2_7_retained_messages_outlive_the_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-7] Retained messages do not form part of the Session state in the Server,
    they MUST NOT be deleted when the Session ends. (The specification prints this number as
    [MQTT-3.1.2.7].)"""
    topic = uniq.topic()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"kept", qos=1, retain=True)
    p.disconnect()
    msg = sub(mqtt, b, uniq, topic).recv_publish()
    assert msg.payload == b"kept" and msg.retain


def _will_client(b: Broker, mqtt: Clients, uniq: Uniq, topic: str, retain: bool = False,
                 qos: int = 1) -> mb.RawClient:
    return mqtt(b, uniq.cid("w"), version=V, will=mb.Will(topic, b"will", qos=qos, retain=retain))


def test_MQTT_3_1_2_8_will_published_on_network_close(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-8] If the Will Flag is set to 1 this indicates that, if the Connect request
    is accepted, a Will Message MUST be stored on the Server and associated with the Network
    Connection. The Will Message MUST be published when the Network Connection is
    subsequently closed unless the Will Message has been deleted by the Server on receipt of
    a DISCONNECT Packet."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will_client(b, mqtt, uniq, topic).abort()
    msg = s.recv_publish()
    assert (msg.topic, msg.payload) == (topic, b"will")


def test_MQTT_3_1_2_9_will_fields_must_be_present(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-9] If the Will Flag is set to 1, the Will QoS and Will Retain fields in the
    Connect Flags will be used by the Server, and the Will Topic and Will Message fields MUST
    be present in the payload."""
    closed_silently_after_connect(b, mqtt, body_connect(0x06, mb.mqtt_str(uniq.cid("w"))))
    closed_silently_after_connect(b, mqtt, body_connect(0x06, mb.mqtt_str(uniq.cid("w")) + mb.mqtt_str("w/t")))


def test_MQTT_3_1_2_10_will_removed_on_disconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-10] The Will Message MUST be removed from the stored Session state in the
    Server once it has been published or the Server has received a DISCONNECT packet from
    the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will_client(b, mqtt, uniq, topic).disconnect()
    quiet(s, 0.8)


def test_MQTT_3_1_2_11_no_will_fields_without_will_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-11] If the Will Flag is set to 0 the Will QoS and Will Retain fields in the
    Connect Flags MUST be set to zero and the Will Topic and Will Message fields MUST NOT be
    present in the payload."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("w"), version=V, flags_override=0x0A))
    closed_silently_after_connect(
        b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("w")) + mb.mqtt_str("w/t") + mb.mqtt_bin(b"m")))


def test_MQTT_3_1_2_12_no_will_published_without_will_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-12] If the Will Flag is set to 0, a Will Message MUST NOT be published when
    this Network Connection ends."""
    s = sub(mqtt, b, uniq, "#", 0)
    s.drain_publishes(0.2)
    mqtt(b, uniq.cid("n"), version=V).abort()
    for m in s.drain_publishes(0.6):
        assert not m.topic.startswith("t/"), f"something was published for a will-less client: {m}"


def test_MQTT_3_1_2_13_will_qos_zero_without_will_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-13] If the Will Flag is set to 0, then the Will QoS MUST be set to 0
    (0x00)."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("q"), version=V, flags_override=0x12))


def test_MQTT_3_1_2_14_will_qos_3_refused(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-14] If the Will Flag is set to 1, the value of Will QoS can be 0 (0x00), 1
    (0x01), or 2 (0x02). It MUST NOT be 3 (0x03)."""
    will = mb.mqtt_str("w/t") + mb.mqtt_bin(b"p")
    closed_silently_after_connect(b, mqtt, body_connect(0x1E, mb.mqtt_str(uniq.cid("q")) + will))


def test_MQTT_3_1_2_15_will_retain_zero_without_will_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-15] If the Will Flag is set to 0, then the Will Retain Flag MUST be set to
    0."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("r"), version=V, flags_override=0x22))


def test_MQTT_3_1_2_16_will_retain_0_published_not_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-16] If the Will Flag is set to 1 and If Will Retain is set to 0, the Server
    MUST publish the Will Message as a non-retained message."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will_client(b, mqtt, uniq, topic, retain=False).abort()
    assert not s.recv_publish().retain
    quiet(sub(mqtt, b, uniq, topic))


def test_MQTT_3_1_2_17_will_retain_1_published_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-17] If the Will Flag is set to 1 and If Will Retain is set to 1, the Server
    MUST publish the Will Message as a retained message."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    _will_client(b, mqtt, uniq, topic, retain=True).abort()
    s.recv_publish()
    late = sub(mqtt, b, uniq, topic).recv_publish()
    assert late.retain and late.payload == b"will"


def test_MQTT_3_1_2_18_no_user_name_without_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-18] If the User Name Flag is set to 0, a user name MUST NOT be present in
    the payload."""
    closed_silently_after_connect(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("u")) + mb.mqtt_str("user")))


def test_MQTT_3_1_2_19_user_name_present_with_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-19] If the User Name Flag is set to 1, a user name MUST be present in the
    payload."""
    closed_silently_after_connect(b, mqtt, body_connect(0x82, mb.mqtt_str(uniq.cid("u"))))


def test_MQTT_3_1_2_20_no_password_without_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-20] If the Password Flag is set to 0, a password MUST NOT be present in the
    payload."""
    closed_silently_after_connect(
        b, mqtt, body_connect(0x82, mb.mqtt_str(uniq.cid("p")) + mb.mqtt_str("user") + mb.mqtt_bin(b"pw")))


def test_MQTT_3_1_2_21_password_present_with_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-21] If the Password Flag is set to 1, a password MUST be present in the
    payload."""
    closed_silently_after_connect(b, mqtt, body_connect(0xC2, mb.mqtt_str(uniq.cid("p")) + mb.mqtt_str("user")))


def test_MQTT_3_1_2_22_password_flag_needs_user_name_flag(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-22] If the User Name Flag is set to 0, the Password Flag MUST be set to
    0."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("p"), version=V, password=b"x", flags_override=0x42))


def test_MQTT_3_1_2_24_keep_alive_one_and_a_half_times(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.2-24] If the Keep Alive value is non-zero and the Server does not receive a
    Control Packet from the Client within one and a half times the Keep Alive time period,
    it MUST disconnect the Network Connection to the Client as if the network had failed."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = mqtt(b, uniq.cid("k"), version=V, keepalive=1, will=mb.Will(topic, b"timed out"))
    quiet(c, 1.0)  # not before the keep alive
    closed(c, timeout=3.0)
    assert s.recv_publish().payload == b"timed out", "as if the network had failed: the will goes out"


# -- 3.1.3 payload -------------------------------------------------------------------------------


def test_MQTT_3_1_3_1_payload_fields_in_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-1] These fields, if present, MUST appear in the order Client Identifier,
    Will Topic, Will Message, User Name, Password."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = mqtt(b, uniq.cid("o"), version=V, will=mb.Will(topic, b"in order"), username="u", password=b"p")
    c.abort()
    assert s.recv_publish().payload == b"in order"


def test_MQTT_3_1_3_2_client_id_identifies_the_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-2] Each Client connecting to the Server has a unique ClientId. The ClientId
    MUST be used by Clients and by Servers to identify state that they hold relating to this
    MQTT Session between the Client and the Server."""
    cid, topic = uniq.cid("i"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    other = mqtt(b, uniq.cid("o"), version=V, clean=False)
    assert not other.connack.session_present  # type: ignore[attr-defined]
    assert mqtt(b, cid, version=V, clean=False).connack.session_present  # type: ignore[attr-defined]


def test_MQTT_3_1_3_3_client_id_must_be_present(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-3] The Client Identifier (ClientId) MUST be present and MUST be the first
    field in the CONNECT packet payload."""
    closed_silently_after_connect(b, mqtt, body_connect(0x02, b""))
    closed_silently_after_connect(b, mqtt, body_connect(0x02, b"\x00"))


def test_MQTT_3_1_3_4_client_id_utf8(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-4] The ClientId MUST be a UTF-8 encoded string as defined in Section
    1.5.3."""
    for cid in (b"\xff\xfe", b"a\xed\xa0\x80", b"a\x00b"):
        refused_connect(b, mqtt, mb.connect(cid, version=V))


def test_MQTT_3_1_3_5_client_ids_1_to_23_alphanumerics(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-5] The Server MUST allow ClientIds which are between 1 and 23 UTF-8
    encoded bytes in length, and that contain only the characters
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"."""
    chars = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for cid in ("a", "Z", chars[:23], chars[23:46], chars[39:]):
        mqtt(b, cid, version=V).disconnect()


def test_MQTT_3_1_3_6_empty_client_id_is_assigned(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-6] A Server MAY allow a Client to supply a ClientId that has a length of
    zero bytes, however if it does so the Server MUST treat this as a special case and assign
    a unique ClientId to that Client. It MUST then process the CONNECT packet as if the
    Client had provided that unique ClientId."""
    topic = uniq.topic()
    one = mqtt(b, "", version=V)
    two = mqtt(b, "", version=V)
    one.subscribe(topic, 1)
    two.subscribe(topic, 1)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"both", qos=1)
    assert one.recv_publish().payload == b"both"
    assert two.recv_publish().payload == b"both", "the second empty id took over the first"


def test_MQTT_3_1_3_8_empty_client_id_with_clean_session_0(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-8] If the Client supplies a zero-byte ClientId with CleanSession set to 0,
    the Server MUST respond to the CONNECT Packet with a CONNACK return code 0x02 (Identifier
    rejected) and then close the Network Connection."""
    sent = refused_connect(b, mqtt, mb.connect("", version=V, clean=False))
    assert [p[2] for p in sent] == [b"\x00\x02"]


def test_MQTT_3_1_3_9_rejected_client_id(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.1.3-9] If the Server rejects the ClientId it MUST respond to the CONNECT Packet
    with a CONNACK return code 0x02 (Identifier rejected) and then close the Network
    Connection."""
    sent = refused_connect(b, mqtt, mb.connect("x" * 2000, version=V))
    assert [p[2] for p in sent] == [b"\x00\x02"]


def test_MQTT_3_1_3_10_will_topic_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-10] The Will Topic MUST be a UTF-8 encoded string as defined in Section
    1.5.3."""
    refused_connect(b, mqtt, mb.connect(uniq.cid("w"), version=V, will=mb.Will(b"w/\xff", b"p")))


def test_MQTT_3_1_3_11_user_name_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.3-11] The User Name MUST be a UTF-8 encoded string as defined in Section
    1.5.3."""
    refused_connect(b, mqtt, mb.connect(uniq.cid("u"), version=V, username=b"\xc3\x28"))


def test_MQTT_3_1_4_1_nonconforming_connect_closed_without_connack(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-1] The Server MUST validate that the CONNECT Packet conforms to section 3.1
    and close the Network Connection without sending a CONNACK if it does not conform."""
    cid = mb.mqtt_str(uniq.cid("t"))
    closed_silently_after_connect(b, mqtt, mb.fixed(mb.CONNECT, 0, mb.mqtt_str("MQTT") + bytes([4, 2]) + mb.u16(60) + b"\x00\x05ab"))
    closed_silently_after_connect(b, mqtt, b"\x11" + mb.connect(uniq.cid("f"), version=V)[1:])
    closed_silently_after_connect(b, mqtt, body_connect(0x02, cid + b"trailing"))


def test_MQTT_3_1_4_2_existing_client_disconnected(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-2] If the ClientId represents a Client already connected to the Server then
    the Server MUST disconnect the existing Client."""
    cid = uniq.cid("t")
    old = mqtt(b, cid, version=V)
    new = mqtt(b, cid, version=V)
    closed(old)
    new.ping()


def test_MQTT_3_1_4_3_clean_session_processing(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-3] The Server MUST perform the processing of CleanSession that is described
    in section 3.1.2.4."""
    cid, topic = uniq.cid("c"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"queued", qos=1)
    c2 = mqtt(b, cid, version=V, clean=True)
    assert not c2.connack.session_present  # type: ignore[attr-defined]
    quiet(c2)


def test_MQTT_3_1_4_4_connack_zero_return_code(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-4] The Server MUST acknowledge the CONNECT Packet with a CONNACK Packet
    containing a zero return code."""
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("a"), version=V))
    _t, flags, body = c.expect(mb.CONNACK)
    assert (flags, body) == (0, b"\x00\x00")


def test_MQTT_3_1_4_5_nothing_processed_after_a_refused_connect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.1.4-5] If the Server rejects the CONNECT, it MUST NOT process any data sent by
    the Client after the CONNECT Packet."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = mqtt.raw(b)
    c.send(body_connect(0x02, mb.mqtt_str(uniq.cid("r")), level=9)
           + mb.publish(topic, b"after refusal", retain=True))
    assert c.expect_closed(3)
    quiet(s, 0.6)
    quiet(sub(mqtt, b, uniq, topic))


# -- 3.2 CONNACK ---------------------------------------------------------------------------------


def test_MQTT_3_2_0_1_first_packet_from_server_is_connack(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.0-1] The first packet sent from the Server to the Client MUST be a CONNACK
    Packet."""
    cid, topic = uniq.cid("q"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"waiting", qos=1)
    c2 = mqtt.raw(b)
    c2.send(mb.connect(cid, version=V, clean=False))
    first = c2.recv_packet()
    assert first is not None and first[0] == mb.CONNACK, mb.describe(first)


def test_MQTT_3_2_2_1_session_present_0_with_clean_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-1] If the Server accepts a connection with CleanSession set to 1, the
    Server MUST set Session Present to 0 in the CONNACK packet in addition to setting a zero
    return code in the CONNACK packet."""
    cid = uniq.cid("c")
    mqtt(b, cid, version=V, clean=False).disconnect()
    ack = mqtt(b, cid, version=V, clean=True).connack  # type: ignore[attr-defined]
    assert (ack.session_present, ack.rc) == (False, 0)


def test_MQTT_3_2_2_2_session_present_1_when_resumed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-2] If the Server accepts a connection with CleanSession set to 0, the value
    set in Session Present depends on whether the Server already has stored Session state for
    the supplied client ID. If the Server has stored Session state, it MUST set Session
    Present to 1 in the CONNACK packet."""
    cid = uniq.cid("c")
    mqtt(b, cid, version=V, clean=False).disconnect()
    ack = mqtt(b, cid, version=V, clean=False).connack  # type: ignore[attr-defined]
    assert (ack.session_present, ack.rc) == (True, 0)


def test_MQTT_3_2_2_3_session_present_0_without_stored_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-3] If the Server does not have stored Session state, it MUST set Session
    Present to 0 in the CONNACK packet. This is in addition to setting a zero return code in
    the CONNACK packet."""
    ack = mqtt(b, uniq.cid("c"), version=V, clean=False).connack  # type: ignore[attr-defined]
    assert (ack.session_present, ack.rc) == (False, 0)


def test_MQTT_3_2_2_4_session_present_0_with_nonzero_return_code(b: Broker, mqtt: Clients) -> None:
    """[MQTT-3.2.2-4] If a server sends a CONNACK packet containing a non-zero return code it
    MUST set Session Present to 0."""
    sent = refused_connect(b, mqtt, mb.connect("", version=V, clean=False))
    assert sent and sent[0][2][0] == 0


def test_MQTT_3_2_2_5_nonzero_return_code_then_close(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-5] If a server sends a CONNACK packet containing a non-zero return code it
    MUST then close the Network Connection."""
    sent = refused_connect(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("l")), level=5 + 1))
    assert len(sent) == 1


def test_MQTT_3_2_2_6_no_applicable_return_code_close_without_connack(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.2.2-6] If none of the return codes listed in Table 3.1 - Connect Return code
    values are deemed applicable, then the Server MUST close the Network Connection without
    sending a CONNACK."""
    closed_silently_after_connect(b, mqtt, mb.connect(uniq.cid("n"), version=V, flags_override=0x01))


# -- 3.3 PUBLISH ---------------------------------------------------------------------------------


def _offline_then_back(b: Broker, mqtt: Clients, uniq: Uniq, qos: int) -> tuple[str, mb.RawClient, mb.Publish]:
    """A persistent subscriber gets a message, does not acknowledge it and drops; returns
    (client id, the reconnected client, the first copy)."""
    cid, topic = uniq.cid("r"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, qos)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"redeliver me", qos=qos)
    first = c.recv_publish(ack=False)
    c.abort()
    c2 = mqtt(b, cid, version=V, clean=False)
    return cid, c2, first


def test_MQTT_3_3_1_1_dup_set_on_redelivery(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-1] The DUP flag MUST be set to 1 by the Client or Server when it attempts to
    re-deliver a PUBLISH Packet."""
    _, c2, first = _offline_then_back(b, mqtt, uniq, 1)
    again = c2.recv_publish()
    assert not first.dup
    assert again.dup and again.pid == first.pid and again.payload == first.payload


def test_MQTT_3_3_1_2_dup_0_for_qos_0(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-2] The DUP flag MUST be set to 0 for all QoS 0 messages."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 0)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.send(mb.publish(topic, b"dup", qos=1, pid=5, dup=True))
    p.expect(mb.PUBACK)
    msg = s.recv_publish()
    assert msg.qos == 0 and not msg.dup


def test_MQTT_3_3_1_3_dup_not_propagated(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-3] The DUP flag in the outgoing PUBLISH packet is set independently to the
    incoming PUBLISH packet, its value MUST be determined solely by whether the outgoing
    PUBLISH packet is a retransmission."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.send(mb.publish(topic, b"dup", qos=1, pid=6, dup=True))
    p.expect(mb.PUBACK)
    msg = s.recv_publish()
    assert msg.qos == 1 and not msg.dup


def test_MQTT_3_3_1_4_qos_3_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-4] A PUBLISH Packet MUST NOT have both QoS bits set to 1. If a Server or
    Client receives a PUBLISH Packet which has both QoS bits set to 1 it MUST close the
    Network Connection."""
    c = mqtt(b, uniq.cid("q"), version=V)
    c.try_send(mb.fixed(mb.PUBLISH, 0b0110, mb.mqtt_str("a/b") + mb.u16(1) + b"x"))
    closed(c)


def test_MQTT_3_3_1_5_retained_message_stored(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-5] If the RETAIN flag is set to 1, in a PUBLISH Packet sent by a Client to a
    Server, the Server MUST store the Application Message and its QoS, so that it can be
    delivered to future subscribers whose subscriptions match its topic name."""
    topic = uniq.topic()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"stored", qos=2, retain=True)
    msg = sub(mqtt, b, uniq, topic, 2).recv_publish()
    assert (msg.payload, msg.qos, msg.retain) == (b"stored", 2, True)


def test_MQTT_3_3_1_6_new_subscription_gets_last_retained(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-6] When a new subscription is established, the last retained message, if
    any, on each matching topic name MUST be sent to the subscriber."""
    base = uniq.topic()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(base + "/a", b"a1", qos=1, retain=True)
    p.publish(base + "/a", b"a2", qos=1, retain=True)
    p.publish(base + "/b", b"b1", qos=1, retain=True)
    got = sorted((m.topic, m.payload) for m in sub(mqtt, b, uniq, base + "/+").drain_publishes(first_timeout=3))
    assert got == [(base + "/a", b"a2"), (base + "/b", b"b1")]


def test_MQTT_3_3_1_7_qos0_retained_replaces(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-7] If the Server receives a QoS 0 message with the RETAIN flag set to 1 it
    MUST discard any message previously retained for that topic. It SHOULD store the new QoS
    0 message as the new retained message for that topic, but MAY choose to discard it at
    any time."""
    topic = uniq.topic()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"old", qos=1, retain=True)
    p.publish(topic, b"new", qos=0, retain=True)
    p.ping()
    got = [m.payload for m in sub(mqtt, b, uniq, topic).drain_publishes(first_timeout=1)]
    assert b"old" not in got and got in ([b"new"], [])


def test_MQTT_3_3_1_8_retain_1_for_new_subscription(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-8] When sending a PUBLISH Packet to a Client the Server MUST set the RETAIN
    flag to 1 if a message is sent as a result of a new subscription being made by a
    Client."""
    topic = uniq.topic()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"r", qos=1, retain=True)
    assert sub(mqtt, b, uniq, topic).recv_publish().retain


def test_MQTT_3_3_1_9_retain_0_for_established_subscription(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-9] It MUST set the RETAIN flag to 0 when a PUBLISH Packet is sent to a
    Client because it matches an established subscription regardless of how the flag was set
    in the message it received."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"live", qos=1, retain=True)
    assert not s.recv_publish().retain


def test_MQTT_3_3_1_10_zero_byte_retained_removes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-10] A PUBLISH Packet with a RETAIN flag set to 1 and a payload containing
    zero bytes will be processed as normal by the Server and sent to Clients with a
    subscription matching the topic name. Additionally any existing retained message with the
    same topic name MUST be removed and any future subscribers for the topic will not receive
    a retained message."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"x", qos=1, retain=True)
    p.publish(topic, b"", qos=1, retain=True)
    assert [m.payload for m in s.recv_publishes(2)] == [b"x", b""]
    quiet(sub(mqtt, b, uniq, topic))


def test_MQTT_3_3_1_11_zero_byte_retained_not_stored(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-11] A zero byte retained message MUST NOT be stored as a retained message on
    the Server."""
    topic = uniq.topic()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"", qos=1, retain=True)
    quiet(sub(mqtt, b, uniq, topic))


def test_MQTT_3_3_1_12_retain_0_neither_stores_nor_removes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.1-12] If the RETAIN flag is 0, in a PUBLISH Packet sent by a Client to a
    Server, the Server MUST NOT store the message and MUST NOT remove or replace any existing
    retained message."""
    topic = uniq.topic()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"kept", qos=1, retain=True)
    p.publish(topic, b"plain", qos=1)
    p.publish(topic, b"", qos=1)
    got = [m.payload for m in sub(mqtt, b, uniq, topic).drain_publishes(first_timeout=3)]
    assert got == [b"kept"]


def test_MQTT_3_3_2_1_topic_name_present_and_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-1] The Topic Name MUST be present as the first field in the PUBLISH Packet
    Variable header. It MUST be a UTF-8 encoded string."""
    for bad in (mb.fixed(mb.PUBLISH, 0, b"\x00\x10ab"), mb.fixed(mb.PUBLISH, 2, b"\x00"),
                mb.publish(b"a/\xc0\xaf", b"x")):
        c = mqtt(b, uniq.cid("t"), version=V)
        c.try_send(bad)
        closed(c)


def test_MQTT_3_3_2_2_topic_name_without_wildcards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-2] The Topic Name in the PUBLISH Packet MUST NOT contain wildcard
    characters."""
    for topic in ("a/+", "a/#", "+", "#", "a/b+"):
        c = mqtt(b, uniq.cid("w"), version=V)
        c.try_send(mb.publish(topic, b"x", qos=1, pid=1))
        closed(c)


def test_MQTT_3_3_2_3_topic_name_matches_the_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.2-3] The Topic Name in a PUBLISH Packet sent by a Server to a subscribing
    Client MUST match the Subscription's Topic Filter according to the matching process
    defined in Section 4.7."""
    base = uniq.topic()
    s = sub(mqtt, b, uniq, base + "/+/z")
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(base + "/y/q", b"no", qos=1)
    p.publish(base + "/y/z", b"yes", qos=1)
    msg = s.recv_publish()
    assert (msg.topic, msg.payload) == (base + "/y/z", b"yes")
    quiet(s)


def test_MQTT_3_3_4_1_response_by_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.4-1] The receiver of a PUBLISH Packet MUST respond according to Table 3.4 -
    Expected Publish Packet response as determined by the QoS in the PUBLISH Packet."""
    c = mqtt(b, uniq.cid("r"), version=V)
    topic = uniq.topic()
    c.send(mb.publish(topic, b"0") + mb.publish(topic, b"1", qos=1, pid=1)
           + mb.publish(topic, b"2", qos=2, pid=2))
    assert c.recv_packet() == (mb.PUBACK, 0, b"\x00\x01")
    assert c.recv_packet() == (mb.PUBREC, 0, b"\x00\x02")
    c.send(mb.pubrel(2))
    assert c.recv_packet() == (mb.PUBCOMP, 0, b"\x00\x02")
    quiet(c)


def test_MQTT_3_3_5_1_overlapping_subscriptions_max_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.5-1] The Server MUST deliver the message to the Client respecting the maximum
    QoS of all the matching subscriptions."""
    base = uniq.topic()
    s = mqtt(b, uniq.cid("s"), version=V)
    s.subscribe([(base + "/+", 0), (base + "/x", 2)])
    mqtt(b, uniq.cid("p"), version=V).publish(base + "/x", b"o", qos=2)
    got = s.drain_publishes(first_timeout=3)
    assert got and max(m.qos for m in got) == 2, got


def test_MQTT_3_3_5_2_unauthorized_publish_acknowledged_or_closed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.3.5-2] If a Server implementation does not authorize a PUBLISH to be performed
    by a Client; it has no way of informing that Client. It MUST either make a positive
    acknowledgement, according to the normal QoS rules, or close the Network Connection."""
    s = sub(mqtt, b, uniq, "denied/#")
    c = mqtt(b, uniq.cid("d"), version=V)
    assert c.publish("denied/x", b"no", qos=1) is not None
    comp = c.publish("denied/y", b"no", qos=2)
    assert comp is not None and comp.pid
    quiet(s)


# -- 3.6 PUBREL, 3.8 SUBSCRIBE, 3.9 SUBACK -----------------------------------------------------


def test_MQTT_3_6_1_1_pubrel_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.6.1-1] Bits 3,2,1 and 0 of the fixed header in the PUBREL Control Packet are
    reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
    value as malformed and close the Network Connection."""
    for flags in (0, 1, 3, 0xA):
        c = mqtt(b, uniq.cid("r"), version=V)
        c.send(mb.publish(uniq.topic(), b"x", qos=2, pid=1))
        c.expect(mb.PUBREC)
        c.try_send(mb.fixed(mb.PUBREL, flags, mb.u16(1)))
        closed(c)


def test_MQTT_3_8_1_1_subscribe_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.1-1] Bits 3,2,1 and 0 of the fixed header of the SUBSCRIBE Control Packet are
    reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
    value as malformed and close the Network Connection."""
    for flags in (0, 3, 8):
        c = mqtt(b, uniq.cid("f"), version=V)
        c.try_send(mb.subscribe(1, [("a/b", 0)], flags=flags))
        closed(c)


def test_MQTT_3_8_3_1_topic_filters_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-1] The Topic Filters in a SUBSCRIBE packet payload MUST be UTF-8 encoded
    strings as defined in Section 1.5.3."""
    c = mqtt(b, uniq.cid("u"), version=V)
    c.try_send(mb.subscribe(1, [(b"a/\xc3", 0)]))
    closed(c)


def test_MQTT_3_8_3_3_subscribe_needs_a_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.3-3] The payload of a SUBSCRIBE packet MUST contain at least one Topic Filter
    / QoS pair. A SUBSCRIBE packet with no payload is a protocol violation."""
    c = mqtt(b, uniq.cid("e"), version=V)
    c.try_send(mb.subscribe(1, []))
    closed(c)


def test_MQTT_3_8_3_4_requested_qos_reserved_bits(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3-8.3-4] The Server MUST treat a SUBSCRIBE packet as malformed and close the
    Network Connection if any of Reserved bits in the payload are non-zero, or QoS is not 0,1
    or 2."""
    for options in (3, 0x04, 0x80, 0xC1):
        c = mqtt(b, uniq.cid("q"), version=V)
        c.try_send(mb.subscribe(1, [("a/b", options)]))
        closed(c)


def test_MQTT_3_8_4_1_suback_for_subscribe(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-1] When the Server receives a SUBSCRIBE Packet from a Client, the Server
    MUST respond with a SUBACK Packet."""
    c = mqtt(b, uniq.cid("s"), version=V)
    c.send(mb.subscribe(3, [(uniq.topic(), 1)]))
    assert c.expect(mb.SUBACK) == (mb.SUBACK, 0, b"\x00\x03\x01")


def test_MQTT_3_8_4_2_suback_same_identifier(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-2] The SUBACK Packet MUST have the same Packet Identifier as the SUBSCRIBE
    Packet that it is acknowledging."""
    c = mqtt(b, uniq.cid("s"), version=V)
    for pid in (1, 0x00FF, 0xFF00, 0xFFFF):
        c.send(mb.subscribe(pid, [(uniq.topic(), 0)]))
        assert mb.parse_suback(c.expect(mb.SUBACK)[2]).pid == pid


def test_MQTT_3_8_4_3_identical_filter_replaces(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-3] If a Server receives a SUBSCRIBE Packet containing a Topic Filter that
    is identical to an existing Subscription's Topic Filter then it MUST completely replace
    that existing Subscription with a new Subscription. The Topic Filter in the new
    Subscription will be identical to that in the previous Subscription, although its
    maximum QoS value could be different. Any existing retained messages matching the Topic
    Filter MUST be re-sent, but the flow of publications MUST NOT be interrupted."""
    topic = uniq.topic()
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"retained", qos=1, retain=True)
    s = mqtt(b, uniq.cid("s"), version=V)
    assert s.subscribe(topic, 0) == [0]
    assert s.recv_publish().payload == b"retained"
    assert s.subscribe(topic, 2) == [2]
    again = s.recv_publish()
    assert again.payload == b"retained" and again.retain
    p.publish(topic, b"once", qos=2)
    msgs = s.drain_publishes(first_timeout=3)
    assert [(m.payload, m.qos) for m in msgs] == [(b"once", 2)]


def test_MQTT_3_8_4_4_several_filters_as_several_subscribes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-4] If a Server receives a SUBSCRIBE packet that contains multiple Topic
    Filters it MUST handle that packet as if it had received a sequence of multiple SUBSCRIBE
    packets, except that it combines their responses into a single SUBACK response."""
    t1, t2 = uniq.topic(), uniq.topic()
    s = mqtt(b, uniq.cid("s"), version=V)
    s.send(mb.subscribe(4, [(t1, 1), (t2, 1)]))
    assert s.expect(mb.SUBACK)[2] == b"\x00\x04\x01\x01"
    quiet(s)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(t1, b"1", qos=1)
    p.publish(t2, b"2", qos=1)
    assert [m.payload for m in s.recv_publishes(2)] == [b"1", b"2"]


def test_MQTT_3_8_4_5_return_code_per_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-5] The SUBACK Packet sent by the Server to the Client MUST contain a return
    code for each Topic Filter/QoS pair."""
    s = mqtt(b, uniq.cid("s"), version=V)
    s.send(mb.subscribe(5, [(uniq.topic(), 0), ("a/#/b", 1), (uniq.topic(), 2)]))
    assert mb.parse_suback(s.expect(mb.SUBACK)[2]).codes == [0, 0x80, 2]


def test_MQTT_3_8_4_6_delivered_at_the_lower_qos(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.8.4-6] The Server might grant a lower maximum QoS than the subscriber
    requested. The QoS of Payload Messages sent in response to a Subscription MUST be the
    minimum of the QoS of the originally published message and the maximum QoS granted by the
    Server."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(topic, b"2", qos=2)
    p.publish(topic, b"0", qos=0)
    assert [(m.payload, m.qos) for m in s.recv_publishes(2)] == [(b"2", 1), (b"0", 0)]


def test_MQTT_3_9_3_1_return_codes_in_filter_order(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.9.3-1] The order of return codes in the SUBACK Packet MUST match the order of
    Topic Filters in the SUBSCRIBE Packet."""
    s = mqtt(b, uniq.cid("s"), version=V)
    assert s.subscribe([(uniq.topic(), 2), (uniq.topic(), 0), (uniq.topic(), 1)]) == [2, 0, 1]


def test_MQTT_3_9_3_2_only_allowed_return_codes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.9.3-2] SUBACK return codes other than 0x00, 0x01, 0x02 and 0x80 are reserved
    and MUST NOT be used."""
    s = mqtt(b, uniq.cid("s"), version=V)
    codes = s.subscribe([("a#", 1), ("a/+b", 2), ("$SYS/#", 1), ("denied/#", 1), (uniq.topic(), 0)])
    assert set(codes) <= {0, 1, 2, 0x80}, codes


# -- 3.10 UNSUBSCRIBE, 3.12 PINGREQ, 3.14 DISCONNECT --------------------------------------------


def test_MQTT_3_10_1_1_unsubscribe_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.1-1] Bits 3,2,1 and 0 of the fixed header of the UNSUBSCRIBE Control Packet
    are reserved and MUST be set to 0,0,1 and 0 respectively. The Server MUST treat any other
    value as malformed and close the Network Connection."""
    for flags in (0, 3, 0xA):
        c = mqtt(b, uniq.cid("f"), version=V)
        c.try_send(mb.unsubscribe(1, ["a/b"], flags=flags))
        closed(c)


def test_MQTT_3_10_3_1_unsubscribe_filters_utf8(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.3-1] The Topic Filters in an UNSUBSCRIBE packet MUST be UTF-8 encoded
    strings as defined in Section 1.5.3, packed contiguously."""
    c = mqtt(b, uniq.cid("u"), version=V)
    c.try_send(mb.unsubscribe(1, [b"a/\xff"]))
    closed(c)


def test_MQTT_3_10_3_2_unsubscribe_needs_a_filter(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.3-2] The Payload of an UNSUBSCRIBE packet MUST contain at least one Topic
    Filter. An UNSUBSCRIBE packet with no payload is a protocol violation."""
    c = mqtt(b, uniq.cid("e"), version=V)
    c.try_send(mb.unsubscribe(1, []))
    closed(c)


def test_MQTT_3_10_4_1_unsubscribe_compares_characters(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-1] The Topic Filters (whether they contain wildcards or not) supplied in
    an UNSUBSCRIBE packet MUST be compared character-by-character with the current set of
    Topic Filters held by the Server for the Client. If any filter matches exactly then its
    owning Subscription is deleted, otherwise no additional processing occurs."""
    base = uniq.topic()
    s = mqtt(b, uniq.cid("s"), version=V)
    s.subscribe([(base + "/x", 1), (base + "/+", 1)])
    s.unsubscribe([base + "/+/", base + "/#", base + "/X"])
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(base + "/x", b"still", qos=1)
    assert len(s.drain_publishes(first_timeout=3)) >= 1
    s.unsubscribe([base + "/+", base + "/x"])
    p.publish(base + "/x", b"gone", qos=1)
    quiet(s)


def test_MQTT_3_10_4_2_no_new_messages_after_unsubscribe(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-2] If a Server deletes a Subscription: It MUST stop adding any new messages
    for delivery to the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    s.unsubscribe([topic])
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"late", qos=1)
    quiet(s)


def test_MQTT_3_10_4_3_inflight_delivery_completed(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-3] If a Server deletes a Subscription: It MUST complete the delivery of any
    QoS 1 or QoS 2 messages which it has started to send to the Client."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"inflight", qos=2)
    msg = s.recv_publish(ack=False)
    s.unsubscribe([topic])
    assert msg.pid is not None
    s.send(mb.pubrec(msg.pid))
    assert s.expect(mb.PUBREL)[2] == mb.u16(msg.pid)
    s.send(mb.pubcomp(msg.pid))
    s.ping()


def test_MQTT_3_10_4_4_unsuback_for_unsubscribe(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-4] The Server MUST respond to an UNSUBSUBCRIBE request by sending an
    UNSUBACK packet. The UNSUBACK Packet MUST have the same Packet Identifier as the
    UNSUBSCRIBE Packet."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    s.send(mb.unsubscribe(0x4242, [topic]))
    assert s.expect(mb.UNSUBACK) == (mb.UNSUBACK, 0, b"\x42\x42")


def test_MQTT_3_10_4_5_unsuback_even_without_a_subscription(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-5] Even where no Topic Subscriptions are deleted, the Server MUST respond
    with an UNSUBACK."""
    c = mqtt(b, uniq.cid("u"), version=V)
    c.send(mb.unsubscribe(9, [uniq.topic()]))
    assert c.expect(mb.UNSUBACK) == (mb.UNSUBACK, 0, b"\x00\x09")


def test_MQTT_3_10_4_6_several_filters_one_unsuback(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.10.4-6] If a Server receives an UNSUBSCRIBE packet that contains multiple Topic
    Filters it MUST handle that packet as if it had received a sequence of multiple
    UNSUBSCRIBE packets, except that it sends just one UNSUBACK response."""
    t1, t2 = uniq.topic(), uniq.topic()
    s = mqtt(b, uniq.cid("s"), version=V)
    s.subscribe([(t1, 1), (t2, 1)])
    s.send(mb.unsubscribe(6, [t1, t2]))
    assert s.expect(mb.UNSUBACK)[2] == b"\x00\x06"
    p = mqtt(b, uniq.cid("p"), version=V)
    p.publish(t1, b"1", qos=1)
    p.publish(t2, b"2", qos=1)
    quiet(s)


def test_MQTT_3_12_4_1_pingresp(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.12.4-1] The Server MUST send a PINGRESP Packet in response to a PINGREQ
    Packet."""
    c = mqtt(b, uniq.cid("p"), version=V)
    c.send(mb.pingreq() + mb.pingreq())
    assert c.recv_packet() == (mb.PINGRESP, 0, b"")
    assert c.recv_packet() == (mb.PINGRESP, 0, b"")


def test_MQTT_3_14_1_1_disconnect_flags(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.1-1] The Server MUST validate that reserved bits are set to zero and
    disconnect the Client if they are not zero."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = _will_client(b, mqtt, uniq, topic)
    c.try_send(mb.fixed(mb.DISCONNECT, 1, b""))
    closed(c)
    assert s.recv_publish().payload == b"will", "a malformed DISCONNECT is no DISCONNECT: the will goes out"


def test_MQTT_3_14_4_3_disconnect_discards_the_will(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.4-3] On receipt of DISCONNECT the Server MUST discard any Will Message
    associated with the current connection without publishing it."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    c = _will_client(b, mqtt, uniq, topic)
    c.send(mb.disconnect())
    assert c.expect_closed(3)
    quiet(s, 0.8)


# -- 4 operational behaviour ---------------------------------------------------------------------


def test_MQTT_4_1_0_1_session_state_kept_for_the_session(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.1.0-1] The Client and Server MUST store Session state for the entire duration
    of the Session."""
    cid, topic = uniq.cid("s"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 1)
    c.abort()
    for i in range(3):
        mqtt(b, uniq.cid("p"), version=V).publish(topic, str(i), qos=1)
    c2 = mqtt(b, cid, version=V, clean=False)
    assert [m.payload for m in c2.recv_publishes(3)] == [b"0", b"1", b"2"]


def test_MQTT_4_1_0_2_session_lasts_as_long_as_the_connection(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.1.0-2] A Session MUST last at least as long it has an active Network
    Connection."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    s.ping()
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"alive", qos=1)
    assert s.recv_publish().payload == b"alive"


def test_MQTT_4_3_1_1_qos0_sent_at_most_once(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.1-1] In the QoS 0 delivery protocol, the Sender MUST send a PUBLISH packet
    with QoS=0, DUP=0."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"q0", qos=0)
    _t, flags, _ = s.expect(mb.PUBLISH)
    assert flags == 0
    quiet(s)


def test_MQTT_4_3_2_1_qos1_sender(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.2-1] In the QoS 1 delivery protocol, the Sender MUST assign an unused Packet
    Identifier each time it has a new Application Message to publish; MUST send a PUBLISH
    Packet containing this Packet Identifier with QoS=1, DUP=0; MUST treat the PUBLISH Packet
    as "unacknowledged" until it has received the corresponding PUBACK packet from the
    receiver."""
    _, c2, first = _offline_then_back(b, mqtt, uniq, 1)
    assert (first.qos, first.dup) == (1, False) and first.pid
    again = c2.recv_publish()
    assert again.pid == first.pid
    quiet(c2)


def test_MQTT_4_3_2_2_qos1_receiver(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.2-2] In the QoS 1 delivery protocol, the Receiver MUST respond with a PUBACK
    Packet containing the Packet Identifier from the incoming PUBLISH Packet, having accepted
    ownership of the Application Message. After it has sent a PUBACK Packet the Receiver
    MUST treat any incoming PUBLISH packet that contains the same Packet Identifier as being
    a new publication, irrespective of the setting of its DUP flag."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.send(mb.publish(topic, b"a", qos=1, pid=11))
    assert p.expect(mb.PUBACK)[2] == mb.u16(11)
    p.send(mb.publish(topic, b"b", qos=1, pid=11, dup=True))
    assert p.expect(mb.PUBACK)[2] == mb.u16(11)
    assert [m.payload for m in s.recv_publishes(2)] == [b"a", b"b"]


def test_MQTT_4_3_3_1_qos2_sender(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.3-1] In the QoS 2 delivery protocol, the Sender MUST assign an unused Packet
    Identifier when it has a new Application Message to publish; MUST send a PUBLISH packet
    containing this Packet Identifier with QoS=2, DUP=0; MUST treat the PUBLISH packet as
    "unacknowledged" until it has received the corresponding PUBREC packet from the receiver;
    MUST send a PUBREL packet when it receives a PUBREC packet from the receiver. This PUBREL
    packet MUST contain the same Packet Identifier as the original PUBLISH packet; MUST treat
    the PUBREL packet as "unacknowledged" until it has received the corresponding PUBCOMP
    packet from the receiver; MUST NOT re-send the PUBLISH once it has sent the corresponding
    PUBREL packet."""
    cid, topic = uniq.cid("r"), uniq.topic()
    c = mqtt(b, cid, version=V, clean=False)
    c.subscribe(topic, 2)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"q2", qos=2)
    msg = c.recv_publish(ack=False)
    assert (msg.qos, msg.dup) == (2, False) and msg.pid
    c.send(mb.pubrec(msg.pid))
    assert c.expect(mb.PUBREL) == (mb.PUBREL, 2, mb.u16(msg.pid))
    c.abort()
    c2 = mqtt(b, cid, version=V, clean=False)
    assert c2.recv_packet() == (mb.PUBREL, 2, mb.u16(msg.pid)), "PUBREL resent, not the PUBLISH"
    c2.send(mb.pubcomp(msg.pid))
    quiet(c2)


def test_MQTT_4_3_3_2_qos2_receiver(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.3.3-2] In the QoS 2 delivery protocol, the Receiver MUST respond with a PUBREC
    containing the Packet Identifier from the incoming PUBLISH Packet, having accepted
    ownership of the Application Message. Until it has received the corresponding PUBREL
    packet, the Receiver MUST acknowledge any subsequent PUBLISH packet with the same Packet
    Identifier by sending a PUBREC. It MUST NOT cause duplicate messages to be delivered to
    any onward recipients in this case. MUST respond to a PUBREL packet by sending a PUBCOMP
    packet containing the same Packet Identifier as the PUBREL. After it has sent a PUBCOMP,
    the receiver MUST treat any subsequent PUBLISH packet that contains that Packet
    Identifier as being a new publication."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 2)
    p = mqtt(b, uniq.cid("p"), version=V)
    p.send(mb.publish(topic, b"once", qos=2, pid=21))
    assert p.expect(mb.PUBREC)[2] == mb.u16(21)
    p.send(mb.publish(topic, b"once", qos=2, pid=21, dup=True))
    assert p.expect(mb.PUBREC)[2] == mb.u16(21)
    p.send(mb.pubrel(21))
    assert p.expect(mb.PUBCOMP)[2] == mb.u16(21)
    p.send(mb.publish(topic, b"new", qos=2, pid=21))
    assert p.expect(mb.PUBREC)[2] == mb.u16(21)
    p.send(mb.pubrel(21))
    p.expect(mb.PUBCOMP)
    assert [m.payload for m in s.drain_publishes(first_timeout=3)] == [b"once", b"new"]


def test_MQTT_4_4_0_1_resend_on_reconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.4.0-1] When a Client reconnects with CleanSession set to 0, both the Client and
    Server MUST re-send any unacknowledged PUBLISH Packets (where QoS > 0) and PUBREL Packets
    using their original Packet Identifiers."""
    _, c2, first = _offline_then_back(b, mqtt, uniq, 2)
    again = c2.recv_publish()
    assert (again.pid, again.payload, again.qos) == (first.pid, first.payload, 2)


def test_MQTT_4_5_0_1_message_added_to_matching_sessions(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.5.0-1] When a Server takes ownership of an incoming Application Message it MUST
    add it to the Session state of those clients that have matching Subscriptions."""
    base = uniq.topic()
    online = sub(mqtt, b, uniq, base + "/#")
    cid = uniq.cid("o")
    off = mqtt(b, cid, version=V, clean=False)
    off.subscribe(base + "/+", 1)
    off.disconnect()
    mqtt(b, uniq.cid("p"), version=V).publish(base + "/m", b"owned", qos=1)
    assert online.recv_publish().payload == b"owned"
    assert mqtt(b, cid, version=V, clean=False).recv_publish().payload == b"owned"


def test_MQTT_4_6_0_5_ordered_topic_by_default(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.6.0-5] A Server MUST by default treat each Topic as an "Ordered Topic"."""
    topic = uniq.topic()
    s = sub(mqtt, b, uniq, topic, 1)
    p = mqtt(b, uniq.cid("p"), version=V)
    for i in range(20):
        p.send(mb.publish(topic, str(i), qos=1, pid=i + 1))
    got = [m.payload for m in s.recv_publishes(20)]
    assert got == [str(i).encode() for i in range(20)]


def test_MQTT_4_6_0_6_ordered_per_qos_from_a_client(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.6.0-6] When a Server processes a message that has been published to an Ordered
    Topic, it MUST follow the rules listed above when delivering messages to each of its
    subscribers. In addition it MUST send PUBLISH packets to consumers (for the same Topic and
    QoS) in the order that they were received from any given Client."""
    topic = uniq.topic()
    subs = [sub(mqtt, b, uniq, topic, 2) for _ in range(3)]
    p = mqtt(b, uniq.cid("p"), version=V)
    for i in range(10):
        p.send(mb.publish(topic, str(i), qos=2, pid=i + 1))
    for i in range(10):
        p.expect(mb.PUBREC)
        p.send(mb.pubrel(i + 1))
    for s in subs:
        assert [m.payload for m in s.recv_publishes(10)] == [str(i).encode() for i in range(10)]


def test_MQTT_4_7_1_1_no_wildcards_in_topic_names(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.1-1] The wildcard characters can be used in Topic Filters, but MUST NOT be
    used within a Topic Name."""
    c = mqtt(b, uniq.cid("w"), version=V)
    assert c.subscribe([(uniq.topic() + "/+/#", 1)]) == [1]
    c.try_send(mb.publish(uniq.topic() + "/+", b"x"))
    closed(c)


def test_MQTT_4_7_1_2_multi_level_wildcard_last(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.1-2] The multi-level wildcard character MUST be specified either on its own or
    following a topic level separator. In either case it MUST be the last character specified
    in the Topic Filter."""
    c = mqtt(b, uniq.cid("w"), version=V)
    c.send(mb.subscribe(1, [("a/#/b", 1), ("a#", 1), ("a/b#", 1), ("#", 0), ("a/#", 0)]))
    assert mb.parse_suback(c.expect(mb.SUBACK)[2]).codes == [0x80, 0x80, 0x80, 0, 0]


def test_MQTT_4_7_1_3_single_level_wildcard_whole_level(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.1-3] The single-level wildcard can be used at any level in the Topic Filter,
    including first and last levels. Where it is used it MUST occupy an entire level of the
    filter."""
    c = mqtt(b, uniq.cid("w"), version=V)
    c.send(mb.subscribe(1, [("a+/b", 1), ("a/+b", 1), ("+", 0), ("+/a/+", 0), ("a/+/#", 0)]))
    assert mb.parse_suback(c.expect(mb.SUBACK)[2]).codes == [0x80, 0x80, 0, 0, 0]


def test_MQTT_4_7_2_1_dollar_topics_not_matched_by_leading_wildcards(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.2-1] The Server MUST NOT match Topic Filters starting with a wildcard
    character (# or +) with Topic Names beginning with a $ character."""
    name = "$" + uniq.cid("d")
    hash_sub = sub(mqtt, b, uniq, "#", 1)
    plus_sub = sub(mqtt, b, uniq, "+/x", 1)
    exact = sub(mqtt, b, uniq, name + "/x", 1)
    hash_sub.drain_publishes(0.2)
    mqtt(b, uniq.cid("p"), version=V).publish(name + "/x", b"dollar", qos=1)
    assert exact.recv_publish().payload == b"dollar"
    for s in (hash_sub, plus_sub):
        assert all(not m.topic.startswith("$") for m in s.drain_publishes(0.5))


def test_MQTT_4_7_3_1_topics_at_least_one_character(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-1] All Topic Names and Topic Filters MUST be at least one character long."""
    c = mqtt(b, uniq.cid("e"), version=V)
    c.try_send(mb.publish("", b"x"))
    closed(c)
    c = mqtt(b, uniq.cid("e"), version=V)
    c.try_send(mb.subscribe(1, [("", 0)]))
    closed(c)
    c = mqtt(b, uniq.cid("e"), version=V)
    c.try_send(mb.unsubscribe(1, [""]))
    closed(c)


def test_MQTT_4_7_3_2_no_null_character_in_topics(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-2] Topic Names and Topic Filters MUST NOT include the null character
    (Unicode U+0000)."""
    c = mqtt(b, uniq.cid("n"), version=V)
    c.try_send(mb.publish(b"a\x00", b"x"))
    closed(c)


def test_MQTT_4_7_3_3_long_topics(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-3] Topic Names and Topic Filters are UTF-8 encoded strings, they MUST NOT
    encode to more than 65535 bytes."""
    topic = uniq.topic() + "/" + "é" * 200
    s = sub(mqtt, b, uniq, topic)
    mqtt(b, uniq.cid("p"), version=V).publish(topic, b"long", qos=1)
    assert s.recv_publish().topic == topic


def test_MQTT_4_7_3_4_no_normalisation(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.7.3-4] When it performs subscription matching the Server MUST NOT perform any
    normalization of Topic Names or Topic Filters, or any modification or substitution of
    unrecognized characters."""
    base = uniq.topic()
    s = sub(mqtt, b, uniq, base + "/a//b")
    p = mqtt(b, uniq.cid("p"), version=V)
    for t in (base + "/a/b", base + "/A//b", base + "/a//b/", base + "/a/\u00e9"):
        p.publish(t, b"no", qos=1)
    p.publish(base + "/a//b", b"yes", qos=1)
    assert [m.payload for m in s.drain_publishes(first_timeout=3)] == [b"yes"]
    composed = sub(mqtt, b, uniq, base + "/\u00e9")
    p.publish(base + "/e\u0301", b"decomposed", qos=1)
    quiet(composed)


def test_MQTT_4_8_0_1_protocol_violation_closes(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.0-1] Unless stated otherwise, if either the Server or Client encounters a
    protocol violation, it MUST close the Network Connection on which it received that
    Control Packet which caused the protocol violation."""
    topic = uniq.topic()
    for qos, wrong in ((2, mb.puback), (1, mb.pubrec)):
        s = sub(mqtt, b, uniq, topic, qos)
        mqtt(b, uniq.cid("p"), version=V).publish(topic, b"x", qos=qos)
        msg = s.recv_publish(ack=False)
        assert msg.pid is not None
        s.try_send(wrong(msg.pid))
        closed(s)


def test_MQTT_4_8_0_1_packets_a_client_never_sends_close(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.0-1] (as above) CONNACK, SUBACK, UNSUBACK, PINGRESP and the reserved types 0
    and 15 from a Client are protocol violations: the connection is closed at the type."""
    for bad in (b"\x20\x02\x00\x00", mb.fixed(mb.SUBACK, 0, b"\x00\x01\x00"), b"\xb0\x02\x00\x01",
                b"\xd0\x00", b"\x00\x00", b"\xf0\x00", b"\xf0\x7f"):
        c = mqtt(b, uniq.cid("v"), version=V)
        c.try_send(bad)
        closed(c)


def test_MQTT_4_8_0_2_transient_error_closes(make_broker: Callable[..., Broker], mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-4.8.0-2] If the Client or Server encounters a Transient Error while processing an
    inbound Control Packet it MUST close the Network Connection on which it received that
    Control Packet. (A full message store is one: a 3.1.1 PUBLISH it cannot store is not
    acknowledged; its connection is closed.)"""
    skip_unless_shardbroker("a store of a set size")
    nb = make_broker(workers=1, config=CONFIG_STORE_1_MIB)
    topic = uniq.topic()
    s = mqtt(nb, uniq.cid("s"), version=V, clean=False)
    s.subscribe(topic, 1)
    s.disconnect()  # an offline persistent session: each QoS 1 message is stored for it
    p = mqtt(nb, uniq.cid("p"), version=V)
    acked = 0
    for i in range(400):
        pid = i % 65535 + 1
        if not p.try_send(mb.publish(topic, bytes(8192), qos=1, pid=pid, version=V)):
            break
        try:
            kind, _, body = p.recv_packet(5) or (None, 0, b"")
        except mb.ConnectionClosed:
            break
        assert kind == mb.PUBACK and mb.parse_ack(body, V).pid == pid, f"PUBLISH {i}: got {kind}"
        acked += 1
    else:
        raise AssertionError("a 1 MiB store took 400 messages of 8 KiB")
    assert 20 < acked < 128
    assert nb.alive()
    # The broker goes on: another connection still gets its answers.
    mqtt(nb, uniq.cid("o"), version=V).ping()


# -- MQTT 3.1 (protocol name "MQIsdp", level 3) -----------------------------------------------


def test_mqtt31_connect_accepted(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """MQTT 3.1: a CONNECT with protocol name "MQIsdp" and level 3 is accepted with return
    code 0 and the session works like 3.1.1's."""
    topic = uniq.topic()
    c = mqtt(b, uniq.cid("o"), version=3)
    assert c.subscribe(topic, 2) == [2]
    c.publish(topic, b"three-one", qos=2)
    assert c.recv_publish().payload == b"three-one"


def test_mqtt31_protocol_name_and_level_must_agree(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """MQTT 3.1: "MQIsdp" with level 4, and "MQTT" with level 3, are refused (return code 1,
    unacceptable protocol version)."""
    for name, level in ((b"MQIsdp", 4), (b"MQTT", 3)):
        sent = refused_connect(b, mqtt, body_connect(0x02, mb.mqtt_str(uniq.cid("n")), level=level, name=name))
        assert [p[2] for p in sent] in ([b"\x00\x01"], []), (name, level, sent)


def test_mqtt31_violation_closes_without_disconnect(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """MQTT 3.1: a malformed packet closes the connection (no DISCONNECT from a server)."""
    c = mqtt(b, uniq.cid("m"), version=3)
    c.try_send(mb.subscribe(1, [("a/b", 3)]))
    assert_disconnected(c, 3)
    wait_until(lambda: c.closed, 1)
