"""Tests for shardbroker.protocol.codec: round trips, golden bytes, framing,
every validity rule (by its reason code) and fuzzing (only ProtocolError escapes)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardbroker.protocol import reasons
from shardbroker.protocol.codec import (
    WILL_PROPERTIES,
    PacketReader,
    connect_version,
    decode,
    disallowed_code_point,
    encode,
    encode_properties,
    encode_publish,
    encode_remaining_length,
)
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

V3, V4, V5 = 3, 4, 5
VERSIONS = (V3, V4, V5)
MALFORMED = reasons.MALFORMED_PACKET
PROTOCOL = reasons.PROTOCOL_ERROR
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


def s(text: str | bytes) -> bytes:
    """A length-prefixed MQTT string from raw bytes (may be invalid UTF-8)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def split(data: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one encoded packet."""
    reader = PacketReader()
    [(first, body)] = reader.feed_raw(data)
    return first, bytes(body)


def reason_of(first: int, body: bytes, version: int) -> int:
    """Decode via decode() and via PacketReader; both must fail with the same reason."""
    with pytest.raises(ProtocolError) as direct:
        decode(first, body, version)
    with pytest.raises(ProtocolError) as framed:
        PacketReader(version).feed(frame(first, body))
    assert framed.value.reason == direct.value.reason
    return direct.value.reason


def connect_body(
    flags: int,
    payload: bytes,
    name: bytes = b"MQTT",
    level: int = 4,
    props: bytes = b"",
    keepalive: int = 60,
) -> bytes:
    return s(name) + bytes((level, flags)) + struct.pack("!H", keepalive) + props + payload


def props_block(raw: bytes) -> bytes:
    return encode_remaining_length(len(raw)) + raw


def roundtrip(packet: Packet, version: int) -> Packet:
    data = encode(packet, version)
    first, body = split(data)
    out = decode(first, body, version)
    assert PacketReader(version).feed(data) == [out]
    return out


# ---------------------------------------------------------------------------
# sample packets
# ---------------------------------------------------------------------------

RICH_PUBLISH = Properties(
    payload_format_indicator=1,
    message_expiry_interval=3600,
    content_type="application/json",
    response_topic="reply/to/me",
    correlation_data=b"\x00\x01corr",
    subscription_identifiers=(1, 268_435_455, 1, 200),
    topic_alias=0,  # the broker judges the range, the codec just carries it
    user_properties=(("k", "v"), ("k", "v2"), ("k", "v"), ("ключ", "значение")),
)
RICH_CONNECT = Properties(
    session_expiry_interval=0xFFFFFFFF,
    receive_maximum=65535,
    maximum_packet_size=1,
    topic_alias_maximum=0,
    request_response_information=1,
    request_problem_information=0,
    user_properties=(("a", ""),),
    authentication_method="SCRAM-SHA-1",
    authentication_data=b"\xffdata",
)
RICH_WILL = Properties(
    will_delay_interval=30,
    payload_format_indicator=0,
    message_expiry_interval=0,
    content_type="",
    response_topic="r",
    correlation_data=b"",
    user_properties=(("x", "y"),),
)
RICH_CONNACK = Properties(
    session_expiry_interval=10,
    receive_maximum=1,
    maximum_qos=1,
    retain_available=0,
    maximum_packet_size=268_435_460,
    assigned_client_identifier="auto-123",
    topic_alias_maximum=10,
    reason_string="welcome",
    user_properties=(("u", "p"),),
    wildcard_subscription_available=1,
    subscription_identifier_available=0,
    shared_subscription_available=1,
    server_keep_alive=120,
    response_information="resp",
    server_reference="other:1883",
    authentication_method="m",
    authentication_data=b"d",
)
REASON_PROPS = Properties(reason_string="because", user_properties=(("a", "b"), ("a", "b")))


def samples(version: int) -> list[Packet]:
    """Packets that round-trip exactly in ``version``."""
    v5 = version == V5
    name = "MQIsdp" if version == V3 else "MQTT"
    big = bytes(range(256)) * 80  # 20480 bytes: a 3-byte remaining length
    out: list[Packet] = [
        Connect("client-1", version, True, 60, protocol_name=name),
        Connect("", version, False, 0, protocol_name=name),
        Connect("c" * 40, version, True, 65535, "user", b"\x00pw\xff",
                Will("will/topic", b"bye", 2, True), protocol_name=name),
        Connect("c2", version, False, 10, "only-user", None, Will("w", b"", 0, False),
                protocol_name=name),
        ConnAck(version != V3, 0),
        ConnAck(False, 5 if not v5 else reasons.NOT_AUTHORIZED),
        Publish("a/b", b"hello"),
        Publish("a/b", b"", 0, True),
        Publish("ü/€/😀", b"\x00\xff", 1, False, True, 1),
        Publish("t", big, 2, True, False, 65535),
        Publish("x" * 200, b"y" * 16000, 1, False, False, 3),
        PubAck(1), PubRec(2), PubRel(3), PubComp(65535),
        Subscribe(10, (Subscription("a/+", 0), Subscription("#", 1), Subscription("$SYS/x", 2))),
        SubAck(10, (0, 1, 2, 0x80)),
        Unsubscribe(11, ("a/+", "#")),
        UnsubAck(11),
        PingReq(), PingResp(), Disconnect(),
    ]
    if v5:
        out += [
            Connect("c5", 5, True, 30, None, b"password-without-user", None, RICH_CONNECT),
            Connect("c6", 5, False, 0, "u", b"p", Will("w/t", b"payload", 1, False, RICH_WILL),
                    Properties(session_expiry_interval=5)),
            ConnAck(True, 0, RICH_CONNACK),
            ConnAck(False, reasons.BAD_AUTHENTICATION_METHOD, Properties(reason_string="no")),
            Publish("a/b", b"p", 1, True, True, 7, RICH_PUBLISH),
            Publish("", b"aliased", 0, False, False, None, Properties(topic_alias=5)),
            PubAck(1, reasons.NO_MATCHING_SUBSCRIBERS),
            PubAck(2, reasons.QUOTA_EXCEEDED, REASON_PROPS),
            PubAck(3, 0, REASON_PROPS),
            PubRec(4, reasons.PAYLOAD_FORMAT_INVALID, REASON_PROPS),
            PubRel(5, reasons.PACKET_IDENTIFIER_NOT_FOUND),
            PubRel(6, 0, Properties(user_properties=(("x", "y"),))),
            PubComp(7, reasons.PACKET_IDENTIFIER_NOT_FOUND, REASON_PROPS),
            Subscribe(12, (Subscription("a/#", 2, True, True, 2), Subscription("$share/g/b", 1,
                                                                             False, False, 1)),
                      Properties(subscription_identifiers=(268_435_455,),
                                 user_properties=(("s", "t"),))),
            SubAck(12, (2, 0x87, 0xA2, 0x9E), REASON_PROPS),
            Unsubscribe(13, ("a",), Properties(user_properties=(("k", "v"),))),
            UnsubAck(13, (0x00, 0x11, 0x80), REASON_PROPS),
            UnsubAck(14, (0x00,)),
            Disconnect(reasons.DISCONNECT_WITH_WILL),
            Disconnect(reasons.SERVER_MOVED, Properties(server_reference="elsewhere",
                                                        reason_string="moving")),
            Disconnect(0, Properties(session_expiry_interval=0)),
            Auth(),
            Auth(reasons.CONTINUE_AUTHENTICATION),
            Auth(reasons.RE_AUTHENTICATE, Properties(authentication_method="m",
                                                     authentication_data=b"\x01",
                                                     reason_string="r",
                                                     user_properties=(("a", "b"),))),
        ]
    return out


ALL_SAMPLES = [(v, p) for v in VERSIONS for p in samples(v)]
SAMPLE_IDS = [f"v{v}-{i}-{type(p).__name__}" for i, (v, p) in enumerate(ALL_SAMPLES)]


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "packet"), ALL_SAMPLES, ids=SAMPLE_IDS)
def test_roundtrip(version: int, packet: Packet) -> None:
    assert roundtrip(packet, version) == packet


@pytest.mark.parametrize(("version", "packet"), ALL_SAMPLES, ids=SAMPLE_IDS)
def test_every_truncated_prefix_needs_more_data(version: int, packet: Packet) -> None:
    data = encode(packet, version)
    for cut in range(len(data)):
        reader = PacketReader(version)
        assert reader.feed(data[:cut]) == []
        assert reader.pending() == data[:cut]
        assert PacketReader(version).feed_raw(data[:cut]) == []
        assert reader.feed(data[cut:]) == [packet]  # and the rest completes it
        assert reader.pending() == b""


@pytest.mark.parametrize("version", VERSIONS)
def test_byte_by_byte_equals_all_at_once(version: int) -> None:
    packets = samples(version)
    stream = b"".join(encode(p, version) for p in packets)
    whole = PacketReader(version).feed(stream)
    assert whole == packets
    reader = PacketReader(version)
    got: list[Packet] = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == packets
    assert reader.pending() == b""


@pytest.mark.parametrize("version", VERSIONS)
def test_feed_raw_frames_match_decode(version: int) -> None:
    packets = samples(version)
    stream = b"".join(encode(p, version) for p in packets)
    raw = PacketReader(version).feed_raw(stream)
    assert [decode(first, body, version) for first, body in raw] == packets
    assert [frame(first, bytes(body)) for first, body in raw] == [encode(p, version) for p in packets]


def test_decode_accepts_memoryview() -> None:
    first, body = split(encode(Publish("a", b"b", 1, packet_id=4), V4))
    assert decode(first, memoryview(body), V4) == Publish("a", b"b", 1, packet_id=4)


def test_pending_keeps_partial_tail() -> None:
    a = encode(Publish("a", b"1"), V4)
    b = encode(Publish("b", b"2"), V4)
    reader = PacketReader(V4)
    assert reader.feed(a + b[:3]) == [Publish("a", b"1")]
    assert reader.pending() == b[:3]
    assert reader.feed(b[3:] + a) == [Publish("b", b"2"), Publish("a", b"1")]
    assert reader.pending() == b""


def test_reader_adopts_version_of_connect() -> None:
    """A 5.0 CONNECT and a 5.0 PUBLISH in one segment: the PUBLISH is read as 5.0."""
    connect = Connect("c", 5, properties=Properties(session_expiry_interval=1))
    publish = Publish("t", b"x", 0, False, False, None, Properties(content_type="c"))
    reader = PacketReader(V4)
    assert reader.feed(encode(connect, V5) + encode(publish, V5)) == [connect, publish]
    assert reader.version == V5
    reader = PacketReader(V4)
    out = reader.feed(encode(Connect("c", 3, protocol_name="MQIsdp"), V3))
    assert out[0].protocol_version == 3 and reader.version == V3  # type: ignore[union-attr]


def test_no_properties_is_shared() -> None:
    for version in VERSIONS:
        p = roundtrip(Publish("a", b"b"), version)
        assert isinstance(p, Publish) and p.properties is NO_PROPERTIES
    p = roundtrip(Subscribe(1, (Subscription("a"),)), V5)
    assert isinstance(p, Subscribe) and p.properties is NO_PROPERTIES


def test_user_properties_keep_order_and_duplicates() -> None:
    pairs = (("b", "1"), ("a", "2"), ("b", "1"), ("b", "0"))
    p = roundtrip(Publish("t", properties=Properties(user_properties=pairs)), V5)
    assert isinstance(p, Publish) and p.properties.user_properties == pairs


# ---------------------------------------------------------------------------
# encoding for old versions / short forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", (V3, V4))
def test_old_versions_drop_v5_fields(version: int) -> None:
    assert encode(PubAck(1, 0x10, REASON_PROPS), version) == b"\x40\x02\x00\x01"
    assert encode(PubRel(1, 0x92), version) == b"\x62\x02\x00\x01"
    assert encode(UnsubAck(7, (0, 0x11)), version) == b"\xb0\x02\x00\x07"
    assert encode(Disconnect(0x8B, REASON_PROPS), version) == b"\xe0\x00"
    assert encode(ConnAck(False, 5), version) == b"\x20\x02\x00\x05"  # return code as given
    p = Publish("a", b"b", 1, False, False, 2, RICH_PUBLISH)
    assert roundtrip(p, version) == Publish("a", b"b", 1, False, False, 2)
    sub = Subscribe(1, (Subscription("a", 1, True, True, 2),), REASON_PROPS)
    assert encode(sub, version) == b"\x82\x06\x00\x01\x00\x01a\x01"
    with pytest.raises(ValueError):
        encode(Auth(), version)


def test_v3_connack_has_no_session_present() -> None:
    assert encode(ConnAck(True, 0), V3) == b"\x20\x02\x00\x00"
    assert encode(ConnAck(True, 0), V4) == b"\x20\x02\x01\x00"
    assert decode(0x20, b"\x01\x00", V3) == ConnAck(False, 0)  # reserved byte ignored in 3.1


def test_v5_short_forms() -> None:
    assert encode(PubAck(1), V5) == b"\x40\x02\x00\x01"
    assert encode(PubAck(1, 0, Properties()), V5) == b"\x40\x02\x00\x01"
    assert encode(PubRec(1, 0x10), V5) == b"\x50\x03\x00\x01\x10"
    assert encode(PubComp(1, 0, Properties(reason_string="r")), V5) == (
        b"\x70\x08\x00\x01\x00\x04\x1f\x00\x01r")
    assert encode(Disconnect(), V5) == b"\xe0\x00"
    assert encode(Disconnect(0x04), V5) == b"\xe0\x01\x04"
    assert encode(Auth(), V5) == b"\xf0\x00"
    assert encode(Auth(0x18), V5) == b"\xf0\x01\x18"
    # the long forms decode too
    assert decode(0x40, b"\x00\x01\x00\x00", V5) == PubAck(1)
    assert decode(0x40, b"\x00\x01\x00", V5) == PubAck(1)
    assert decode(0xE0, b"\x00\x00", V5) == Disconnect()
    assert decode(0xF0, b"\x00\x00", V5) == Auth()


def test_encode_rejects_unrepresentable_values() -> None:
    with pytest.raises(ValueError):
        encode(Publish("a", b"", 1), V4)  # no packet id
    with pytest.raises(ValueError):
        encode(Publish("a", b"", 3, packet_id=1), V4)
    with pytest.raises(ValueError):
        encode(Publish("a" * 70000), V4)
    with pytest.raises(ValueError):
        encode(PubAck(0), V4)
    with pytest.raises(ValueError):
        encode(PubAck(70000), V4)
    with pytest.raises(ValueError):  # topic alias is not a CONNACK property
        encode(ConnAck(properties=Properties(topic_alias=1)), V5)
    with pytest.raises(ValueError):
        encode(Publish("a", properties=Properties(receive_maximum=70000)), V5)
    with pytest.raises(TypeError):
        encode("not a packet", V4)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# golden bytes
# ---------------------------------------------------------------------------


def test_golden_connect_311_spec_example() -> None:
    # 3.1.1 §3.1.2.10 variable header example: MQTT, level 4, flags 0xCE, keep alive 10.
    packet = Connect("cid", 4, True, 10, "u", b"pw", Will("wt", b"wp", 1, False))
    expected = bytes.fromhex(
        "101e" "00044d515454" "04" "ce" "000a" "0003636964" "00027774" "00027770" "000175"
        "00027077")
    assert encode(packet, V4) == expected
    assert decode(expected[0], expected[2:], V4) == packet


def test_golden_connect_31() -> None:
    expected = bytes.fromhex("1010" "00064d5149736470" "03" "02" "003c" "00026331")
    assert encode(Connect("c1", 3, protocol_name="MQIsdp"), V3) == expected
    assert PacketReader(V4).feed(expected) == [Connect("c1", 3, protocol_name="MQIsdp")]


def test_golden_connect_5() -> None:
    packet = Connect("c", 5, True, 0, properties=Properties(session_expiry_interval=10))
    expected = bytes.fromhex("1013" "00044d515454" "05" "02" "0000" "05" "110000000a" "000163")
    assert encode(packet, V5) == expected


def test_golden_publish() -> None:
    assert encode(Publish("a/b", b"hi", 1, packet_id=10), V4) == bytes.fromhex(
        "3209" "0003612f62" "000a" "6869")
    assert encode(Publish("a/b", b"hi", 0, True), V5) == bytes.fromhex(
        "3108" "0003612f62" "00" "6869")
    assert encode(Publish("a/b", b"hi", 2, False, True, 1, Properties(topic_alias=1)), V5) == (
        bytes.fromhex("3c0d" "0003612f62" "0001" "03230001" "6869"))


def test_golden_subscribe_311_spec_example() -> None:
    packet = Subscribe(10, (Subscription("a/b", 1), Subscription("c/d", 2)))
    expected = bytes.fromhex("820e" "000a" "0003612f62" "01" "0003632f64" "02")
    assert encode(packet, V4) == expected
    assert decode(0x82, expected[2:], V4) == packet


def test_golden_subscribe_5_options() -> None:
    packet = Subscribe(1, (Subscription("a", 2, True, True, 2),),
                       Properties(subscription_identifiers=(300,)))
    assert encode(packet, V5) == bytes.fromhex("820a" "0001" "030bac02" "000161" "2e")


def test_golden_acks_and_pings() -> None:
    assert encode(ConnAck(False, 0), V5) == b"\x20\x03\x00\x00\x00"
    assert encode(ConnAck(True, 0), V4) == b"\x20\x02\x01\x00"
    assert encode(SubAck(10, (1, 0x80)), V4) == b"\x90\x04\x00\x0a\x01\x80"
    assert encode(UnsubAck(10, (0x11,)), V5) == b"\xb0\x04\x00\x0a\x00\x11"
    assert encode(PingReq(), V4) == b"\xc0\x00"
    assert encode(PingResp(), V5) == b"\xd0\x00"
    assert encode(Disconnect(), V4) == b"\xe0\x00"


def test_golden_properties() -> None:
    props = Properties(receive_maximum=20, user_properties=(("a", "b"),))
    assert encode_properties(props, PacketType.CONNECT) == bytes.fromhex(
        "0a" "210014" "26000161000162")
    assert encode_properties(NO_PROPERTIES, PacketType.PUBLISH) == b"\x00"
    assert encode_properties(Properties(will_delay_interval=1), WILL_PROPERTIES) == (
        b"\x05\x18\x00\x00\x00\x01")


@pytest.mark.parametrize(("n", "hexbytes"), [
    (0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
    (2_097_151, "ffff7f"), (2_097_152, "80808001"), (268_435_455, "ffffff7f"),
])
def test_remaining_length(n: int, hexbytes: str) -> None:
    assert encode_remaining_length(n) == bytes.fromhex(hexbytes)


def test_remaining_length_out_of_range() -> None:
    for n in (-1, 268_435_456):
        with pytest.raises(ValueError):
            encode_remaining_length(n)


def test_encode_publish_helper_matches_encode() -> None:
    props = Properties(subscription_identifiers=(3,))
    pb = encode_properties(props, PacketType.PUBLISH)
    assert encode_publish(b"t/x", b"data", 1, True, True, 9, pb) == encode(
        Publish("t/x", b"data", 1, True, True, 9, props), V5)
    assert encode_publish(b"t", b"d" * 300) == encode(Publish("t", b"d" * 300), V4)
    assert encode_publish(b"t", b"d", 0, False, True, 5) == encode(Publish("t", b"d"), V4)


# ---------------------------------------------------------------------------
# fixed header and framing rules
# ---------------------------------------------------------------------------

VALID_FIRST: dict[str, tuple[int, Packet]] = {  # type -> (version, a valid packet)
    "CONNECT": (V4, Connect("c")),
    "CONNACK": (V4, ConnAck()),
    "PUBACK": (V5, PubAck(1)),
    "PUBREC": (V4, PubRec(1)),
    "PUBREL": (V4, PubRel(1)),
    "PUBCOMP": (V5, PubComp(1)),
    "SUBSCRIBE": (V5, Subscribe(1, (Subscription("a"),))),
    "SUBACK": (V4, SubAck(1, (0,))),
    "UNSUBSCRIBE": (V4, Unsubscribe(1, ("a",))),
    "UNSUBACK": (V5, UnsubAck(1, (0,))),
    "PINGREQ": (V4, PingReq()),
    "PINGRESP": (V4, PingResp()),
    "DISCONNECT": (V5, Disconnect()),
    "AUTH": (V5, Auth()),
}


@pytest.mark.parametrize("name", list(VALID_FIRST))
def test_reserved_fixed_header_flags(name: str) -> None:
    # [MQTT-2.1.3-1] / 3.1.1 [MQTT-2.2.2-1], [MQTT-2.2.2-2]
    version, packet = VALID_FIRST[name]
    first, body = split(encode(packet, version))
    assert decode(first, body, version) == packet
    for flags in range(16):
        if flags == first & 0x0F:
            continue
        assert reason_of((first & 0xF0) | flags, body, version) == MALFORMED


def test_v31_allows_dup_on_pubrel_subscribe_unsubscribe() -> None:
    for packet in (PubRel(1), Subscribe(1, (Subscription("a"),)), Unsubscribe(1, ("a",))):
        first, body = split(encode(packet, V3))
        assert decode(first | 0x08, body, V3) == packet
        assert reason_of(first | 0x08, body, V4) == MALFORMED


def test_publish_qos3_is_malformed() -> None:
    for version in VERSIONS:
        assert reason_of(0x36, s("a") + b"\x00\x01" + (b"\x00" if version == V5 else b""),
                         version) == MALFORMED  # [MQTT-3.3.1-4]


def test_publish_qos0_with_dup_is_malformed() -> None:
    for version in VERSIONS:
        body = s("a") + (b"\x00" if version == V5 else b"")
        assert reason_of(0x38, body, version) == MALFORMED  # [MQTT-3.3.1-2]
        assert reason_of(0x39, body, version) == MALFORMED


def test_reserved_packet_types() -> None:
    for version in VERSIONS:
        assert reason_of(0x00, b"", version) == MALFORMED
    for version in (V3, V4):
        assert reason_of(0xF0, b"", version) == MALFORMED  # AUTH before 5.0


def test_decode_first_byte_out_of_range() -> None:
    for first in (-1, 256):
        with pytest.raises(ProtocolError) as exc:
            decode(first, b"", V4)
        assert exc.value.reason == MALFORMED


def test_remaining_length_more_than_four_bytes() -> None:
    # Detected as soon as the fourth length byte still says "more follows".
    for version in VERSIONS:
        reader = PacketReader(version)
        assert reader.feed(b"\x30\xff\xff\xff") == []
        with pytest.raises(ProtocolError) as exc:
            reader.feed(b"\xff")
        assert exc.value.reason == MALFORMED
        with pytest.raises(ProtocolError) as exc:
            PacketReader(version).feed_raw(b"\x30\x80\x80\x80\x80\x01")
        assert exc.value.reason == MALFORMED


def test_remaining_length_minimal_encoding_in_v5() -> None:
    padded = b"\x30\x86\x00" + s("a") + b"\x00" + b"xx"  # 6 in two bytes
    with pytest.raises(ProtocolError) as exc:
        PacketReader(V5).feed(padded)
    assert exc.value.reason == MALFORMED  # [MQTT-1.5.5-1]
    assert PacketReader(V4).feed(b"\x30\x85\x00" + s("a") + b"xx") == [Publish("a", b"xx")]


def test_oversize_packet_rejected_from_fixed_header() -> None:
    for version in VERSIONS:
        # 2 + 98 = 100 bytes: allowed, the reader waits for the body
        assert PacketReader(version, max_packet_size=100).feed(b"\x30\x62") == []
        # 2 + 99 = 101 bytes: refused before any of the body arrives
        with pytest.raises(ProtocolError) as exc:
            PacketReader(version, max_packet_size=100).feed(b"\x30\x63")
        assert exc.value.reason == reasons.PACKET_TOO_LARGE
        # remaining length split across feeds: 0x66 + 7 * 128 = 998, + 3 = 1001 bytes
        reader = PacketReader(version, max_packet_size=1000)
        assert reader.feed(b"\x30\xe6") == []
        with pytest.raises(ProtocolError) as exc:
            reader.feed(b"\x07")
        assert exc.value.reason == reasons.PACKET_TOO_LARGE
        # behind a good packet in the same chunk, with feed_raw: the good one is returned
        # first and the error is kept, then raised by the next feed
        good = encode(Publish("a", b"b"), version)
        reader = PacketReader(version, max_packet_size=100)
        assert len(reader.feed_raw(good + b"\x30\xff\x01")) == 1
        assert reader.error is not None and reader.error.reason == reasons.PACKET_TOO_LARGE
        with pytest.raises(ProtocolError) as exc:
            reader.feed_raw(b"")
        assert exc.value.reason == reasons.PACKET_TOO_LARGE
        # the limit can be changed on a live reader
        reader = PacketReader(version)
        reader.max_packet_size = 10
        with pytest.raises(ProtocolError) as exc:
            reader.feed(b"\x30\x09")
        assert exc.value.reason == reasons.PACKET_TOO_LARGE


def test_max_packet_size_is_inclusive() -> None:
    p = Publish("t", b"x" * 95)
    data = encode(p, V4)
    assert PacketReader(V4, max_packet_size=len(data)).feed(data) == [p]
    reader = PacketReader(V4, max_packet_size=len(data) - 1)
    with pytest.raises(ProtocolError) as exc:
        reader.feed(data[:2])
    assert exc.value.reason == reasons.PACKET_TOO_LARGE


# ---------------------------------------------------------------------------
# packet identifiers
# ---------------------------------------------------------------------------

ZERO_ID_BODIES: dict[str, tuple[int, bytes, bytes]] = {  # name -> (first, v4 body, v5 body)
    "PUBLISH": (0x32, s("a") + b"\x00\x00", s("a") + b"\x00\x00\x00"),
    "PUBACK": (0x40, b"\x00\x00", b"\x00\x00"),
    "PUBREC": (0x50, b"\x00\x00", b"\x00\x00\x10"),
    "PUBREL": (0x62, b"\x00\x00", b"\x00\x00"),
    "PUBCOMP": (0x70, b"\x00\x00", b"\x00\x00"),
    "SUBSCRIBE": (0x82, b"\x00\x00" + s("a") + b"\x00", b"\x00\x00\x00" + s("a") + b"\x00"),
    "SUBACK": (0x90, b"\x00\x00\x00", b"\x00\x00\x00\x00"),
    "UNSUBSCRIBE": (0xA2, b"\x00\x00" + s("a"), b"\x00\x00\x00" + s("a")),
    "UNSUBACK": (0xB0, b"\x00\x00", b"\x00\x00\x00\x00"),
}


@pytest.mark.parametrize("name", list(ZERO_ID_BODIES))
def test_packet_id_zero(name: str) -> None:
    # [MQTT-2.2.1-3] / 3.1.1 [MQTT-2.3.1-1]
    first, v4_body, v5_body = ZERO_ID_BODIES[name]
    assert reason_of(first, v4_body, V4) == MALFORMED
    assert reason_of(first, v4_body, V3) == MALFORMED
    assert reason_of(first, v5_body, V5) == PROTOCOL
    # and with id 1 the same bytes are fine
    v5_ok = v5_body[:1] + b"\x01" + v5_body[2:] if name != "PUBLISH" else s("a") + b"\x00\x01\x00"
    decode(first, v5_ok, V5)


# ---------------------------------------------------------------------------
# strings
# ---------------------------------------------------------------------------

BAD_UTF8 = {
    "invalid byte": b"a\xff",
    "truncated sequence": b"\xe2\x82",
    "overlong": b"\xc0\xaf",
    "surrogate": b"\xed\xa0\x80",
    "U+0000": b"a\x00b",
}


@pytest.mark.parametrize("raw", list(BAD_UTF8.values()), ids=list(BAD_UTF8))
@pytest.mark.parametrize("version", VERSIONS)
def test_bad_utf8_is_malformed(raw: bytes, version: int) -> None:
    # [MQTT-1.5.4-1], [MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-1], [MQTT-1.5.3-2])
    v5 = version == V5
    pprops = b"\x00" if v5 else b""
    assert reason_of(0x30, s(raw) + pprops + b"payload", version) == MALFORMED
    name = b"MQIsdp" if version == V3 else b"MQTT"
    assert reason_of(0x10, connect_body(0x02, s(raw), name, version, pprops), version) == MALFORMED
    assert reason_of(0x10, connect_body(0x82, s("c") + s(raw), name, version, pprops),
                     version) == MALFORMED
    assert reason_of(0x82, b"\x00\x01" + pprops + s(raw) + b"\x00", version) == MALFORMED
    assert reason_of(0xA2, b"\x00\x01" + pprops + s(raw), version) == MALFORMED
    if v5:
        user = b"\x26" + s("k") + s(raw)
        assert reason_of(0x30, s("t") + props_block(user), V5) == MALFORMED
        assert reason_of(0x30, s("t") + props_block(b"\x03" + s(raw)), V5) == MALFORMED


def test_non_ascii_and_bom_are_kept() -> None:
    topic = "\ufeffa/ü/\U0001f600/\uffff"
    assert roundtrip(Publish(topic), V4) == Publish(topic)


@pytest.mark.parametrize("version", VERSIONS)
def test_lengths_exceeding_body(version: int) -> None:
    pprops = b"\x00" if version == V5 else b""
    assert reason_of(0x30, b"\x00\x05abc", version) == MALFORMED
    assert reason_of(0x30, b"\x00", version) == MALFORMED
    assert reason_of(0x30, b"", version) == MALFORMED
    assert reason_of(0x32, s("a") + b"\x00", version) == MALFORMED  # truncated packet id
    assert reason_of(0x82, b"\x00\x01" + pprops + b"\x00\x09ab", version) == MALFORMED
    assert reason_of(0x82, b"\x00\x01" + pprops + s("ab"), version) == MALFORMED  # no options
    assert reason_of(0x82, b"\x00", version) == MALFORMED
    name = b"MQIsdp" if version == V3 else b"MQTT"
    body = connect_body(0xC2, s("c") + s("u") + b"\x00\x09pw", name, version, pprops)
    assert reason_of(0x10, body, version) == MALFORMED  # password longer than packet
    body = connect_body(0x06, s("c") + (pprops) + s("wt"), name, version, pprops)
    assert reason_of(0x10, body, version) == MALFORMED  # will payload missing


# ---------------------------------------------------------------------------
# CONNECT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "level"), [
    (b"MQTT", 3), (b"MQIsdp", 4), (b"MQIsdp", 5), (b"MQTX", 4), (b"MQTT", 6), (b"MQTT", 0),
    (b"", 4), (b"mqtt", 4), (b"\xff\xfe", 4),
])
def test_connect_unknown_protocol(name: bytes, level: int) -> None:
    body = connect_body(0x02, s("c"), name, level)
    for version in VERSIONS:  # the connection version does not matter for CONNECT
        assert reason_of(0x10, body, version) == reasons.UNSUPPORTED_PROTOCOL_VERSION
    with pytest.raises(ProtocolError) as exc:
        connect_version(body)
    assert exc.value.reason == reasons.UNSUPPORTED_PROTOCOL_VERSION


def test_connect_version() -> None:
    assert connect_version(connect_body(0x02, s("c"), b"MQIsdp", 3)) == 3
    assert connect_version(connect_body(0x02, s("c"), b"MQTT", 4)) == 4
    assert connect_version(memoryview(connect_body(0x02, s("c"), b"MQTT", 5))) == 5
    assert connect_version(s("MQTT") + b"\x05") == 5  # only the level is needed
    for short in (b"", b"\x00", b"\x00\x04MQ", b"\x00\x04MQTT", b"\x00\x06MQIsdp"):
        with pytest.raises(ProtocolError) as exc:
            connect_version(short)
        assert exc.value.reason == MALFORMED


def test_connect_ignores_connection_version() -> None:
    packet = Connect("c", 5, properties=Properties(receive_maximum=3))
    first, body = split(encode(packet, V5))
    for version in VERSIONS:
        assert decode(first, body, version) == packet


@pytest.mark.parametrize("level", VERSIONS)
def test_connect_flag_rules(level: int) -> None:
    name = b"MQIsdp" if level == V3 else b"MQTT"
    props = b"\x00" if level == V5 else b""

    def bad(flags: int, payload: bytes = s("c")) -> int:
        return reason_of(0x10, connect_body(flags, payload, name, level, props), V4)

    assert bad(0x03) == MALFORMED  # reserved bit [MQTT-3.1.2-3]
    assert bad(0x08) == MALFORMED  # will QoS 1 without will flag [MQTT-3.1.2-11]
    assert bad(0x10) == MALFORMED  # will QoS 2 without will flag
    assert bad(0x20) == MALFORMED  # will retain without will flag [MQTT-3.1.2-13]
    will = s("c") + props + s("wt") + s("wp")
    assert bad(0x1C, will) == MALFORMED  # will QoS 3 [MQTT-3.1.2-12]
    assert bad(0x02, s("c") + b"x") == MALFORMED  # leftover bytes
    assert bad(0x06, will + b"\x00") == MALFORMED
    assert bad(0x82, s("c") + s("u") + b"zz") == MALFORMED
    assert bad(0x02, b"") == MALFORMED  # no client id at all
    # password without user name: 3.1.1 [MQTT-3.1.2-22] (and 3.1); fine in 5.0
    body = connect_body(0x42, s("c") + s("pw"), name, level, props)
    if level == V5:
        assert decode(0x10, body, V5) == Connect("c", 5, True, 60, None, b"pw")
    else:
        assert reason_of(0x10, body, V4) == MALFORMED
    # ok: will with QoS 2 + retain
    ok = decode(0x10, connect_body(0x36, will, name, level, props), V4)
    assert isinstance(ok, Connect) and ok.will == Will("wt", b"wp", 2, True)


def test_connect_empty_and_long_client_ids() -> None:
    for version, name in ((V3, b"MQIsdp"), (V4, b"MQTT"), (V5, b"MQTT")):
        props = b"\x00" if version == V5 else b""
        for cid in ("", "x" * 100):
            p = decode(0x10, connect_body(0x00, s(cid), name, version, props), version)
            assert isinstance(p, Connect) and p.client_id == cid


def test_v31_tolerates_missing_trailing_credentials() -> None:
    body = connect_body(0xC2, s("c"), b"MQIsdp", 3)
    assert decode(0x10, body, V3) == Connect("c", 3, protocol_name="MQIsdp")
    with pytest.raises(ProtocolError):
        decode(0x10, connect_body(0xC2, s("c"), b"MQTT", 4), V4)


def test_connect_auth_data_without_method() -> None:
    body = connect_body(0x02, s("c"), b"MQTT", 5, props_block(b"\x16" + s("d")))
    assert reason_of(0x10, body, V5) == PROTOCOL


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


def v5_publish(props: bytes) -> tuple[int, bytes]:
    return 0x30, s("t") + props_block(props) + b"payload"


@pytest.mark.parametrize(("props", "reason"), [
    (b"\x11\x00\x00\x00\x01", MALFORMED),  # session expiry not allowed in PUBLISH
    (b"\x1f" + s("r"), MALFORMED),  # reason string not allowed in PUBLISH
    (b"\x21\x00\x01", MALFORMED),  # receive maximum not allowed in PUBLISH
    (b"\x04\x00", MALFORMED),  # unknown identifier
    (b"\x7f\x00", MALFORMED),
    (b"\x80\x01\x00", MALFORMED),  # multi-byte identifier: unknown
    (b"\x02\x00\x00\x00\x01\x02\x00\x00\x00\x01", PROTOCOL),  # duplicate message expiry
    (b"\x03" + s("a") + b"\x03" + s("a"), PROTOCOL),  # duplicate content type
    (b"\x23\x00\x01\x23\x00\x02", PROTOCOL),  # duplicate topic alias
    (b"\x01\x02", PROTOCOL),  # payload format indicator 2
    (b"\x01\xff", PROTOCOL),
    (b"\x0b\x00", PROTOCOL),  # subscription identifier 0
    (b"\x0b\x80\x80\x80\x80\x01", MALFORMED),  # 5-byte VBI
    (b"\x0b\x80\x00", MALFORMED),  # non-minimal VBI [MQTT-1.5.5-1]
    (b"\x0b", MALFORMED),  # truncated VBI
    (b"\x02\x00\x00", MALFORMED),  # truncated four byte integer
    (b"\x23\x00", MALFORMED),  # truncated two byte integer
    (b"\x01", MALFORMED),  # truncated byte
    (b"\x09\x00\x05ab", MALFORMED),  # binary longer than property block
    (b"\x26" + s("k"), MALFORMED),  # user property without value
])
def test_publish_property_errors(props: bytes, reason: int) -> None:
    first, body = v5_publish(props)
    assert reason_of(first, body, V5) == reason


def test_property_length_errors() -> None:
    assert reason_of(0x30, s("t") + b"\x05\x23\x00\x01", V5) == MALFORMED  # beyond packet
    assert reason_of(0x30, s("t"), V5) == MALFORMED  # missing property length
    assert reason_of(0x30, s("t") + b"\x80", V5) == MALFORMED  # truncated length
    assert reason_of(0x30, s("t") + b"\xff\xff\xff\xff\x01", V5) == MALFORMED
    assert reason_of(0x32, s("t") + b"\x00\x01", V5) == MALFORMED  # no length after pid
    # a string property running past the property block but not the packet
    assert reason_of(0x30, s("t") + b"\x02\x03\x00" + b"\x01a", V5) == MALFORMED


def test_property_values_left_to_broker() -> None:
    p = decode(*v5_publish(b"\x23\x00\x00"), V5)  # topic alias 0: the broker judges it
    assert isinstance(p, Publish) and p.properties.topic_alias == 0
    p = decode(*v5_publish(b"\x0b\x01\x0b\x02\x0b\x01"), V5)  # repeated sub ids in PUBLISH
    assert isinstance(p, Publish) and p.properties.subscription_identifiers == (1, 2, 1)


@pytest.mark.parametrize(("props", "reason"), [
    (b"\x21\x00\x00", PROTOCOL),  # receive maximum 0
    (b"\x27\x00\x00\x00\x00", PROTOCOL),  # maximum packet size 0
    (b"\x17\x02", PROTOCOL),  # request problem information 2
    (b"\x19\x02", PROTOCOL),  # request response information 2
    (b"\x11\x00\x00\x00\x01\x11\x00\x00\x00\x01", PROTOCOL),  # duplicate session expiry
    (b"\x15" + s("a") + b"\x15" + s("a"), PROTOCOL),  # duplicate auth method
    (b"\x23\x00\x01", MALFORMED),  # topic alias not allowed in CONNECT
    (b"\x18\x00\x00\x00\x01", MALFORMED),  # will delay belongs to the will properties
])
def test_connect_property_errors(props: bytes, reason: int) -> None:
    body = connect_body(0x02, s("c"), b"MQTT", 5, props_block(props))
    assert reason_of(0x10, body, V5) == reason


def test_will_property_errors() -> None:
    def will_body(wprops: bytes) -> bytes:
        return connect_body(0x06, s("c") + props_block(wprops) + s("w") + s("p"), b"MQTT", 5,
                            b"\x00")

    assert reason_of(0x10, will_body(b"\x11\x00\x00\x00\x01"), V5) == MALFORMED
    assert reason_of(0x10, will_body(b"\x01\x02"), V5) == PROTOCOL
    assert reason_of(0x10, will_body(b"\x18\x00\x00\x00\x01" * 2), V5) == PROTOCOL
    p = decode(0x10, will_body(b"\x18\x00\x00\x00\x01"), V5)
    assert isinstance(p, Connect) and p.will is not None
    assert p.will.properties == Properties(will_delay_interval=1)


@pytest.mark.parametrize(("props", "reason"), [
    (b"\x24\x02", PROTOCOL),  # maximum QoS 2
    (b"\x25\x02", PROTOCOL),  # retain available 2
    (b"\x28\x02", PROTOCOL),
    (b"\x29\x05", PROTOCOL),
    (b"\x2a\x02", PROTOCOL),
    (b"\x21\x00\x00", PROTOCOL),
    (b"\x01\x00", MALFORMED),  # payload format indicator not allowed in CONNACK
])
def test_connack_property_errors(props: bytes, reason: int) -> None:
    assert reason_of(0x20, b"\x00\x00" + props_block(props), V5) == reason


def test_subscribe_subscription_identifier_rules() -> None:
    def sub(props: bytes) -> bytes:
        return b"\x00\x01" + props_block(props) + s("a") + b"\x00"

    assert reason_of(0x82, sub(b"\x0b\x01\x0b\x02"), V5) == PROTOCOL  # at most once
    assert reason_of(0x82, sub(b"\x0b\x00"), V5) == PROTOCOL
    assert reason_of(0x82, sub(b"\x01\x01"), V5) == MALFORMED
    p = decode(0x82, sub(b"\x0b\x7f"), V5)
    assert isinstance(p, Subscribe) and p.properties.subscription_identifiers == (127,)


@pytest.mark.parametrize(("first", "body"), [
    (0x40, b"\x00\x01\x00\x03\x03\x00\x01"),  # subscription id in PUBACK
    (0x62, b"\x00\x01\x00\x02\x01\x00"),
    (0x90, b"\x00\x01\x02\x21\x00\x00"),
    (0xA2, b"\x00\x01\x02\x1f\x00" + s("a")),  # reason string in UNSUBSCRIBE
    (0xB0, b"\x00\x01\x02\x01\x00\x00"),
    (0xE0, b"\x00\x02\x01\x00"),
    (0xF0, b"\x18\x02\x01\x00"),
])
def test_property_not_allowed_in_other_packets(first: int, body: bytes) -> None:
    assert reason_of(first, body, V5) == MALFORMED


# ---------------------------------------------------------------------------
# SUBSCRIBE / UNSUBSCRIBE / acks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_rules(version: int) -> None:
    pprops = b"\x00" if version == V5 else b""
    head = b"\x00\x01" + pprops
    assert reason_of(0x82, head, version) == PROTOCOL  # [MQTT-3.8.3-2] / 3.1.1 [MQTT-3.8.3-3]
    # QoS 3: 5.0 3.8.3.1 "It is a Protocol Error"; 3.1.1 [MQTT-3.8.3-4] malformed
    assert reason_of(0x82, head + s("a") + b"\x03", version) == (PROTOCOL if version == V5 else MALFORMED)
    # ... but a packet that does not parse further on is malformed, whatever came before
    assert reason_of(0x82, head + s("a") + b"\x03" + s("b"), version) == MALFORMED
    assert reason_of(0x82, head + s("a") + b"\x01" + s("b") + b"\x43", version) == MALFORMED
    assert reason_of(0x82, head + s("a") + b"\x80", version) == MALFORMED  # reserved bits
    if version == V5:
        assert reason_of(0x82, head + s("a") + b"\x30", V5) == PROTOCOL  # retain handling 3
        assert reason_of(0x82, head + s("a") + b"\x30" + s("b") + b"\x80", V5) == MALFORMED
        p = decode(0x82, head + s("a") + b"\x2e", V5)
        assert p == Subscribe(1, (Subscription("a", 2, True, True, 2),))
    else:
        for opts in (0x04, 0x08, 0x10, 0x20, 0x30):  # 5.0 option bits are reserved here
            assert reason_of(0x82, head + s("a") + bytes((opts,)), version) == MALFORMED
        assert decode(0x82, head + s("a") + b"\x02", version) == Subscribe(
            1, (Subscription("a", 2),))


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_needs_a_filter(version: int) -> None:
    pprops = b"\x00" if version == V5 else b""
    assert reason_of(0xA2, b"\x00\x01" + pprops, version) == PROTOCOL  # [MQTT-3.10.3-2]
    assert reason_of(0xA2, b"\x00\x01" + pprops + s("a") + b"\x00", version) == MALFORMED


@pytest.mark.parametrize(("first", "body"), [
    (0x40, b"\x00\x01\x05"),  # PUBACK reason 0x05 [MQTT-3.4.2-1]
    (0x50, b"\x00\x01\x92"),  # PUBREC cannot say "packet id not found"
    (0x62, b"\x00\x01\x10"),  # PUBREL [MQTT-3.6.2-1]
    (0x70, b"\x00\x01\x80"),  # PUBCOMP [MQTT-3.7.2-1]
    (0x20, b"\x00\x01\x00"),  # CONNACK [MQTT-3.2.2-8]
    (0x90, b"\x00\x01\x00\x03"),  # SUBACK [MQTT-3.9.3-2]
    (0xB0, b"\x00\x01\x00\x01"),  # UNSUBACK [MQTT-3.11.3-2]
    (0xE0, b"\x01"),  # DISCONNECT [MQTT-3.14.2-1]
    (0xF0, b"\x01"),  # AUTH [MQTT-3.15.2-1]
])
def test_v5_unknown_reason_codes(first: int, body: bytes) -> None:
    assert reason_of(first, body, V5) == PROTOCOL


@pytest.mark.parametrize(("first", "body"), [
    # each: a Protocol Error early in the packet, then bytes that do not parse (1.2: a Protocol
    # Error is found in a packet that parses, so the packet is a Malformed Packet)
    (0x32, s("a/b") + b"\x00\x00" + b"\x05\x26\x00"),  # PUBLISH packet identifier 0, bad property
    (0x40, b"\x00\x01\x05\x02\x26"),  # PUBACK reason 0x05, truncated property
    (0x40, b"\x00\x00\x00\x01"),  # PUBACK packet identifier 0, property length past the packet
    (0x82, b"\x00\x00\x00" + s("a") + b"\x00" + s("b")),  # SUBSCRIBE id 0, options missing
    (0xA2, b"\x00\x00\x00" + s("a") + b"\x00"),  # UNSUBSCRIBE id 0, truncated filter
    (0xE0, b"\x05\x02\x11"),  # DISCONNECT reason 0x05, truncated property
    (0xF0, b"\x01\x02\x15"),  # AUTH reason 0x01, truncated property
    # CONNECT with Authentication Data but no Method, then a client identifier past the packet
    (0x10, s("MQTT") + b"\x05\x02\x00\x3c" + b"\x04\x16\x00\x01x" + b"\x00\x09ab"),
])
def test_v5_malformed_wins_over_an_earlier_protocol_error(first: int, body: bytes) -> None:
    assert reason_of(first, body, V5) == MALFORMED


def test_v5_protocol_errors_of_whole_packets() -> None:
    """The same Protocol Errors in packets that parse."""
    assert reason_of(0x32, s("a/b") + b"\x00\x00\x00", V5) == PROTOCOL
    assert reason_of(0x40, b"\x00\x00\x00\x00", V5) == PROTOCOL
    assert reason_of(0x82, b"\x00\x00\x00" + s("a") + b"\x00", V5) == PROTOCOL
    assert reason_of(0xA2, b"\x00\x00\x00" + s("a"), V5) == PROTOCOL
    assert reason_of(0xE0, b"\x05\x00", V5) == PROTOCOL
    assert reason_of(0xF0, b"\x01\x00", V5) == PROTOCOL
    assert reason_of(0x10, s("MQTT") + b"\x05\x02\x00\x3c" + b"\x04\x16\x00\x01x" + s("c"), V5) == PROTOCOL


def test_v311_suback_return_codes() -> None:
    assert reason_of(0x90, b"\x00\x01\x03", V4) == PROTOCOL  # 3.1.1 [MQTT-3.9.3-2]
    assert decode(0x90, b"\x00\x01\x00\x01\x02\x80", V4) == SubAck(1, (0, 1, 2, 0x80))


@pytest.mark.parametrize("version", (V3, V4))
def test_old_version_fixed_lengths(version: int) -> None:
    for first in (0x40, 0x50, 0x62, 0x70, 0xB0):
        assert reason_of(first, b"\x00\x01\x00", version) == MALFORMED
        assert reason_of(first, b"\x00", version) == MALFORMED
    assert reason_of(0x20, b"\x00", version) == MALFORMED
    assert reason_of(0x20, b"\x00\x00\x00", version) == MALFORMED
    assert reason_of(0xE0, b"\x00", version) == MALFORMED  # DISCONNECT has no body


def test_v5_trailing_bytes_after_properties() -> None:
    assert reason_of(0x40, b"\x00\x01\x10\x00\xff", V5) == MALFORMED
    assert reason_of(0xE0, b"\x00\x00\xff", V5) == MALFORMED
    assert reason_of(0xF0, b"\x18\x00\xff", V5) == MALFORMED
    assert reason_of(0x20, b"\x00\x00\x00\xff", V5) == MALFORMED
    assert reason_of(0x20, b"\x00\x00", V5) == MALFORMED  # property length is required
    assert reason_of(0x40, b"\x00", V5) == MALFORMED


def test_connack_reserved_flags() -> None:
    assert reason_of(0x20, b"\x02\x00", V4) == MALFORMED  # 3.1.1 §3.2.2.1
    assert reason_of(0x20, b"\x80\x00\x00", V5) == MALFORMED  # [MQTT-3.2.2-1]


@pytest.mark.parametrize("version", VERSIONS)
def test_pings_and_disconnect_bodies(version: int) -> None:
    assert reason_of(0xC0, b"\x00", version) == MALFORMED
    assert reason_of(0xD0, b"\x00", version) == MALFORMED
    if version != V5:
        assert reason_of(0xE0, b"\x00", version) == MALFORMED
    assert decode(0xC0, b"", version) == PingReq()


# ---------------------------------------------------------------------------
# hypothesis
# ---------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=12)
FILTERS = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), min_size=1, max_size=12)  # [MQTT-4.7.3-1]
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
BOOL01 = st.integers(0, 1)
PIDS = st.integers(1, 0xFFFF)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=3).map(tuple)

PROP_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": BOOL01,
    "message_expiry_interval": U32,
    "content_type": TEXT,
    "response_topic": TEXT,
    "correlation_data": st.binary(max_size=10),
    "session_expiry_interval": U32,
    "assigned_client_identifier": TEXT,
    "server_keep_alive": U16,
    "authentication_method": TEXT,
    "authentication_data": st.binary(max_size=10),
    "request_problem_information": BOOL01,
    "will_delay_interval": U32,
    "request_response_information": BOOL01,
    "response_information": TEXT,
    "server_reference": TEXT,
    "reason_string": TEXT,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": U16,
    "topic_alias": U16,
    "maximum_qos": BOOL01,
    "retain_available": BOOL01,
    "user_properties": PAIRS,
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    "wildcard_subscription_available": BOOL01,
    "subscription_identifier_available": BOOL01,
    "shared_subscription_available": BOOL01,
}


def properties(*names: str, sub_ids: int = 0) -> st.SearchStrategy[Properties]:
    optional = {n: PROP_VALUES[n] for n in names}
    if sub_ids:
        optional["subscription_identifiers"] = st.lists(
            st.integers(1, 268_435_455), min_size=1, max_size=sub_ids).map(tuple)
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: Properties(**kw))


PUBLISH_PROPS = properties("payload_format_indicator", "message_expiry_interval", "content_type",
                           "response_topic", "correlation_data", "topic_alias",
                           "user_properties", sub_ids=3)
CONNECT_PROPS = properties("session_expiry_interval", "receive_maximum", "maximum_packet_size",
                           "topic_alias_maximum", "request_response_information",
                           "request_problem_information", "user_properties",
                           "authentication_method")
WILL_PROPS = properties("will_delay_interval", "payload_format_indicator",
                        "message_expiry_interval", "content_type", "response_topic",
                        "correlation_data", "user_properties")


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        draw(TEXT),
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(PIDS) if qos else None,
        draw(PUBLISH_PROPS) if version == V5 else NO_PROPERTIES,
    )


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    v5 = version == V5
    subs = draw(st.lists(st.builds(
        Subscription, FILTERS, st.integers(0, 2),
        st.booleans() if v5 else st.just(False),
        st.booleans() if v5 else st.just(False),
        st.integers(0, 2) if v5 else st.just(0)), min_size=1, max_size=4))
    props = draw(properties("user_properties", sub_ids=1)) if v5 else NO_PROPERTIES
    return Subscribe(draw(PIDS), tuple(subs), props)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    v5 = version == V5
    will = draw(st.none() | st.builds(
        Will, TEXT, st.binary(max_size=20), st.integers(0, 2), st.booleans(),
        WILL_PROPS if v5 else st.just(NO_PROPERTIES)))
    username = draw(st.none() | TEXT)
    password = draw(st.none() | st.binary(max_size=20))
    if not v5 and username is None:
        password = None
    return Connect(
        draw(TEXT), version, draw(st.booleans()), draw(U16), username, password, will,
        draw(CONNECT_PROPS) if v5 else NO_PROPERTIES,
        "MQIsdp" if version == V3 else "MQTT",
    )


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_hypothesis_publish_roundtrip(version: int, data: st.DataObject) -> None:
    p = data.draw(publishes(version))
    assert roundtrip(p, version) == p


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_hypothesis_subscribe_roundtrip(version: int, data: st.DataObject) -> None:
    p = data.draw(subscribes(version))
    assert roundtrip(p, version) == p


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_hypothesis_connect_roundtrip(version: int, data: st.DataObject) -> None:
    p = data.draw(connects(version))
    assert roundtrip(p, version) == p


PACKET_CLASSES = (Connect, ConnAck, Publish, PubAck, PubRec, PubRel, PubComp, Subscribe, SubAck,
                  Unsubscribe, UnsubAck, PingReq, PingResp, Disconnect, Auth)


def _only_protocol_errors(reader: PacketReader, data: bytes) -> None:
    try:
        for packet in reader.feed(data):
            assert isinstance(packet, PACKET_CLASSES)
    except ProtocolError as exc:
        assert exc.reason in (MALFORMED, PROTOCOL, reasons.UNSUPPORTED_PROTOCOL_VERSION,
                              reasons.PACKET_TOO_LARGE)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.binary(max_size=200))
def test_hypothesis_random_bytes_only_protocol_error(version: int, data: bytes) -> None:
    _only_protocol_errors(PacketReader(version, max_packet_size=150), data)
    try:
        for first, body in PacketReader(version).feed_raw(data):
            _decode_safely(first, body, version)
    except ProtocolError:
        pass


def _decode_safely(first: int, body: bytes | memoryview, version: int) -> None:
    try:
        decode(first, body, version)
    except ProtocolError:
        pass


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(first=st.integers(0, 255), body=st.binary(max_size=60))
def test_hypothesis_random_bodies_only_protocol_error(version: int, first: int,
                                                      body: bytes) -> None:
    _decode_safely(first, body, version)
    try:
        connect_version(body)
    except ProtocolError:
        pass


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_hypothesis_mutated_packets_only_protocol_error(version: int,
                                                        data: st.DataObject) -> None:
    """Flip, insert or drop bytes in valid encodings: structured garbage."""
    packets = samples(version)
    raw = bytearray(encode(data.draw(st.sampled_from(packets)), version))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.integers(0, 2))
        if op == 0:
            raw[i] = data.draw(st.integers(0, 255))
        elif op == 1:
            raw.insert(i, data.draw(st.integers(0, 255)))
        elif len(raw) > 1:
            del raw[i]
    _only_protocol_errors(PacketReader(version), bytes(raw))
    if len(raw) >= 1:
        _decode_safely(raw[0], bytes(raw[2:]), version)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_hypothesis_any_chunking_gives_same_packets(version: int, cuts: list[int]) -> None:
    packets = samples(version)
    stream = b"".join(encode(p, version) for p in packets)
    reader = PacketReader(version)
    got: list[Packet] = []
    prev = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        got += reader.feed(stream[prev:cut])
        prev = cut
    assert got == packets


# ---------------------------------------------------------------------------
# strict_utf8: control characters and non-characters (5.0 1.5.4, 3.1.1 1.5.3)
# ---------------------------------------------------------------------------

CLIENT_ID_NOT_VALID = reasons.CLIENT_IDENTIFIER_NOT_VALID
# Boundaries of each disallowed range, and their neighbours that are allowed.
DISALLOWED = ("\x01", "\x07", "\x0a", "\x1f", "\x7f", "\x85", "\x9f", "\ufdd0", "\ufdef", "\ufffe", "\uffff",
              "\U0001fffe", "\U0001ffff", "\U0010fffe", "\U0010ffff")
ALLOWED = (" ", "~", "\xa0", "\xe9", "\ufdcf", "\ufdf0", "\ufeff", "\ufffd", "\u200d", "\U0001fffd",
           "\U0001f600", "\U0010fffd")


def strict_reason(data: bytes, version: int) -> ProtocolError:
    """``data`` (one whole packet) decodes without ``strict_utf8`` but is refused with it, by
    ``decode`` and by ``PacketReader`` alike; returns the error."""
    first, body = split(data)
    assert decode(first, body, version) is not None
    assert len(PacketReader(version).feed(data)) == 1
    with pytest.raises(ProtocolError) as direct:
        decode(first, body, version, strict_utf8=True)
    with pytest.raises(ProtocolError) as framed:
        PacketReader(version, strict_utf8=True).feed(data)
    assert framed.value.reason == direct.value.reason
    return direct.value


def _connect(version: int, **kw: Any) -> bytes:
    fields: dict[str, Any] = {"client_id": "c", "protocol_version": version,
                              "protocol_name": "MQIsdp" if version == V3 else "MQTT"}
    fields.update(kw)
    return encode(Connect(**fields), version)


@pytest.mark.parametrize("char", DISALLOWED)
def test_disallowed_code_points_are_found(char: str) -> None:
    assert disallowed_code_point("a/" + char + "/b") == ord(char)


@pytest.mark.parametrize("char", ALLOWED)
def test_allowed_code_points_are_not(char: str) -> None:
    assert disallowed_code_point("a/" + char + "/b") is None


def _naive_disallowed(text: str) -> bool:
    return any(0x01 <= c <= 0x1F or 0x7F <= c <= 0x9F or 0xFDD0 <= c <= 0xFDEF or c & 0xFFFE == 0xFFFE
               for c in map(ord, text))


@FUZZ
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_hypothesis_disallowed_matches_the_list(text: str) -> None:
    bad = disallowed_code_point(text)
    assert (bad is not None) == _naive_disallowed(text)
    assert bad is None or _naive_disallowed(chr(bad))


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_client_id_is_not_valid(version: int) -> None:
    # [MQTT-3.1.3-8] CONNACK 0x85 (3.1.1 [MQTT-3.1.3-9]: return code 2, via V5_TO_V3_CONNACK).
    exc = strict_reason(_connect(version, client_id="dev\x1b[2Jice"), version)
    assert exc.reason == CLIENT_ID_NOT_VALID
    assert reasons.V5_TO_V3_CONNACK[exc.reason] == reasons.V3_IDENTIFIER_REJECTED
    assert "U+001B" in exc.message and "\x1b" not in exc.message


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_client_id_in_a_malformed_connect_is_malformed(version: int) -> None:
    first, body = split(_connect(version, client_id="a\x01"))
    with pytest.raises(ProtocolError) as info:
        decode(first, body + b"\x00", version, strict_utf8=True)
    assert info.value.reason == MALFORMED


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_user_name_is_malformed(version: int) -> None:
    exc = strict_reason(_connect(version, username="bob\x7f", password=b"pw"), version)
    assert exc.reason == MALFORMED
    assert "user name" in exc.message and "U+007F" in exc.message


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_will_topic_is_malformed(version: int) -> None:
    exc = strict_reason(_connect(version, will=Will("last/\x85will", b"bye")), version)
    assert exc.reason == MALFORMED
    assert "will topic" in exc.message and "U+0085" in exc.message


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_publish_topic_is_malformed(version: int) -> None:
    exc = strict_reason(encode(Publish("a/\ufffe", b"x", 1, packet_id=1), version), version)
    assert exc.reason == MALFORMED
    assert "topic" in exc.message and "U+FFFE" in exc.message


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_publish_topic_seen_clean_stays_accepted(version: int) -> None:
    """The memo of clean topic names lets the same topic through again, not its neighbours."""
    good = encode(Publish("memo/topic", b"1"), version)
    reader = PacketReader(version, strict_utf8=True)
    assert [p.topic for p in reader.feed(good + good)] == ["memo/topic", "memo/topic"]  # type: ignore[attr-defined]
    strict_reason(encode(Publish("memo/topic\x01", b"2"), version), version)


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_subscribe_filter_is_malformed(version: int) -> None:
    data = encode(Subscribe(3, (Subscription("ok/#", 1), Subscription("bad/\ufdd0/+", 1))), version)
    exc = strict_reason(data, version)
    assert exc.reason == MALFORMED
    assert "topic filter" in exc.message


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_unsubscribe_filter_is_malformed(version: int) -> None:
    exc = strict_reason(encode(Unsubscribe(3, ("bad/\U0010ffff",)), version), version)
    assert exc.reason == MALFORMED
    assert "U+10FFFF" in exc.message


@pytest.mark.parametrize("packet", [
    Publish("a", b"x", properties=Properties(content_type="text/\x0aplain")),
    Publish("a", b"x", properties=Properties(response_topic="re/\x1f")),
    Publish("a", b"x", properties=Properties(user_properties=(("k\x01", "v"),))),
    Publish("a", b"x", properties=Properties(user_properties=(("k", "v\x9f"),))),
    PubAck(1, 0x80, Properties(reason_string="why\x07")),
    Disconnect(0x80, Properties(reason_string="\uffff")),
    Auth(0x18, Properties(authentication_method="SCRAM\x02")),
    Connect("c", 5, properties=Properties(authentication_method="m\x03")),
    Connect("c", 5, will=Will("w", b"p", properties=Properties(content_type="\x7f"))),
], ids=["content_type", "response_topic", "user_key", "user_value", "puback_reason_string",
        "disconnect_reason_string", "auth_method", "connect_auth_method", "will_content_type"])
def test_strict_v5_string_properties_are_malformed(packet: Packet) -> None:
    assert strict_reason(encode(packet, V5), V5).reason == MALFORMED


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("char", ALLOWED)
def test_strict_accepts_the_other_code_points(version: int, char: str) -> None:
    """U+FEFF included: [MQTT-1.5.4-3] it is kept, never stripped."""
    packets = [
        Connect("c" + char, version, username="u" + char, password=b"p", will=Will("w" + char, b""),
                protocol_name="MQIsdp" if version == V3 else "MQTT"),
        Publish("t/" + char, b"x"),
        Subscribe(1, (Subscription("f/" + char + "/#", 0),)),
        Unsubscribe(1, ("f/" + char,)),
    ]
    reader = PacketReader(version, strict_utf8=True)
    assert reader.feed(b"".join(encode(p, version) for p in packets)) == packets


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.binary(max_size=200))
def test_hypothesis_strict_random_bytes_only_protocol_error(version: int, data: bytes) -> None:
    try:
        for packet in PacketReader(version, strict_utf8=True).feed(data):
            assert isinstance(packet, PACKET_CLASSES)
    except ProtocolError as exc:
        assert exc.reason in (MALFORMED, PROTOCOL, CLIENT_ID_NOT_VALID,
                              reasons.UNSUPPORTED_PROTOCOL_VERSION)


def test_a_protocol_error_in_the_properties_counts_only_once_the_packet_parses() -> None:
    """1.2: a Protocol Error is found in a packet that parses. A property repeated, or with a
    value its section forbids, is 0x82 when the rest of the packet is well formed, and 0x81
    when something after it is malformed (in the property block or further on)."""
    twice = b"\x11\x00\x00\x00\x01" * 2  # Session Expiry Interval, twice
    zero_max = b"\x21\x00\x00"  # Receive Maximum 0
    unknown = b"\x7f\x00"  # not an identifier of table 2-4

    def connect(props: bytes, rest: bytes = s("c")) -> bytes:
        return s("MQTT") + b"\x05\x02\x00\x3c" + encode_remaining_length(len(props)) + props + rest

    for bad in (twice, zero_max):
        assert reason_of(0x10, connect(bad), V5) == PROTOCOL
        assert reason_of(0x10, connect(bad + unknown), V5) == MALFORMED
        assert reason_of(0x10, connect(bad, s("c") + b"\x00"), V5) == MALFORMED  # bytes after the payload
        assert reason_of(0x10, connect(bad, b"\x00\x02\xff\xfe"), V5) == MALFORMED  # client id not UTF-8
    publish = s("t") + b"\x00\x01"
    assert reason_of(0x32, publish + b"\x04\x01\x00\x01\x01payload", V5) == PROTOCOL  # format indicator twice
    assert reason_of(0x32, publish + b"\x06\x01\x00\x01\x01\x7f\x00payload", V5) == MALFORMED
    sub_id_zero = b"\x00\x05\x02\x0b\x00"  # packet id 5, Subscription Identifier 0
    assert reason_of(0x82, sub_id_zero + s("a") + b"\x01", V5) == PROTOCOL
    assert reason_of(0x82, sub_id_zero + s("a") + b"\xc1", V5) == MALFORMED  # reserved option bits
    reason_twice = b"\x06\x1f\x00\x00\x1f\x00\x00"
    assert reason_of(0xE0, b"\x00" + reason_twice, V5) == PROTOCOL
    assert reason_of(0xE0, b"\x00" + reason_twice + b"\x00", V5) == MALFORMED  # a byte after them
    assert reason_of(0x62, b"\x00\x01\x00" + reason_twice, V5) == PROTOCOL
    assert reason_of(0x62, b"\x00\x01\x00\x08" + reason_twice[1:] + b"\x7f\x00", V5) == MALFORMED
