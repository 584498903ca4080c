"""Tests for shardbroker.peer.messages: round trips of every message, the shared
NO_PROPERTIES, order within a batch, the version header, truncation at every length,
wrong kinds and field types (each named in the error), encode-side refusals, and
fuzzing (only PeerFormatError escapes decoding)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardbroker.peer.messages import (
    PEER_PROTOCOL_VERSION,
    DurableForward,
    Forward,
    ForwardAck,
    Hold,
    LoginFailed,
    PeerFormatError,
    PeerMessage,
    Release,
    ReplicasQuery,
    ResendRequest,
    Retain,
    RouteAck,
    RouteAdd,
    RouteDigest,
    RouteRemove,
    Routes,
    RoutesAdd,
    RoutesQuery,
    RoutesRemove,
    SessionReplicas,
    ShardRelayEnd,
    ShardsTaken,
    ShardState,
    ShardStateAck,
    ShardStateEnd,
    ShardStateQuery,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
    from_sender,
)
from shardbroker.protocol.codec import encode_properties
from shardbroker.protocol.packets import NO_PROPERTIES, PacketType, Properties

HEADER = b"SBP" + bytes((PEER_PROTOCOL_VERSION,))

PROPS = Properties(
    payload_format_indicator=1,
    message_expiry_interval=60,
    content_type="text/plain",
    response_topic="replies/1",
    correlation_data=b"\x00\x01",
    user_properties=(("k", "v"), ("k", "w")),
)
FULL = Forward(
    topic="a/b/c",
    payload=b"hello",
    qos=2,
    retain=True,
    properties=PROPS,
    expires_at=1_900_000_000.25,
    origin="client-1",
    non_shared=False,
    groups=(("g1", "a/#"), ("g2", "a/+/c")),
    hops=3,
)

MESSAGES: dict[str, PeerMessage] = {
    "forward-minimal": Forward("t", b"p", 0, False),
    "forward-full": FULL,
    "forward-properties-only": Forward("t", b"p", 1, False, PROPS),
    "forward-groups-only": Forward("t", b"p", 1, False, groups=(("g", "t"),), non_shared=False),
    "forward-expiry-float": Forward("t", b"p", 1, False, expires_at=12.5),
    "forward-origin": Forward("t", b"p", 1, False, origin="ö-client"),
    "forward-unicode-topic": Forward("données/温度/🌡", "✓".encode(), 1, False),
    "forward-empty-payload": Forward("t", b"", 0, True),
    "forward-nul-in-topic": Forward("a\x00b", b"\x00", 0, False),
    "durable": DurableForward(2, 1, Forward("t", b"p", 1, False)),
    "durable-full": DurableForward(0, 2**40, FULL),
    "durable-numbered": DurableForward(3, 9, Forward("t", b"p", 2, False), 1_800_000_000_000_001),
    "durable-relayed": DurableForward(3, 9, Forward("t", b"p", 1, True, groups=(("g", "t/#"),)), 5,
                                      ("client", (1, 7), 2 * 256 + 1)),
    "forward-ack": ForwardAck(1, 17),
    "forward-ack-zero": ForwardAck(0, 0),
    "resend-request": ResendRequest(3, 0),
    "route-add": RouteAdd(1, "a/+/c"),
    "route-add-ack-durable": RouteAdd(2, "$share/g/a/#", 42, True),
    "routes-add": RoutesAdd(1, (("a/+", False), ("$share/g/b/#", True), ("ü", False)), 7),
    "routes-add-no-ack": RoutesAdd(0, ()),
    "routes-remove": RoutesRemove(3, ("a/+", "$share/g/b/#", "ü")),
    "routes-remove-none": RoutesRemove(0, ()),
    "route-remove": RouteRemove(1, "a/#"),
    "route-ack": RouteAck(4, 42),
    "routes-query": RoutesQuery(5),
    "routes-empty": Routes(1, ()),
    "routes": Routes(1, (("a/#", True), ("$share/g/b", False), ("ü/+", True))),
    "hold": Hold(1, "publisher-ü"),
    "release": Release(0, ""),
    "login-failed": LoginFailed(1, "2001:db8::7"),
    "retain": Retain("a/ü", b"21.5", 1, NO_PROPERTIES, None, 1_800_000_000_000 << 16, "n1"),
    "retain-full": Retain("a/b", b"\x00v", 2, PROPS, 1_900_000_000.5, 2**64 - 1, "node-ü"),
    "retain-delete": Retain("a/b", b"", 0, NO_PROPERTIES, None, 0, ""),
    "shard-state": ShardState(2, 1023, 7, (b"\xa0", b"", b"\x00" * 300)),
    "shard-state-empty": ShardState(0, 0, 1, ()),
    "shard-state-seen": ShardState(0, 5, 1, (b"x",), ((256, 1_800_000_000_000_000), (513, 4))),
    "shard-state-end": ShardStateEnd(3, 5, 2**40, 1000),
    "shard-state-ack": ShardStateAck(512, 17, 9, 0),
    "shard-state-query": ShardStateQuery(1, 1023, 12),
    "shard-relay-end": ShardRelayEnd(1, 1023, 12, 2**40),
    "route-digest": RouteDigest(3, 2**64 - 1),
    "session-replicas": SessionReplicas(256, -1, (("c-ü", b"\x84rec"), ("gone", b""))),
    "session-replicas-set": SessionReplicas(0, 1023, ()),
    "shards-taken": ShardsTaken(512, 257, (0, 5, 1023)),
    "replicas-query": ReplicasQuery(768, (1, 1023)),
}
SAMPLE: list[PeerMessage] = list(MESSAGES.values())
SAMPLE_BYTES = encode_batch(SAMPLE)
SMALL_BYTES = encode_batch([MESSAGES["forward-full"], MESSAGES["route-add"], MESSAGES["routes"]])
ONE_BYTES = encode_message(MESSAGES["durable-full"])


def raw(body: Any) -> bytes:
    """A version-1 header followed by ``body`` packed as the module packs its items."""
    packed: bytes = msgpack.packb(body)
    return HEADER + packed


def fwd_item(**change: Any) -> list[Any]:
    """The wire item of a valid Forward, with some fields replaced."""
    fields = {
        "topic": "t", "payload": b"p", "qos": 1, "retain": False, "properties": None,
        "expires_at": None, "origin": None, "non_shared": True, "groups": [], "hops": 0,
    }
    fields.update(change)
    return [0, *fields.values()]


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLE, ids=list(MESSAGES))
def test_message_round_trip(message: PeerMessage) -> None:
    decoded = decode_message(encode_message(message))
    assert decoded == message
    assert type(decoded) is type(message)


@pytest.mark.parametrize("message", SAMPLE, ids=list(MESSAGES))
def test_batch_of_one_round_trip(message: PeerMessage) -> None:
    assert decode_batch(encode_batch([message])) == [message]


def test_mixed_batch_keeps_order() -> None:
    assert decode_batch(SAMPLE_BYTES) == SAMPLE


def test_large_payload_round_trip() -> None:
    message = Forward("t", bytes(range(256)) * 300, 1, False)
    assert decode_message(encode_message(message)) == message


def test_batch_of_repeated_messages() -> None:
    batch = [MESSAGES["forward-minimal"], MESSAGES["forward-ack"]] * 100
    assert decode_batch(encode_batch(batch)) == batch


def test_empty_batch() -> None:
    assert decode_batch(encode_batch([])) == []


def test_header_is_magic_and_version() -> None:
    assert encode_batch([]).startswith(HEADER)
    assert encode_message(RoutesQuery(1)).startswith(HEADER)


def test_no_properties_is_shared_after_decode() -> None:
    forward, durable = decode_batch(encode_batch(
        [Forward("t", b"p", 0, False), DurableForward(1, 1, Forward("t", b"p", 1, False))]))
    assert isinstance(forward, Forward)
    assert isinstance(durable, DurableForward)
    assert forward.properties is NO_PROPERTIES
    assert durable.forward.properties is NO_PROPERTIES


def test_an_empty_properties_instance_decodes_to_the_shared_one() -> None:
    data = encode_message(Forward("t", b"p", 0, False, Properties()))
    decoded = decode_message(data)
    assert isinstance(decoded, Forward)
    assert decoded.properties is NO_PROPERTIES
    assert data == encode_message(Forward("t", b"p", 0, False))


def test_no_properties_costs_one_byte() -> None:
    with_props = len(encode_message(Forward("t", b"p", 0, False, Properties(content_type="x"))))
    without = len(encode_message(Forward("t", b"p", 0, False)))
    assert with_props - without == len(encode_properties(Properties(content_type="x"),
                                                         PacketType.PUBLISH)) + 1


def test_decoded_forward_is_a_normal_dataclass() -> None:
    decoded = decode_message(encode_message(FULL))
    assert type(decoded) is Forward
    assert decoded == FULL
    assert repr(decoded) == repr(FULL)
    assert dataclasses.fields(decoded) == dataclasses.fields(FULL)


def test_an_int_expiry_travels_as_a_float() -> None:
    decoded = decode_message(encode_message(Forward("t", b"p", 0, False, expires_at=5)))
    assert isinstance(decoded, Forward)
    assert decoded.expires_at == 5.0
    assert type(decoded.expires_at) is float


def test_routes_round_trip_keeps_key_order() -> None:
    assert decode_message(encode_message(MESSAGES["routes"])) == MESSAGES["routes"]


# ---------------------------------------------------------------------------
# Header, truncation, trailing bytes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, PEER_PROTOCOL_VERSION + 1, 255])
def test_other_version_is_refused(version: int) -> None:
    data = SMALL_BYTES[:3] + bytes((version,)) + SMALL_BYTES[4:]
    with pytest.raises(PeerFormatError, match=f"version {version} is not supported"):
        decode_batch(data)


@pytest.mark.parametrize("version", [0, PEER_PROTOCOL_VERSION + 1])
def test_other_version_of_a_message_is_refused(version: int) -> None:
    with pytest.raises(PeerFormatError, match="version"):
        decode_message(ONE_BYTES[:3] + bytes((version,)) + ONE_BYTES[4:])


@pytest.mark.parametrize("data", [b"XBP\x01\x90", b"\x90", b"sbp\x01\x90", b"\x00\x00\x00\x00"])
def test_bad_magic_is_refused(data: bytes) -> None:
    with pytest.raises(PeerFormatError, match="magic"):
        decode_batch(data)


@pytest.mark.parametrize("length", range(len(SAMPLE_BYTES)))
def test_every_truncation_of_a_batch_is_refused(length: int) -> None:
    with pytest.raises(PeerFormatError):
        decode_batch(SAMPLE_BYTES[:length])


@pytest.mark.parametrize("length", range(len(ONE_BYTES)))
def test_every_truncation_of_a_message_is_refused(length: int) -> None:
    with pytest.raises(PeerFormatError):
        decode_message(ONE_BYTES[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x90", SMALL_BYTES[4:]])
def test_trailing_bytes_are_refused(extra: bytes) -> None:
    with pytest.raises(PeerFormatError, match="trailing"):
        decode_batch(SMALL_BYTES + extra)


def test_a_batch_is_not_a_message() -> None:
    with pytest.raises(PeerFormatError, match="got a batch"):
        decode_message(encode_batch([RoutesQuery(1)]))


def test_a_message_is_not_a_batch() -> None:
    with pytest.raises(PeerFormatError, match="got a single message"):
        decode_batch(encode_message(RoutesQuery(1)))


def test_decode_accepts_a_memoryview() -> None:
    assert decode_batch(memoryview(SAMPLE_BYTES)) == SAMPLE


# ---------------------------------------------------------------------------
# Unknown kinds and wrong fields: each refusal names what is wrong, on one line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", [[99, 1], [-1], [24, 1, 2], ["p", "t"], [True, 1, 1, fwd_item()],
                                  [None], [1.0, 1, 1]])
def test_unknown_kind_is_refused(item: list[Any]) -> None:
    with pytest.raises(PeerFormatError, match="unknown message kind"):
        decode_batch(raw([item]))


@pytest.mark.parametrize("body", [[[]], [1], ["x"], [{"a": 1}], {"a": 1}, 7, None, "batch"])
def test_non_items_are_refused(body: Any) -> None:
    with pytest.raises(PeerFormatError):
        decode_batch(raw(body))


@pytest.mark.parametrize(("change", "field"), [
    ({"topic": b"t"}, "topic"),
    ({"topic": None}, "topic"),
    ({"payload": "p"}, "payload"),
    ({"qos": 3}, "qos"),
    ({"qos": -1}, "qos"),
    ({"qos": True}, "qos"),
    ({"qos": 1.0}, "qos"),
    ({"retain": 1}, "retain"),
    ({"properties": "x"}, "properties"),
    ({"expires_at": 5}, "expires_at"),
    ({"expires_at": "soon"}, "expires_at"),
    ({"origin": b"c"}, "origin"),
    ({"non_shared": None}, "non_shared"),
    ({"groups": None}, "groups"),
    ({"groups": [["g"]]}, "groups"),
    ({"groups": [["g", b"f"]]}, "groups"),
    ({"groups": ["g", "f"]}, "groups"),
    ({"hops": -1}, "hops"),
    ({"hops": "1"}, "hops"),
])
def test_wrong_forward_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PeerFormatError, match=rf"^Forward\.{field}: expected ") as info:
        decode_batch(raw([fwd_item(**change)]))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("item", [fwd_item()[:-1], [*fwd_item(), 0], [0]])
def test_wrong_forward_field_count_is_refused(item: list[Any]) -> None:
    with pytest.raises(PeerFormatError, match="Forward: expected 10 fields"):
        decode_batch(raw([item]))


@pytest.mark.parametrize(("item", "match"), [
    ([1, -1, 1, fwd_item()], "DurableForward.origin_shard"),
    ([1, 1, 0, fwd_item()], "DurableForward.seq"),
    ([1, 1, 1, "f"], "DurableForward.forward"),
    ([1, 1, 1, [2, 1, 1]], "DurableForward.forward"),
    ([1, 1, 1, []], "DurableForward.forward"),
    ([1, 1, 1, fwd_item(qos=5)], "Forward.qos"),
    ([1, 1, 1], "DurableForward: expected 3 or 5 fields"),
    ([1, 1, 1, [0, "t", b"p", 1, False, None, None, None, True, [], 0], -1, None], "DurableForward.mid"),
    ([1, 1, 1, [0, "t", b"p", 1, False, None, None, None, True, [], 0], 3, ["c", [0], 1]],
     "DurableForward.target"),
    ([2, 1, -3], "ForwardAck.upto"),
    ([2, "1", 3], "ForwardAck.shard"),
    ([2, 1], "ForwardAck: expected 2 fields"),
    ([3, 1, None], "ResendRequest.mark"),
    ([4, 1, b"a/#", 0, False], "RouteAdd.key"),
    ([4, 1, "a/#", 0, 1], "RouteAdd.durable"),
    ([4, 1, "a/#", -1, True], "RouteAdd.request"),
    ([5, 1, 7], "RouteRemove.key"),
    ([6, 1, 0], "RouteAck.request"),
    ([7, -2], "RoutesQuery.shard"),
    ([7, 1, 2], "RoutesQuery: expected 1 field, got 2"),
    ([8, 1, [["a", True], ["a", False]]], "Routes.keys"),
    ([12, 1, [["a", True], ["a", False]], 3], "RoutesAdd.keys"),
    ([12, 1, [["a", 1]], 3], "RoutesAdd.keys"),
    ([12, 1, [["a", True]], -1], "RoutesAdd.request"),
    ([13, 1, ["a", "a"]], "RoutesRemove.keys"),
    ([13, 1, ["a", 1]], "RoutesRemove.keys"),
    ([13, 1, "a"], "RoutesRemove.keys"),
    ([8, 1, [["a", 1]]], "Routes.keys"),
    ([8, 1, [["a"]]], "Routes.keys"),
    ([8, 1, {"a": True}], "Routes.keys"),
    ([9, 1, b"p"], "Hold.publisher"),
    ([9, -1, "p"], "Hold.shard"),
    ([10, 1], "Release: expected 2 fields"),
    ([14, "t", b"p", 1, None, None, 5], "Retain: expected 7 fields, got 6"),
    ([14, "t", b"p", 1, None, None, 5, "n", 0], "Retain: expected 7 fields, got 8"),
    ([14, b"t", b"p", 1, None, None, 5, "n"], "Retain.topic"),
    ([14, "t", "p", 1, None, None, 5, "n"], "Retain.payload"),
    ([14, "t", b"p", 3, None, None, 5, "n"], "Retain.qos"),
    ([14, "t", b"p", True, None, None, 5, "n"], "Retain.qos"),
    ([14, "t", b"p", 1, "x", None, 5, "n"], "Retain.properties"),
    ([14, "t", b"p", 1, None, 7, 5, "n"], "Retain.expires_at"),
    ([14, "t", b"p", 1, None, None, -5, "n"], "Retain.stamp"),
    ([14, "t", b"p", 1, None, None, 5.0, "n"], "Retain.stamp"),
    ([14, "t", b"p", 1, None, None, 5, None], "Retain.node"),
    ([14, "t", b"", 1, None, None, 5, "n"], "Retain: a delete"),
    ([14, "t", b"", 0, None, 3.5, 5, "n"], "Retain: a delete"),
    ([14, "t", b"", 0, b"\x02\x01\x01", None, 5, "n"], "Retain: a delete"),
    ([14, "t", b"p", 0, b"\x03\x23\x00\x01", None, 5, "n"], r"Retain\.properties: topic_alias"),
    ([14, "t", b"p", 0, b"\x05\x23\x00\x01", None, 5, "n"], r"Retain\.properties: "),
])
def test_wrong_field_of_other_kinds_is_named(item: list[Any], match: str) -> None:
    with pytest.raises(PeerFormatError, match=match):
        decode_batch(raw([item]))


@pytest.mark.parametrize("block", [
    b"\x05\x23\x00\x01",  # property length 5, but 3 bytes follow
    b"\x03\x23\x00\x01",  # topic alias: a PUBLISH property, but never forwarded
    b"\x02\x0b\x01",  # subscription identifier: likewise
    b"\x02\x11\x00",  # session expiry interval: not a PUBLISH property
    b"\x03\x03\x00\x01",  # truncated string
    b"\x04\x03\x00\x01\xff",  # not UTF-8
    b"\x02\x01\x02",  # payload format indicator 2
])
def test_bad_property_block_is_refused(block: bytes) -> None:
    with pytest.raises(PeerFormatError, match=r"^Forward\.properties: "):
        decode_batch(raw([fwd_item(properties=block)]))


def test_invalid_utf8_is_refused() -> None:
    data = raw([fwd_item(topic="é")]).replace("é".encode(), b"\xc3\x28")
    with pytest.raises(PeerFormatError):
        decode_batch(data)


def test_peer_format_error_is_a_value_error() -> None:
    assert issubclass(PeerFormatError, ValueError)


# ---------------------------------------------------------------------------
# Encode-side refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    Forward("t", b"p", 3, False),
    Forward("t", b"p", -1, False),
    Forward("t", b"p", 0, False, hops=-1),
    Forward("t", b"p", 0, False, Properties(topic_alias=1)),
    Forward("t", b"p", 0, False, Properties(subscription_identifiers=(1,))),
    Forward("t", b"p", 0, False, Properties(session_expiry_interval=1)),
    Forward("t", b"p", 0, False, Properties(message_expiry_interval=2**33)),
    Forward("\ud800", b"p", 0, False),
    Forward("t", b"p", 0, False, hops=2**64),
    DurableForward(1, 0, Forward("t", b"p", 1, False)),
    DurableForward(-1, 1, Forward("t", b"p", 1, False)),
    DurableForward(1, 1, Forward("t", b"p", 7, False)),
    DurableForward(1, 1, Forward("t", b"p", 1, False), -1),
    DurableForward(1, 1, Forward("t", b"p", 1, False), 1, ("c", (0,), 1)),  # type: ignore[arg-type]
    ForwardAck(-1, 0),
    ForwardAck(1, 2**64),
    RouteAck(1, 0),
    RouteAdd(1, "k", -1),
    Routes(1, (("a", True), ("a", False))),
    Retain("t", b"p", 3, NO_PROPERTIES, None, 1, "n"),
    Retain("t", b"p", 0, NO_PROPERTIES, None, -1, "n"),
    Retain("t", b"p", 0, NO_PROPERTIES, None, 2**64, "n"),
    Retain("t", b"p", 0, Properties(topic_alias=1), None, 1, "n"),
    Retain("t", b"", 1, NO_PROPERTIES, None, 1, "n"),
    Retain("t", b"", 0, PROPS, None, 1, "n"),
    Retain("t", b"", 0, NO_PROPERTIES, 5.0, 1, "n"),
    Retain("t", b"p", 0, NO_PROPERTIES, None, 1, "\ud800"),
])
def test_encode_refuses_what_decode_would_refuse(message: PeerMessage) -> None:
    with pytest.raises(ValueError):
        encode_batch([message])
    with pytest.raises(ValueError):
        encode_message(message)


def test_a_field_of_the_wrong_type_never_reaches_the_wire() -> None:
    """Compiled (``shardbroker/_compiled.py``), the class itself refuses the dict; from
    source, the encoder does."""
    try:
        message = Routes(1, {"a": True})  # type: ignore[arg-type]
    except TypeError:
        return
    with pytest.raises(ValueError):
        encode_batch([message])
    with pytest.raises(ValueError):
        encode_message(message)


@pytest.mark.parametrize("value", [1, "p", [0, "t"], Properties(), None])
def test_encode_refuses_non_messages(value: Any) -> None:
    # from source the encoder names the problem; compiled, the typed signature refuses first
    refused = "not a peer message|PeerMessage|object expected"
    with pytest.raises(TypeError, match=refused):
        encode_batch([value])
    with pytest.raises(TypeError, match=refused):
        encode_message(value)


# ---------------------------------------------------------------------------
# Generated round trips and fuzzing
# ---------------------------------------------------------------------------

# msgpack carries any string that UTF-8 can (U+0000 included); MQTT property strings
# may not contain U+0000 (the codec refuses it on decode).
texts = st.text(st.characters(codec="utf-8"), max_size=30)
property_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
properties = st.one_of(
    st.just(NO_PROPERTIES),
    st.builds(
        Properties,
        payload_format_indicator=st.none() | st.integers(0, 1),
        message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
        content_type=st.none() | property_texts,
        response_topic=st.none() | property_texts,
        correlation_data=st.none() | st.binary(max_size=20),
        user_properties=st.lists(st.tuples(property_texts, property_texts), max_size=3)
        .map(tuple),
    ),
)
forwards = st.builds(
    Forward,
    topic=texts,
    payload=st.binary(max_size=200),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    properties=properties,
    expires_at=st.none() | st.floats(allow_nan=False),
    origin=st.none() | texts,
    non_shared=st.booleans(),
    groups=st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
    hops=st.integers(0, 2**64 - 1),
)


@given(forwards, st.integers(0, 2**32), st.integers(1, 2**64 - 1))
def test_generated_forwards_round_trip(forward: Forward, shard: int, seq: int) -> None:
    batch: list[PeerMessage] = [forward, DurableForward(shard, seq, forward)]
    assert decode_batch(encode_batch(batch)) == batch
    assert decode_message(encode_message(forward)) == forward


@given(st.lists(st.tuples(texts, st.booleans()), unique_by=lambda p: p[0], max_size=20),
       st.integers(0, 2**64 - 1))
def test_generated_routes_round_trip(keys: list[tuple[str, bool]], shard: int) -> None:
    message = Routes(shard, tuple(keys))
    assert decode_message(encode_message(message)) == message


retains = st.builds(
    Retain,
    topic=texts,
    payload=st.binary(min_size=1, max_size=200),
    qos=st.integers(0, 2),
    properties=properties,
    expires_at=st.none() | st.floats(allow_nan=False),
    stamp=st.integers(0, 2**64 - 1),
    node=texts,
)


@given(retains, texts, st.integers(0, 2**64 - 1))
def test_generated_retains_round_trip(retain: Retain, topic: str, stamp: int) -> None:
    delete = Retain(topic, b"", 0, NO_PROPERTIES, None, stamp, retain.node)
    batch: list[PeerMessage] = [retain, delete]
    assert decode_batch(encode_batch(batch)) == batch
    assert decode_message(encode_message(retain)) == retain


retain_fields = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | texts | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4), max_leaves=10)


@settings(max_examples=300)
@given(st.lists(retain_fields, min_size=7, max_size=8))
def test_fuzz_retain_fields(values: list[Any]) -> None:
    """A kind-14 item with arbitrary fields: decoded or refused, never anything else."""
    _decodes_or_refuses(raw([[14, *values]]))


def test_from_sender_leaves_retain_alone() -> None:
    """A ``Retain`` names no sender (it needs no answer): naming one changes nothing."""
    m = Retain("t", b"p", 0, NO_PROPERTIES, None, 7, "n1")
    ack = ForwardAck(1, 2)
    from_sender([m, ack], 513)
    assert m == Retain("t", b"p", 0, NO_PROPERTIES, None, 7, "n1")
    assert ack.shard == 513


def _decodes_or_refuses(data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except PeerFormatError:
        pass
    else:
        assert isinstance(batch, list)
    try:
        decode_message(data)
    except PeerFormatError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_a_valid_header(data: bytes) -> None:
    _decodes_or_refuses(HEADER + data)


@given(st.integers(0, len(SAMPLE_BYTES) - 1), st.integers(0, 255))
def test_fuzz_one_byte_changed(index: int, value: int) -> None:
    _decodes_or_refuses(SAMPLE_BYTES[:index] + bytes((value,)) + SAMPLE_BYTES[index + 1:])


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | texts | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=12) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=500)
@given(st.lists(st.one_of(
    msgpack_values,
    st.tuples(st.integers(0, 9), msgpack_values, msgpack_values, msgpack_values).map(list),
), max_size=5))
def test_fuzz_structured_bodies(body: list[Any]) -> None:
    _decodes_or_refuses(raw(body))


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_fuzz_property_blocks(block: bytes) -> None:
    _decodes_or_refuses(raw([fwd_item(properties=block)]))


@pytest.mark.parametrize("item", [
    [15, 0, 1024, 1, []],  # vshard out of range
    [15, 0, 3, 0, []],  # version 0
    [15, 0, 3, 1, ["text"]],  # a session that is not bin
    [16, 0, 3, 1],  # a missing count
    [17, 0, -1, 1, 0],
    [18, 0, 3, 0],  # epoch 0
    [14, 0],  # kind 14 is left free
])
def test_bad_shard_state_items_are_refused(item: list[Any]) -> None:
    with pytest.raises(PeerFormatError):
        decode_batch(raw([item]))


@pytest.mark.parametrize("item", [
    [21, 0, -2, []],  # a virtual shard below -1
    [21, 0, 1024, []],
    [21, 0, 5, [["c", "text"]]],  # a record that is not bin
    [21, 0, 5, [["c"]]],
    [21, 0, 5],  # no items
])
def test_bad_session_replicas_are_refused(item: list[Any]) -> None:
    with pytest.raises(PeerFormatError):
        decode_batch(raw([item]))
    assert msgpack.unpackb(encode_message(SessionReplicas(1, -1, ()))[len(HEADER):])[0] == 21


@pytest.mark.parametrize("item", [
    [22, 0, 256, [1024]],  # not a virtual shard
    [22, 0, 256, [3, 3]],  # twice
    [22, 0, -1, [3]],  # no peer id
    [22, 0, 256],  # no shards
])
def test_bad_shards_taken_are_refused(item: list[Any]) -> None:
    with pytest.raises(PeerFormatError):
        decode_batch(raw([item]))
    assert msgpack.unpackb(encode_message(ShardsTaken(1, 256, ()))[len(HEADER):])[0] == 22


def test_shard_state_kinds_are_15_to_19() -> None:
    for message, kind in ((ShardState(1, 2, 3, (b"x",)), 15), (ShardStateEnd(1, 2, 3, 4), 16),
                          (ShardStateAck(1, 2, 3, 4), 17), (ShardStateQuery(1, 2, 3), 18),
                          (ShardRelayEnd(1, 2, 3, 0), 19)):
        assert msgpack.unpackb(encode_message(message)[len(HEADER):])[0] == kind
    with pytest.raises(ValueError):
        encode_batch([ShardStateEnd(1, 1024, 3, 4)])
