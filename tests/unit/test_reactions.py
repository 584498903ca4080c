"""The reactions to errors (``protocol/reactions.py``) and the checks that feed them: the
reason derived from the error and the version, packets within the client's Maximum Packet
Size, the packet types a server never receives refused at their first byte, empty topic
filters, and acknowledgements of the wrong kind (loop-free; the broker core in a harness)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.protocol import codec, reactions, reasons
from shardbroker.protocol.codec import PacketReader
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    Subscribe,
    Subscription,
)


@pytest.mark.parametrize("reason, v5, v3", [
    (reasons.BAD_USER_NAME_OR_PASSWORD, 0x86, 4),
    (reasons.CLIENT_IDENTIFIER_NOT_VALID, 0x85, 2),
    (reasons.MALFORMED_PACKET, 0x81, None),  # 3.1.1: closed without a CONNACK
    (reasons.TOPIC_FILTER_INVALID, 0x80, None),  # not a CONNACK code
    (reasons.PACKET_TOO_LARGE, 0x95, None),
])
def test_the_connack_of_a_refusal(reason: int, v5: int, v3: int | None) -> None:
    assert reactions.connack_for(reason, MQTT_5) == v5
    assert reactions.connack_for(reason, MQTT_3_1_1) == v3


@pytest.mark.parametrize("reason, v5", [
    (reasons.PROTOCOL_ERROR, 0x82), (reasons.MALFORMED_PACKET, 0x81), (reasons.TOPIC_NAME_INVALID, 0x90),
    (reasons.BAD_USER_NAME_OR_PASSWORD, 0x87), (reasons.PACKET_IDENTIFIER_NOT_FOUND, 0x82),
    (reasons.SERVER_UNAVAILABLE, 0x89),
])
def test_the_disconnect_of_an_error(reason: int, v5: int) -> None:
    assert reactions.disconnect_for(reason, MQTT_5) == v5 and v5 in reactions.DISCONNECT_CODES
    assert reactions.disconnect_for(reason, MQTT_3_1_1) is None  # 3.1.1: closed [MQTT-4.8.0-1]


def test_packets_are_cut_to_the_clients_maximum_packet_size() -> None:
    ack = ConnAck(False, 0, Properties(reason_string="r" * 50, receive_maximum=100, topic_alias_maximum=10,
                                       assigned_client_identifier="id"))
    whole = codec.encode(ack, MQTT_5)
    assert reactions.within(ack, MQTT_5, len(whole)) == whole
    cut = reactions.within(ack, MQTT_5, 30)
    assert cut is not None and len(cut) <= 30
    [back] = PacketReader(MQTT_5).feed(cut)
    assert back.properties.reason_string is None and back.properties.assigned_client_identifier == "id"
    assert reactions.within(ack, MQTT_5, 4) is None  # not even a bare CONNACK fits
    bye = Disconnect(0x82, Properties(reason_string="x" * 100))
    assert codec.decode(0xE0, reactions.within(bye, MQTT_5, 10)[2:], MQTT_5) == Disconnect(0x82)  # type: ignore[index]


@pytest.mark.parametrize("version, data, reason", [
    (MQTT_5, b"\x20", reasons.PROTOCOL_ERROR),  # CONNACK, one byte is enough to tell
    (MQTT_5, b"\x90\xff\xff", reasons.PROTOCOL_ERROR),  # SUBACK with a length it never completes
    (MQTT_5, b"\xb0", reasons.PROTOCOL_ERROR),
    (MQTT_5, b"\xd0\x00", reasons.PROTOCOL_ERROR),  # PINGRESP
    (MQTT_5, b"\x00\x00", reasons.MALFORMED_PACKET),  # reserved
    (MQTT_3_1_1, b"\xf0\xff\xff\xff\x7f", reasons.MALFORMED_PACKET),  # 15 is reserved before 5.0
    (MQTT_3_1_1, b"\x20", reasons.PROTOCOL_ERROR),
])
def test_a_server_refuses_what_only_servers_send_at_its_first_byte(version: int, data: bytes, reason: int) -> None:
    with pytest.raises(ProtocolError) as info:
        PacketReader(version, server=True).feed(data)
    assert info.value.reason == reason
    assert PacketReader(version).feed(data[:1]) == []  # a client's reader waits for the rest


def test_good_packets_before_a_forbidden_one_are_kept() -> None:
    reader = PacketReader(MQTT_5, server=True)
    assert reader.feed(codec.encode(PingReq(), MQTT_5) + b"\x20") == [PingReq()]
    assert reader.error is not None and reader.error.reason == reasons.PROTOCOL_ERROR


@pytest.mark.parametrize("version, packet", [
    (MQTT_3_1_1, b"\x82\x05\x00\x01\x00\x00\x00"),  # SUBSCRIBE, filter "" with QoS 0
    (MQTT_3_1_1, b"\xa2\x04\x00\x01\x00\x00"),  # UNSUBSCRIBE ""
    (MQTT_5, b"\x82\x06\x00\x01\x00\x00\x00\x00"),
    (MQTT_5, b"\xa2\x05\x00\x01\x00\x00\x00"),
])
def test_an_empty_topic_filter_is_malformed(version: int, packet: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        PacketReader(version, server=True).feed(packet)
    assert info.value.reason == reasons.MALFORMED_PACKET  # [MQTT-4.7.3-1]


# --------------------------------------------------------------------------- in the broker core


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def _delivered(h: Harness, version: int, qos: int) -> tuple[object, int]:
    sub = h.connect("s", version)
    sub.send(Subscribe(1, (Subscription("t", qos),)))
    sub.packets()
    h.connect("p", version).send(Publish("t", b"x", qos=qos, packet_id=1))
    [out] = [p for p in sub.packets() if isinstance(p, Publish)]
    assert out.packet_id is not None
    return sub, out.packet_id


@pytest.mark.parametrize("qos, wrong", [(2, PubAck), (1, PubRec), (2, PubComp)])
@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_an_acknowledgement_of_the_wrong_kind_is_a_protocol_violation(h: Harness, version: int, qos: int,
                                                                      wrong: type) -> None:
    sub, pid = _delivered(h, version, qos)
    sub.send(wrong(pid))  # type: ignore[attr-defined]
    after = sub.packets()  # type: ignore[attr-defined]
    if version == MQTT_5:
        assert after == [Disconnect(reasons.PROTOCOL_ERROR, Properties(reason_string=after[0].properties.reason_string))]
    else:
        assert after == []  # 3.1.1: closed, no answer [MQTT-4.8.0-1]
    assert sub.transport.closed  # type: ignore[attr-defined]


def test_connack_within_the_clients_maximum_packet_size(h: Harness) -> None:
    c = h.client("small", MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id="small", properties=Properties(maximum_packet_size=9)))
    assert 0 < len(c.transport.written) <= 9  # [MQTT-3.1.2-24]: what only describes the broker is left out
    [ack] = c.packets()
    assert ack.reason_code == 0
    tiny = h.client("tiny", MQTT_5)
    tiny.send(Connect(protocol_version=MQTT_5, client_id="tiny", properties=Properties(maximum_packet_size=4)))
    assert tiny.transport.written == b"" and tiny.transport.closed  # not even a bare CONNACK fits
    refused = h.client("refused", MQTT_5)  # a refusal's Reason String is left out rather than sent too big
    refused.send(Connect(protocol_version=MQTT_5, client_id="refused", properties=Properties(
        maximum_packet_size=8, authentication_method="NOPE")))
    [no] = refused.packets()
    assert no.reason_code == reasons.BAD_AUTHENTICATION_METHOD and no.properties.reason_string is None
