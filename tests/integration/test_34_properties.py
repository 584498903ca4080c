"""34: MQTT 5.0 properties per packet, against the real broker.

For every packet a client sends (the Will Properties of a CONNECT counted as a packet of
their own, PUBLISH at each QoS, AUTH both before the CONNACK and in a re-authentication)
and every property identifier of table 2-4, one valid value of the property's type:

* a property the table allows in that packet is accepted: the exchange goes on as it would
  without it (an acknowledgement is sent for a real in-flight message, so it means
  something);
* one it does not allow is a Malformed Packet (2.2.2.2: "A Control Packet which contains an
  Identifier which is not valid for its packet type ... is a Malformed Packet"): CONNACK
  0x81 before the CONNACK, DISCONNECT 0x81 after it, then the close.

Then: identifiers outside the table (0x81), each property that may appear once sent twice
(each property's section: "It is a Protocol Error to include the X more than once", 0x82),
the repeatable ones repeated, and the values a section forbids.

The allowed sets are written here from table 2-4, independently of the broker's table.
Raw bytes from ``mqttbytes``; one broker with two workers and a SCRAM password file
(anonymous clients allowed as well) shared by the module. ``docs/CONFORMANCE.md``
("Properties per packet") summarises the matrix.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mqttbytes as mb
import pytest
from conftest import Broker, Clients, Uniq, _checked

scramp = pytest.importorskip("scramp")

pytestmark = pytest.mark.usefixtures("_only_shardbroker")

V = 5
OK, MAL, PROTO = 0x00, mb.RC_MALFORMED_PACKET, mb.RC_PROTOCOL_ERROR
METHOD = "SCRAM-SHA-256"
USER, PASSWORD = "alice", "wonder land"

# -- table 2-4 ----------------------------------------------------------------------------------

#: One valid value of each property's type, encoded (identifier included).
VALUE: dict[int, bytes] = {
    0x01: mb.prop_u8(0x01, 1),  # Payload Format Indicator: the payloads below are UTF-8
    0x02: mb.prop_u32(0x02, 60),
    0x03: mb.prop_str(0x03, "text/plain"),
    0x08: mb.prop_str(0x08, "reply/here"),
    0x09: mb.prop_bin(0x09, b"corr"),
    0x0B: mb.prop_varint(0x0B, 7),
    0x11: mb.prop_u32(0x11, 0),
    0x12: mb.prop_str(0x12, "assigned"),
    0x13: mb.prop_u16(0x13, 30),
    0x15: mb.prop_str(0x15, METHOD),
    0x16: mb.prop_bin(0x16, b"data"),
    0x17: mb.prop_u8(0x17, 1),
    0x18: mb.prop_u32(0x18, 0),
    0x19: mb.prop_u8(0x19, 1),
    0x1A: mb.prop_str(0x1A, "info"),
    0x1C: mb.prop_str(0x1C, "other.example"),
    0x1F: mb.prop_str(0x1F, "why"),
    0x21: mb.prop_u16(0x21, 10),
    0x22: mb.prop_u16(0x22, 5),
    0x23: mb.prop_u16(0x23, 1),
    0x24: mb.prop_u8(0x24, 1),
    0x25: mb.prop_u8(0x25, 1),
    0x26: mb.prop_pair(0x26, "k", "v"),
    0x27: mb.prop_u32(0x27, 65536),
    0x28: mb.prop_u8(0x28, 1),
    0x29: mb.prop_u8(0x29, 1),
    0x2A: mb.prop_u8(0x2A, 1),
}
IDS = tuple(VALUE)

_PUBLISH = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_ACK = frozenset({0x1F, 0x26})
_AUTH = frozenset({0x15, 0x16, 0x1F, 0x26})
#: Packet (as a client sends it) -> the properties table 2-4 allows in it.
ALLOWED: dict[str, frozenset[int]] = {
    "CONNECT": frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27}),
    "WILL": frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26}),
    "PUBLISH-QoS0": _PUBLISH,
    "PUBLISH-QoS1": _PUBLISH,
    "PUBLISH-QoS2": _PUBLISH,
    "PUBACK": _ACK,
    "PUBREC": _ACK,
    "PUBREL": _ACK,
    "PUBCOMP": _ACK,
    "SUBSCRIBE": frozenset({0x0B, 0x26}),
    "UNSUBSCRIBE": frozenset({0x26}),
    "DISCONNECT": frozenset({0x11, 0x1C, 0x1F, 0x26}),
    "AUTH-CONNECT": _AUTH,
    "AUTH-REAUTH": _AUTH,
}
#: Before the CONNACK a refusal is a CONNACK; after it, a DISCONNECT.
BEFORE_CONNACK = frozenset({"CONNECT", "WILL", "AUTH-CONNECT"})
REPEATABLE = frozenset({0x26})  # and the Subscription Identifier, in a PUBLISH from the server only


def expected(packet: str, ident: int) -> int:
    """The answer to ``packet`` carrying property ``ident`` (alone) with a valid value."""
    if ident not in ALLOWED[packet]:
        return MAL  # 2.2.2.2
    if packet.startswith("PUBLISH") and ident == 0x0B:
        # [MQTT-3.3.4-6] A PUBLISH packet sent from a Client to a Server MUST NOT contain a
        # Subscription Identifier (table 2-4 lists it for the server's PUBLISH).
        return PROTO
    if packet == "CONNECT" and ident == 0x16:
        # 3.1.2.11.10 "It is a Protocol Error to include Authentication Data if there is no
        # Authentication Method".
        return PROTO
    return OK


# -- the broker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _props_broker(make_module_broker: Callable[..., Broker], tmp_path_factory: pytest.TempPathFactory) -> Broker:
    tmp: Path = tmp_path_factory.mktemp("props")
    pw = tmp / "passwords"
    subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "passwd", str(pw), USER, "--stdin",
                    "--iterations", "4096"], input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    config = f'[auth]\npassword_file = "{pw}"\nallow_anonymous = true\n'
    return make_module_broker(workers=2, config=config, name="props")


@pytest.fixture
def b(_props_broker: Broker) -> Iterator[Broker]:
    yield from _checked(_props_broker)


# -- reading the answer -------------------------------------------------------------------------


def _next(c: mb.RawClient, timeout: float = 3.0) -> mb.Packet | None:
    """The next packet; None when the server closed the connection."""
    try:
        pkt = c.recv_packet(timeout)
    except mb.ConnectionClosed:
        return None
    if pkt is None:
        raise AssertionError(f"no answer in {timeout}s")
    return pkt


def _refusal(c: mb.RawClient, pkt: mb.Packet | None, before_connack: bool) -> int:
    """``pkt`` ends the connection: CONNACK >= 0x80 (before CONNACK) or DISCONNECT (after),
    then the close. Returns its reason code."""
    assert pkt is not None, "closed without a reason code"
    if before_connack:
        assert pkt[0] == mb.CONNACK, f"before CONNACK only a CONNACK may refuse: {mb.describe(pkt)}"
        code = mb.parse_connack(pkt[2], V).rc
    else:
        assert pkt[0] == mb.DISCONNECT, f"expected the normal answer or DISCONNECT: {mb.describe(pkt)}"
        code = mb.parse_disconnect(pkt[2], V).reason
    assert code >= 0x80, f"refusal with 0x{code:02X}"
    assert c.expect_closed(3) and not c.before_close, f"not closed after 0x{code:02X}: {c.before_close}"
    return code


def _answer(c: mb.RawClient, *want: int, before_connack: bool = False) -> int:
    """Read until every packet type in ``want`` came (OK), or the refusal that ends the
    connection (its reason code). A successful CONNACK counts only with code 0."""
    missing = list(want)
    while missing:
        pkt = _next(c)
        if pkt is not None and pkt[0] in missing:
            if pkt[0] == mb.CONNACK and mb.parse_connack(pkt[2], V).rc:
                return _refusal(c, pkt, True)
            missing.remove(pkt[0])
            continue
        return _refusal(c, pkt, before_connack)
    return OK


def _connected(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes = b"") -> mb.RawClient:
    return mqtt(b, uniq.cid("p"), version=V, props=props)


def _inbound(c: mb.RawClient, topic: str, qos: int) -> int:
    """Publish at ``qos`` to ``topic`` (which ``c`` subscribes to at that QoS), complete the
    sender's side, and return the packet identifier of the copy the server sends back."""
    c.send(mb.publish(topic, b"x", qos=qos, pid=1, version=V))
    server_pid = None
    done = False
    while server_pid is None or not done:
        pkt = _next(c)
        assert pkt is not None, "closed"
        if pkt[0] == mb.PUBLISH:
            msg = mb.parse_publish(pkt[1], pkt[2], V)
            assert msg.qos == qos and msg.pid is not None, msg
            server_pid = msg.pid
        elif pkt[0] == mb.PUBACK:
            done = True
        elif pkt[0] == mb.PUBREC:
            c.send(mb.pubrel(1, V))
        elif pkt[0] == mb.PUBCOMP:
            done = True
        else:
            raise AssertionError(mb.describe(pkt))
    return server_pid


