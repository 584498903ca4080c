"""The independent test builders against golden bytes from the MQTT specifications.

If these fail, the integration tests cannot be trusted; they need no broker.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mqttbytes as mb


def test_mqttbytes_is_independent_of_shardbroker():
    source = Path(mb.__file__).read_text()
    imports = [ln for ln in source.splitlines()
               if re.match(r"\s*(from|import)\s+(shardbroker|storage|cli)\b", ln)]
    assert imports == []


# -- 1.5.5 / 2.2.3 Variable Byte Integer (Table 1.1 / 2.4 boundaries) ------------------------


@pytest.mark.parametrize("n, encoded", [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_varint_golden(n, encoded):
    assert mb.varint(n) == encoded
    assert mb.decode_varint(encoded) == (n, len(encoded))


@pytest.mark.parametrize("n", [-1, 268_435_456])
def test_varint_out_of_range(n):
    with pytest.raises(ValueError):
        mb.varint(n)


def test_varint_five_bytes_rejected():
    with pytest.raises(mb.MalformedError):
        mb.decode_varint(b"\xff\xff\xff\xff\x01")


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_roundtrip(n):
    enc = mb.varint(n)
    assert mb.decode_varint(enc + b"junk") == (n, len(enc))
    assert 1 <= len(enc) <= 4


# -- 1.5.4 UTF-8 Encoded String example: "A\U0002A6D4" --------------------------------------------


def test_utf8_string_golden():
    assert mb.mqtt_str("A\U0002A6D4") == b"\x00\x05\x41\xf0\xaa\x9b\x94"
    assert mb.decode_str(b"\x00\x05\x41\xf0\xaa\x9b\x94", 0) == ("A\U0002A6D4", 7)


# -- CONNECT ---------------------------------------------------------------------------------------


def test_connect_variable_header_v311_golden():
    # 3.1.1 Figure 3.6: "MQTT", level 4, flags 0xCE (user, password, will QoS 1, will, clean),
    # keep alive 10.
    pkt = mb.connect("cid", version=4, clean=True, keepalive=10,
                     will=mb.Will("w", b"p", qos=1), username="u", password=b"pw")
    ptype, flags, body = mb.split_packets(pkt)[0]
    assert (ptype, flags) == (mb.CONNECT, 0)
    assert body[:10] == b"\x00\x04MQTT\x04\xce\x00\x0a"
    assert body[10:] == (b"\x00\x03cid" + b"\x00\x01w" + b"\x00\x01p" + b"\x00\x01u"
                         + b"\x00\x02pw")


def test_connect_variable_header_v5_golden():
    # 5.0 Figure 3-6 (Variable Header example): flags 0xCE, keep alive 10, properties
    # length 5, Session Expiry Interval (17) = 10.
    pkt = mb.connect("cid", version=5, keepalive=10, will=mb.Will("w", b"p", qos=1),
                     username="u", password=b"pw",
                     props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 10))
    body = mb.split_packets(pkt)[0][2]
    assert body[:16] == b"\x00\x04MQTT\x05\xce\x00\x0a\x05\x11\x00\x00\x00\x0a"
    # payload: client id, will properties (empty), will topic, will payload, user, password
    assert body[16:] == (b"\x00\x03cid" + b"\x00" + b"\x00\x01w" + b"\x00\x01p"
                         + b"\x00\x01u" + b"\x00\x02pw")


def test_connect_v31_protocol_name():
    body = mb.split_packets(mb.connect("c", version=3, keepalive=60))[0][2]
    assert body[:12] == b"\x00\x06MQIsdp\x03\x02\x00\x3c"


def test_connect_minimal_exact():
    assert mb.connect("a", version=4, keepalive=60) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a")


def test_connect_empty_client_id_v5():
    assert mb.connect("", version=5, clean=True, keepalive=0) == (
        b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x00\x00\x00\x00")


# -- CONNACK ----------------------------------------------------------------------------------------


def test_parse_connack():
    assert mb.parse_connack(b"\x01\x00", 4) == (True, 0, {})
    ack = mb.parse_connack(b"\x00\x00\x06\x21\x00\x14\x22\x00\x0a", 5)
    assert ack == (False, 0, {mb.RECEIVE_MAXIMUM: 20, mb.TOPIC_ALIAS_MAXIMUM: 10})
    with pytest.raises(mb.MalformedError):
        mb.parse_connack(b"\x02\x00", 4)  # reserved flag bit


# -- PUBLISH ----------------------------------------------------------------------------------------


def test_publish_variable_header_golden():
    # 3.1.1 Figure 3.11: topic "a/b", packet identifier 10
    pkt = mb.publish("a/b", b"", qos=1, pid=10)
    assert pkt == b"\x32\x07\x00\x03a/b\x00\x0a"


def test_publish_flags():
    assert mb.publish("t", b"x")[0] == 0x30
    assert mb.publish("t", b"x", retain=True)[0] == 0x31
    assert mb.publish("t", b"x", qos=2, pid=1)[0] == 0x34
    assert mb.publish("t", b"x", qos=1, pid=1, dup=True, retain=True)[0] == 0x3B


def test_publish_v5_with_properties_roundtrip():
    props = (mb.prop_u8(mb.PAYLOAD_FORMAT_INDICATOR, 1)
             + mb.prop_u32(mb.MESSAGE_EXPIRY_INTERVAL, 3600)
             + mb.prop_str(mb.CONTENT_TYPE, "text/plain")
             + mb.prop_str(mb.RESPONSE_TOPIC, "r/t")
             + mb.prop_bin(mb.CORRELATION_DATA, b"\x00\x01")
             + mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 300)
             + mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 1)
             + mb.prop_u16(mb.TOPIC_ALIAS, 7)
             + mb.user_props([("a", "1"), ("a", "1"), ("b", "2")]))
    pkt = mb.publish("a/b", b"payload", qos=2, pid=513, version=5, props=props)
    (_ptype, flags, body), = mb.split_packets(pkt)
    msg = mb.parse_publish(flags, body, 5)
    assert (msg.topic, msg.payload, msg.qos, msg.pid, msg.retain, msg.dup) == (
        "a/b", b"payload", 2, 513, False, False)
    assert msg.props == {
        mb.PAYLOAD_FORMAT_INDICATOR: 1, mb.MESSAGE_EXPIRY_INTERVAL: 3600,
        mb.CONTENT_TYPE: "text/plain", mb.RESPONSE_TOPIC: "r/t", mb.CORRELATION_DATA: b"\x00\x01",
        mb.SUBSCRIPTION_IDENTIFIER: [300, 1], mb.TOPIC_ALIAS: 7,
        mb.USER_PROPERTY: [("a", "1"), ("a", "1"), ("b", "2")],
    }


def test_publish_v5_without_properties_has_zero_length():
    assert mb.publish("t", b"x", version=5) == b"\x30\x05\x00\x01t\x00x"


def test_parse_props_rejects_duplicates_and_unknown():
    with pytest.raises(mb.MalformedError):
        mb.parse_props(b"\x04\x01\x01\x01\x01")
    with pytest.raises(mb.MalformedError):
        mb.parse_props(b"\x02\x7f\x00")


# -- acks -------------------------------------------------------------------------------------------


def test_acks_golden():
    assert mb.puback(10) == b"\x40\x02\x00\x0a"
    assert mb.pubrec(10) == b"\x50\x02\x00\x0a"
    assert mb.pubrel(10) == b"\x62\x02\x00\x0a"  # reserved flags 0010 [MQTT-3.6.1-1]
    assert mb.pubcomp(10) == b"\x70\x02\x00\x0a"
    assert mb.puback(10, 5) == b"\x40\x02\x00\x0a"  # reason 0 and no properties: omitted
    assert mb.puback(10, 5, reason=0x10) == b"\x40\x03\x00\x0a\x10"
    assert mb.pubrec(10, 5, reason=0x80, props=mb.prop_str(mb.REASON_STRING, "no")) == (
        b"\x50\x09\x00\x0a\x80\x05\x1f\x00\x02no")


def test_parse_ack():
    assert mb.parse_ack(b"\x00\x0a", 4) == (10, 0, {})
    assert mb.parse_ack(b"\x00\x0a", 5) == (10, 0, {})
    assert mb.parse_ack(b"\x00\x0a\x92", 5) == (10, 0x92, {})
    assert mb.parse_ack(b"\x00\x0a\x99\x05\x1f\x00\x02ab", 5) == (10, 0x99, {mb.REASON_STRING: "ab"})


# -- SUBSCRIBE / SUBACK / UNSUBSCRIBE -----------------------------------------------------------------


def test_subscribe_golden():
    # 3.1.1 Figures 3.21-3.23: packet id 10; "a/b" QoS 1, "c/d" QoS 2
    assert mb.subscribe(10, [("a/b", 1), ("c/d", 2)]) == (
        b"\x82\x0e\x00\x0a\x00\x03a/b\x01\x00\x03c/d\x02")


def test_subscribe_v5_options_and_identifier():
    opts = mb.subopts(2, no_local=True, retain_as_published=True, retain_handling=2)
    assert opts == 0b00101110
    pkt = mb.subscribe(1, [("x", opts)], version=5, props=mb.prop_varint(mb.SUBSCRIPTION_IDENTIFIER, 128))
    assert pkt == b"\x82\x0a\x00\x01\x03\x0b\x80\x01\x00\x01x\x2e"


def test_parse_suback_golden():
    # 3.1.1 Figure 3.26: return codes 0, 1, 2, failure
    assert mb.parse_suback(b"\x00\x0a\x00\x01\x02\x80", 4) == (10, [0, 1, 2, 0x80], {})
    assert mb.parse_suback(b"\x00\x0a\x00\x00\x8f", 5) == (10, [0, 0x8F], {})


def test_unsubscribe_golden():
    # 3.1.1 Figure 3.30: "a/b", "c/d"
    assert mb.unsubscribe(10, ["a/b", "c/d"]) == b"\xa2\x0c\x00\x0a\x00\x03a/b\x00\x03c/d"
    assert mb.unsubscribe(10, ["a/b"], version=5) == b"\xa2\x08\x00\x0a\x00\x00\x03a/b"
    assert mb.parse_unsuback(b"\x00\x0a", 4) == (10, [], {})
    assert mb.parse_unsuback(b"\x00\x0a\x00\x00\x11", 5) == (10, [0, 0x11], {})


# -- PING / DISCONNECT / AUTH ---------------------------------------------------------------------------


def test_fixed_only_packets():
    assert mb.pingreq() == b"\xc0\x00"
    assert mb.pingresp() == b"\xd0\x00"
    assert mb.disconnect(4) == b"\xe0\x00"
    assert mb.disconnect(5) == b"\xe0\x00"
    assert mb.disconnect(5, 0x04) == b"\xe0\x01\x04"
    assert mb.disconnect(5, 0, mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 0)) == (
        b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00")
    assert mb.auth(0x18, mb.prop_str(mb.AUTHENTICATION_METHOD, "M")) == b"\xf0\x06\x18\x04\x15\x00\x01M"


def test_parse_disconnect():
    assert mb.parse_disconnect(b"", 5) == (0, {})
    assert mb.parse_disconnect(b"\x8e", 5) == (0x8E, {})
    assert mb.parse_disconnect(b"\x8b\x05\x1f\x00\x02bb", 5) == (0x8B, {mb.REASON_STRING: "bb"})


def test_split_packets():
    data = mb.pingresp() + mb.puback(1) + mb.publish("t", b"x" * 200)
    got = mb.split_packets(data)
    assert [t for t, _, _ in got] == [mb.PINGRESP, mb.PUBACK, mb.PUBLISH]
    assert len(got[2][2]) == 203


# -- RawClient framing, against a scripted local server ----------------------------------------------


def _server(script):
    """A one-shot TCP server on 127.0.0.1; ``script(conn)`` runs in a thread."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        try:
            script(conn)
        finally:
            conn.close()
            srv.close()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def test_rawclient_reassembles_fragmented_packets():
    big = mb.publish("t/x", b"y" * 20_000, qos=1, pid=9)

    def script(conn):
        data = b"\x20\x02\x01\x00" + big + mb.pingresp()
        for i in range(0, len(data), 7):
            conn.sendall(data[i:i + 7])
        time.sleep(0.2)

    c = mb.RawClient(port=_server(script))
    assert c.recv_packet(5) == (mb.CONNACK, 0, b"\x01\x00")
    t, f, body = c.recv_packet(5)
    msg = mb.parse_publish(f, body, 4)
    assert (t, msg.topic, len(msg.payload), msg.pid) == (mb.PUBLISH, "t/x", 20_000, 9)
    assert c.recv_packet(5) == (mb.PINGRESP, 0, b"")
    assert c.expect_closed(3)
    c.close()


def test_rawclient_expect_keeps_publishes_and_timeout():
    def script(conn):
        conn.recv(100)
        conn.sendall(mb.publish("a", b"1") + mb.fixed(mb.SUBACK, 0, b"\x00\x01\x00")
                     + mb.publish("a", b"2"))
        time.sleep(1)

    c = mb.RawClient(port=_server(script))
    assert c.subscribe("a", 0) == [0]
    assert [m.payload for m in c.recv_publishes(2)] == [b"1", b"2"]
    assert c.recv_packet(0.2) is None
    c.close()


def test_rawclient_expect_closed_false_when_open():
    def script(conn):
        time.sleep(1)

    c = mb.RawClient(port=_server(script))
    assert c.expect_closed(0.2) is False
    c.close()
