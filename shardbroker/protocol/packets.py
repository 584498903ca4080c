"""MQTT control packets as frozen, slotted dataclasses.

One set of classes serves 3.1 (protocol level 3), 3.1.1 (4) and 5.0 (5). Fields
that a version does not carry keep their defaults when decoded from it and are
left out when encoded for it (reason codes and properties before 5.0).

The codec (``codec.py``) turns these into bytes and back; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5
VERSIONS = (MQTT_3_1, MQTT_3_1_1, MQTT_5)


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


UserProperties = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5.0 properties (section 2.2.2.2). ``None`` means absent.

    User properties keep their order and duplicates. A PUBLISH may carry several
    subscription identifiers; SUBSCRIBE carries at most one.
    """

    payload_format_indicator: int | None = None  # 0x01
    message_expiry_interval: int | None = None  # 0x02
    content_type: str | None = None  # 0x03
    response_topic: str | None = None  # 0x08
    correlation_data: bytes | None = None  # 0x09
    subscription_identifiers: tuple[int, ...] = ()  # 0x0B
    session_expiry_interval: int | None = None  # 0x11
    assigned_client_identifier: str | None = None  # 0x12
    server_keep_alive: int | None = None  # 0x13
    authentication_method: str | None = None  # 0x15
    authentication_data: bytes | None = None  # 0x16
    request_problem_information: int | None = None  # 0x17
    will_delay_interval: int | None = None  # 0x18
    request_response_information: int | None = None  # 0x19
    response_information: str | None = None  # 0x1A
    server_reference: str | None = None  # 0x1C
    reason_string: str | None = None  # 0x1F
    receive_maximum: int | None = None  # 0x21
    topic_alias_maximum: int | None = None  # 0x22
    topic_alias: int | None = None  # 0x23
    maximum_qos: int | None = None  # 0x24
    retain_available: int | None = None  # 0x25
    user_properties: UserProperties = ()  # 0x26
    maximum_packet_size: int | None = None  # 0x27
    wildcard_subscription_available: int | None = None  # 0x28
    subscription_identifier_available: int | None = None  # 0x29
    shared_subscription_available: int | None = None  # 0x2A


NO_PROPERTIES = Properties()


class PropertyKind(IntEnum):
    """How a property's value is carried on the wire (1.5 data representation)."""

    BYTE = 0
    U16 = 1
    U32 = 2
    VBI = 3  # Variable Byte Integer; only the Subscription Identifier, which may repeat
    STR = 4
    BIN = 5
    PAIR = 6  # UTF-8 string pair; only User Property, which may repeat


# The one table of 5.0 properties (2.2.2.2, table 2-4): (identifier, ``Properties`` field, kind).
# The codec and the store's record encoding are both derived from it.
PROPERTY_TABLE: tuple[tuple[int, str, PropertyKind], ...] = (
    (0x01, "payload_format_indicator", PropertyKind.BYTE),
    (0x02, "message_expiry_interval", PropertyKind.U32),
    (0x03, "content_type", PropertyKind.STR),
    (0x08, "response_topic", PropertyKind.STR),
    (0x09, "correlation_data", PropertyKind.BIN),
    (0x0B, "subscription_identifiers", PropertyKind.VBI),
    (0x11, "session_expiry_interval", PropertyKind.U32),
    (0x12, "assigned_client_identifier", PropertyKind.STR),
    (0x13, "server_keep_alive", PropertyKind.U16),
    (0x15, "authentication_method", PropertyKind.STR),
    (0x16, "authentication_data", PropertyKind.BIN),
    (0x17, "request_problem_information", PropertyKind.BYTE),
    (0x18, "will_delay_interval", PropertyKind.U32),
    (0x19, "request_response_information", PropertyKind.BYTE),
    (0x1A, "response_information", PropertyKind.STR),
    (0x1C, "server_reference", PropertyKind.STR),
    (0x1F, "reason_string", PropertyKind.STR),
    (0x21, "receive_maximum", PropertyKind.U16),
    (0x22, "topic_alias_maximum", PropertyKind.U16),
    (0x23, "topic_alias", PropertyKind.U16),
    (0x24, "maximum_qos", PropertyKind.BYTE),
    (0x25, "retain_available", PropertyKind.BYTE),
    (0x26, "user_properties", PropertyKind.PAIR),
    (0x27, "maximum_packet_size", PropertyKind.U32),
    (0x28, "wildcard_subscription_available", PropertyKind.BYTE),
    (0x29, "subscription_identifier_available", PropertyKind.BYTE),
    (0x2A, "shared_subscription_available", PropertyKind.BYTE),
)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol_version: int = MQTT_3_1_1
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES
    protocol_name: str = "MQTT"  # "MQIsdp" for 3.1


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0  # 3.1.1 return code when encoded for 3/4
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Publish:
    """Not frozen, unlike the other packets: one is made for every message in and out, and a
    frozen dataclass cannot have the native constructor (below). Nothing changes one."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present iff qos > 0
    properties: Properties = NO_PROPERTIES

    # Written out rather than generated: compiled (``shardbroker/_compiled.py``), an explicit
    # __init__ is native code, a dataclass-generated one is interpreted (6 x slower to construct).
    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 dup: bool = False, packet_id: int | None = None,
                 properties: Properties = NO_PROPERTIES) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties


@dataclass(slots=True)
class PubAck:
    """Not frozen, like ``Publish``: one per QoS 1/2 message."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    def __init__(self, packet_id: int, reason_code: int = 0, properties: Properties = NO_PROPERTIES) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties


@dataclass(slots=True)
class PubRec:
    """Not frozen, like ``Publish``: one per QoS 1/2 message."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    def __init__(self, packet_id: int, reason_code: int = 0, properties: Properties = NO_PROPERTIES) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties


@dataclass(slots=True)
class PubRel:
    """Not frozen, like ``Publish``: one per QoS 1/2 message."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    def __init__(self, packet_id: int, reason_code: int = 0, properties: Properties = NO_PROPERTIES) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties


@dataclass(slots=True)
class PubComp:
    """Not frozen, like ``Publish``: one per QoS 1/2 message."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    def __init__(self, packet_id: int, reason_code: int = 0, properties: Properties = NO_PROPERTIES) -> None:
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties


@dataclass(frozen=True, slots=True)
class Subscription:
    """One entry of a SUBSCRIBE: a filter with its options (3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reason_codes: tuple[int, ...]  # granted QoS or failure (0x80 in 3.1.1)
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


Packet = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect | Auth
)

__all__ = [
    "MQTT_3_1",
    "MQTT_3_1_1",
    "MQTT_5",
    "NO_PROPERTIES",
    "VERSIONS",
    "Auth",
    "ConnAck",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketType",
    "PingReq",
    "PingResp",
    "Properties",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "Will",
]