# -- one exchange per packet: send it carrying ``props``, return OK or the refusal's code ---------


def _connect(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("c"), version=V, props=props))
    return _answer(c, mb.CONNACK, before_connack=True)


def _connect_with_method(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    """CONNECT with an Authentication Method: it must come with SCRAM's client-first message
    (the method's own data); the server then answers with AUTH 0x18."""
    first = scramp.ScramClient([METHOD], USER, PASSWORD).get_client_first().encode()
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("c"), version=V, props=props + mb.prop_bin(0x16, first)))
    return _answer(c, mb.AUTH, before_connack=True)


def _will(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("w"), version=V, will=mb.Will(uniq.topic("will"), b"bye", props=props)))
    return _answer(c, mb.CONNACK, before_connack=True)


def _publish(qos: int) -> Callable[[Broker, Clients, Uniq, bytes], int]:
    def run(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
        c = _connected(b, mqtt, uniq)
        topic = uniq.topic()
        c.subscribe(topic, 0)
        c.send(mb.publish(topic, b"x", qos=qos, pid=1 if qos else None, version=V, props=props))
        want = {0: (mb.PUBLISH,), 1: (mb.PUBACK, mb.PUBLISH), 2: (mb.PUBREC, mb.PUBLISH)}[qos]
        return _answer(c, *want)

    return run


def _ping(c: mb.RawClient) -> int:
    c.send(mb.pingreq())
    return _answer(c, mb.PINGRESP)


def _puback(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    topic = uniq.topic()
    c.subscribe(topic, 1)
    c.send(mb.puback(_inbound(c, topic, 1), V, 0, props))
    return _ping(c)


def _pubrec(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    topic = uniq.topic()
    c.subscribe(topic, 2)
    c.send(mb.pubrec(_inbound(c, topic, 2), V, 0, props))
    return _answer(c, mb.PUBREL)


def _pubrel(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    c.send(mb.publish(uniq.topic(), b"x", qos=2, pid=1, version=V))
    c.expect(mb.PUBREC)
    c.send(mb.pubrel(1, V, 0, props))
    return _answer(c, mb.PUBCOMP)


def _pubcomp(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    topic = uniq.topic()
    c.subscribe(topic, 2)
    pid = _inbound(c, topic, 2)
    c.send(mb.pubrec(pid, V))
    c.expect(mb.PUBREL)
    c.send(mb.pubcomp(pid, V, 0, props))
    return _ping(c)


def _subscribe(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    c.send(mb.subscribe(1, [(uniq.topic(), 1)], version=V, props=props))
    return _answer(c, mb.SUBACK)


def _unsubscribe(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    c = _connected(b, mqtt, uniq)
    c.send(mb.unsubscribe(1, [uniq.topic()], version=V, props=props))
    return _answer(c, mb.UNSUBACK)


def _disconnect(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    """A normal DISCONNECT is answered by the close alone. The CONNECT asked for a session
    expiry, so that one in the DISCONNECT is allowed [MQTT-3.14.2-2]."""
    c = _connected(b, mqtt, uniq, mb.prop_u32(0x11, 60))
    c.send(mb.disconnect(V, 0, props))
    pkt = _next(c)
    return OK if pkt is None else _refusal(c, pkt, False)


def _auth_props(data: str, props: bytes) -> bytes:
    """An AUTH needs its method (3.15.2.2.2) and, for SCRAM, its data; ``props`` comes on top,
    except where it is the method or the data itself."""
    base = b""
    if not props.startswith(VALUE[0x15]):
        base += VALUE[0x15]
    if not props.startswith(b"\x16"):
        base += mb.prop_bin(0x16, data)
    elif props == VALUE[0x16]:
        props = mb.prop_bin(0x16, data)
    return base + props


def _auth_connect(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    """AUTH 0x18 before the CONNACK, carrying SCRAM's client-final message: CONNACK 0."""
    scram = scramp.ScramClient([METHOD], USER, PASSWORD)
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("a"), version=V, props=VALUE[0x15] + mb.prop_bin(0x16, scram.get_client_first())))
    pkt = c.expect(mb.AUTH)
    scram.set_server_first(mb.parse_auth(pkt[2]).props[0x16].decode())
    c.send(mb.auth(0x18, _auth_props(scram.get_client_final(), props)))
    return _answer(c, mb.CONNACK, before_connack=True)


def _login(b: Broker, mqtt: Clients, uniq: Uniq) -> mb.RawClient:
    scram = scramp.ScramClient([METHOD], USER, PASSWORD)
    c = mqtt.raw(b)
    c.version = V
    c.send(mb.connect(uniq.cid("r"), version=V, props=VALUE[0x15] + mb.prop_bin(0x16, scram.get_client_first())))
    scram.set_server_first(mb.parse_auth(c.expect(mb.AUTH)[2]).props[0x16].decode())
    c.send(mb.auth(0x18, VALUE[0x15] + mb.prop_bin(0x16, scram.get_client_final())))
    assert mb.parse_connack(c.expect(mb.CONNACK)[2], V).rc == 0
    return c


def _auth_reauth(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    """AUTH 0x19 (re-authenticate) after a SCRAM login: the server goes on with AUTH 0x18."""
    c = _login(b, mqtt, uniq)
    first = scramp.ScramClient([METHOD], USER, PASSWORD).get_client_first()
    c.send(mb.auth(0x19, _auth_props(first, props)))
    return _answer(c, mb.AUTH)


EXCHANGE: dict[str, Callable[[Broker, Clients, Uniq, bytes], int]] = {
    "CONNECT": _connect,
    "WILL": _will,
    "PUBLISH-QoS0": _publish(0),
    "PUBLISH-QoS1": _publish(1),
    "PUBLISH-QoS2": _publish(2),
    "PUBACK": _puback,
    "PUBREC": _pubrec,
    "PUBREL": _pubrel,
    "PUBCOMP": _pubcomp,
    "SUBSCRIBE": _subscribe,
    "UNSUBSCRIBE": _unsubscribe,
    "DISCONNECT": _disconnect,
    "AUTH-CONNECT": _auth_connect,
    "AUTH-REAUTH": _auth_reauth,
}
assert set(EXCHANGE) == set(ALLOWED)


def run(packet: str, b: Broker, mqtt: Clients, uniq: Uniq, props: bytes) -> int:
    if packet == "CONNECT" and props.startswith(VALUE[0x15]):
        return _connect_with_method(b, mqtt, uniq, props)
    return EXCHANGE[packet](b, mqtt, uniq, props)


def _hex(code: int) -> str:
    return "accepted" if code == OK else f"0x{code:02X}"


# -- the matrix ---------------------------------------------------------------------------------

MATRIX = [pytest.param(p, i, id=f"{p}-0x{i:02X}") for p in ALLOWED for i in IDS]


@pytest.mark.parametrize(("packet", "ident"), MATRIX)
def test_property_in_packet(b: Broker, mqtt: Clients, uniq: Uniq, packet: str, ident: int) -> None:
    """Table 2-4: allowed is accepted; not allowed is a Malformed Packet (2.2.2.2)."""
    want = expected(packet, ident)
    got = run(packet, b, mqtt, uniq, VALUE[ident])
    assert got == want, f"{packet} with property 0x{ident:02X}: {_hex(got)}, expected {_hex(want)}"


def test_baseline_exchanges(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """Every exchange goes through without properties: the matrix's refusals come from them."""
    for packet in ALLOWED:
        assert run(packet, b, mqtt, uniq, b"") == OK, packet


# 2.2.2.2: the identifier is a Variable Byte Integer; one table 2-4 does not define cannot be
# parsed. 0x80 0x01 is identifier 128 in two bytes; 0x81 0x00 is 1 in two bytes, which
# [MQTT-1.5.5-1] ("the minimum number of bytes") forbids.
UNKNOWN = {"0x00": b"\x00\x00", "0x04": b"\x04\x00", "0x7F": b"\x7f\x00", "0x80-0x01": b"\x80\x01\x00",
           "0x81-0x00": b"\x81\x00\x01"}


@pytest.mark.parametrize("packet", list(ALLOWED))
@pytest.mark.parametrize("raw", list(UNKNOWN.values()), ids=list(UNKNOWN))
def test_unknown_property_identifier(b: Broker, mqtt: Clients, uniq: Uniq, packet: str, raw: bytes) -> None:
    got = run(packet, b, mqtt, uniq, raw)
    assert got == MAL, f"{packet} with unknown identifier {raw!r}: {_hex(got)}"


TWICE = [pytest.param(p, i, id=f"{p}-0x{i:02X}") for p in ALLOWED for i in IDS
         if i in ALLOWED[p] and i not in REPEATABLE]


@pytest.mark.parametrize(("packet", "ident"), TWICE)
def test_property_twice(b: Broker, mqtt: Clients, uniq: Uniq, packet: str, ident: int) -> None:
    """Each property's section: "It is a Protocol Error to include the <property> more than
    once" (and [MQTT-3.3.4-6] for a client's Subscription Identifier)."""
    got = run(packet, b, mqtt, uniq, VALUE[ident] * 2)
    assert got == PROTO, f"{packet} with property 0x{ident:02X} twice: {_hex(got)}"


@pytest.mark.parametrize("packet", list(ALLOWED))
def test_user_property_repeats(b: Broker, mqtt: Clients, uniq: Uniq, packet: str) -> None:
    """The User Property of each packet (3.1.2.11.8, 3.3.2.3.7, ...): "The User Property is allowed
    to appear multiple times to represent multiple name, value pairs. The same name is allowed to
    appear more than once." """
    props = VALUE[0x26] * 2 + mb.prop_pair(0x26, "k", "w")
    assert run(packet, b, mqtt, uniq, props) == OK


def test_subscription_identifier_twice_in_subscribe(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """3.8.2.1.2 "It is a Protocol Error to include the Subscription Identifier more than once"
    (only the server's PUBLISH may carry several)."""
    props = mb.prop_varint(0x0B, 1) + mb.prop_varint(0x0B, 2)
    assert _subscribe(b, mqtt, uniq, props) == PROTO


# -- values a section forbids -------------------------------------------------------------------

OUT_OF_RANGE = [
    # 3.1.2.11.3 "It is a Protocol Error to include the Receive Maximum value more than once or
    # for it to have the value 0."
    pytest.param("CONNECT", mb.prop_u16(0x21, 0), PROTO, id="CONNECT-receive-maximum-0"),
    # 3.1.2.11.4 "It is a Protocol Error to include the Maximum Packet Size more than once, or
    # for the value to be set to zero."
    pytest.param("CONNECT", mb.prop_u32(0x27, 0), PROTO, id="CONNECT-maximum-packet-size-0"),
    # 3.1.2.11.6 / 3.1.2.11.7 "It is a Protocol Error to include [it] more than once, or to
    # have a value other than 0 or 1."
    pytest.param("CONNECT", mb.prop_u8(0x19, 2), PROTO, id="CONNECT-request-response-information-2"),
    pytest.param("CONNECT", mb.prop_u8(0x17, 2), PROTO, id="CONNECT-request-problem-information-2"),
    pytest.param("CONNECT", mb.prop_u8(0x17, 0xFF), PROTO, id="CONNECT-request-problem-information-255"),
    # 3.1.3.2.3 / 3.3.2.3.2: the Payload Format Indicator is 0 or 1.
    pytest.param("WILL", mb.prop_u8(0x01, 2), PROTO, id="WILL-payload-format-indicator-2"),
    pytest.param("PUBLISH-QoS0", mb.prop_u8(0x01, 2), PROTO, id="PUBLISH-QoS0-payload-format-indicator-2"),
    pytest.param("PUBLISH-QoS1", mb.prop_u8(0x01, 2), PROTO, id="PUBLISH-QoS1-payload-format-indicator-2"),
    # [MQTT-3.3.2-8] "A sender MUST NOT send a PUBLISH packet containing a Topic Alias which has
    # the value 0"; a value above the Topic Alias Maximum of the CONNACK (10 by default):
    # 0x94 Topic Alias invalid (3.14.2.1 and [MQTT-3.3.2-9]). Both are invalid Topic Aliases.
    pytest.param("PUBLISH-QoS0", mb.prop_u16(0x23, 0), mb.RC_TOPIC_ALIAS_INVALID, id="PUBLISH-QoS0-topic-alias-0"),
    pytest.param("PUBLISH-QoS1", mb.prop_u16(0x23, 0), mb.RC_TOPIC_ALIAS_INVALID, id="PUBLISH-QoS1-topic-alias-0"),
    pytest.param("PUBLISH-QoS1", mb.prop_u16(0x23, 11), mb.RC_TOPIC_ALIAS_INVALID,
                 id="PUBLISH-QoS1-topic-alias-above-maximum"),
    # 3.8.2.1.2 "It is a Protocol Error if the Subscription Identifier has a value of 0."
    pytest.param("SUBSCRIBE", mb.prop_varint(0x0B, 0), PROTO, id="SUBSCRIBE-subscription-identifier-0"),
    # [MQTT-3.3.2-14] The Response Topic MUST NOT contain wildcard characters.
    pytest.param("PUBLISH-QoS1", mb.prop_str(0x08, "r/#"), PROTO, id="PUBLISH-QoS1-response-topic-wildcard"),
    # 1.5.7 / 2.2.2.2 "contains a value not of the specified data type": a string property
    # that is not UTF-8, a truncated value.
    pytest.param("PUBLISH-QoS1", mb.prop_str(0x03, b"\xff"), MAL, id="PUBLISH-QoS1-content-type-not-utf8"),
    pytest.param("PUBACK", mb.prop_str(0x1F, b"\xc0\xaf"), MAL, id="PUBACK-reason-string-not-utf8"),
    pytest.param("SUBSCRIBE", b"\x26\x00\x01k", MAL, id="SUBSCRIBE-user-property-truncated"),
    pytest.param("CONNECT", b"\x11\x00\x00", MAL, id="CONNECT-session-expiry-truncated"),
]


@pytest.mark.parametrize(("packet", "props", "want"), OUT_OF_RANGE)
def test_value_out_of_range(b: Broker, mqtt: Clients, uniq: Uniq, packet: str, props: bytes, want: int) -> None:
    got = run(packet, b, mqtt, uniq, props)
    assert got == want, f"{packet} with {props!r}: {_hex(got)}, expected {_hex(want)}"


def test_session_expiry_on_disconnect_after_zero(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """[MQTT-3.14.2-2] "If the Session Expiry Interval in the CONNECT packet was zero, then it is
    a Protocol Error to set a non-zero Session Expiry Interval in the DISCONNECT packet sent by
    the Client." (Zero again is no change, and allowed.)"""
    c = _connected(b, mqtt, uniq)
    c.send(mb.disconnect(V, 0, mb.prop_u32(0x11, 60)))
    assert _refusal(c, _next(c), False) == PROTO
    c = _connected(b, mqtt, uniq)
    c.send(mb.disconnect(V, 0, mb.prop_u32(0x11, 0)))
    assert _next(c) is None


def test_authentication_method_in_auth_is_required(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """3.15.2.2.2 "It is a Protocol Error to omit the Authentication Method"."""
    c = _login(b, mqtt, uniq)
    c.send(mb.auth(0x19, mb.prop_bin(0x16, "n,,n=alice,r=abc")))
    assert _refusal(c, _next(c), False) == PROTO


def test_order_of_properties_is_free(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """2.2.2.2 "There is no significance in the order of Properties with different Identifiers":
    Authentication Data before its Authentication Method is no Protocol Error."""
    first = scramp.ScramClient([METHOD], USER, PASSWORD).get_client_first()
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("o"), version=V, props=mb.prop_bin(0x16, first) + VALUE[0x26] + VALUE[0x15]))
    assert _answer(c, mb.AUTH, before_connack=True) == OK


@pytest.mark.parametrize(("props", "want"), [
    # 3.8.2.1.2 "The Subscription Identifier can have the value of 1 to 268,435,455."
    pytest.param(mb.prop_varint(0x0B, 268_435_455), OK, id="largest"),
    # 1.5.5: a Variable Byte Integer has at most four bytes; [MQTT-1.5.5-1] the fewest.
    pytest.param(b"\x0b\xff\xff\xff\xff\x01", MAL, id="five-bytes"),
    pytest.param(b"\x0b\x81\x00", MAL, id="not-minimal"),
])
def test_subscription_identifier_encoding(b: Broker, mqtt: Clients, uniq: Uniq, props: bytes, want: int) -> None:
    assert _subscribe(b, mqtt, uniq, props) == want


def test_property_length_beyond_the_packet(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """2.2.2.1 the Property Length counts the bytes of the properties: more than the packet
    holds cannot be parsed (0x81)."""
    c = _connected(b, mqtt, uniq)
    body = mb.u16(1) + b"\x00" + b"\x05" + VALUE[0x1F][:4]  # PUBREL: Property Length 5, 4 bytes follow
    c.send(mb.fixed(mb.PUBREL, 2, body))
    assert _refusal(c, _next(c), False) == MAL


def test_bad_property_behind_a_connect_being_verified(b: Broker, mqtt: Clients, uniq: Uniq) -> None:
    """A PUBLISH with a property it may not carry, in the same read as a CONNECT whose password
    is still being checked: CONNACK first, then DISCONNECT 0x81 (2.2.2.2)."""
    c = mqtt.raw(b)
    c.send(mb.connect(uniq.cid("x"), version=V, username=USER, password=PASSWORD)
           + mb.publish(uniq.topic(), b"x", version=V, props=VALUE[0x24]))
    assert _answer(c, mb.CONNACK) == OK
    assert _refusal(c, _next(c), False) == MAL
