"""What the broker sends before it closes a connection for an error: one place for the rule.

Every check in the codec and the broker raises ``ProtocolError(reason, message)`` with the
MQTT 5 reason code of what is wrong (citing the statement at the check). The reaction is
derived here from that reason, the protocol version and how far the connection got, never
decided at the raise:

==========================  ================================  ===================================
when                        MQTT 5.0                          MQTT 3.1 / 3.1.1
==========================  ================================  ===================================
before CONNACK (refusing    CONNACK with the reason, when it  CONNACK with the return code of
the CONNECT)                is a CONNACK code (3.2.2.2); any  ``V5_TO_V3_CONNACK`` where there is
                            other reason: 0x80 for a          one [MQTT-3.2.2-4, -5]; else the
                            condition, 0x81 / 0x82 kept as    connection is closed without a
                            Malformed / Protocol Error        CONNACK [MQTT-3.2.2-6, 4.8]
after CONNACK               DISCONNECT with the reason when   closed, no packet: 3.1.1 has no way
                            it is a DISCONNECT code           to say why [MQTT-4.8.0-1]
                            (3.14.2.1); another one is sent
                            as its nearest DISCONNECT code
                            (``DISCONNECT_INSTEAD``)
==========================  ================================  ===================================

The specification names which of Malformed Packet (0x81: the bytes cannot be parsed as the
specification says) and Protocol Error (0x82: parsed, but not allowed at this point) a
violation is (section 4.13 and the statements it lists); the checks raise the one it names,
and nothing here turns one into the other.

What is sent never exceeds the client's Maximum Packet Size: the Reason String and User
Properties go first [MQTT-3.2.2-19, -20; MQTT-3.14.2-3, -4], then, for a CONNACK, the
properties that only describe the broker; a packet that still does not fit is not sent
[MQTT-3.1.2-24, -25].

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import codec, reasons
from .packets import MQTT_5, ConnAck, Disconnect

__all__ = [
    "CONNACK_CODES",
    "DISCONNECT_CODES",
    "DISCONNECT_INSTEAD",
    "connack_for",
    "disconnect_for",
    "within",
]

CONNACK_CODES = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99,
    0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
})
"""The reason codes a CONNACK may carry (MQTT 5.0 section 3.2.2.2)."""

DISCONNECT_CODES = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97,
    0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
})
"""The reason codes a server's DISCONNECT may carry (section 3.14.2.1; 0x04 is the client's)."""

DISCONNECT_INSTEAD = {
    reasons.BAD_USER_NAME_OR_PASSWORD: reasons.NOT_AUTHORIZED,
    reasons.BAD_AUTHENTICATION_METHOD: reasons.NOT_AUTHORIZED,
    reasons.BANNED: reasons.NOT_AUTHORIZED,
    reasons.SERVER_UNAVAILABLE: reasons.SERVER_BUSY,
    reasons.CLIENT_IDENTIFIER_NOT_VALID: reasons.PROTOCOL_ERROR,
    reasons.UNSUPPORTED_PROTOCOL_VERSION: reasons.PROTOCOL_ERROR,
    reasons.PACKET_IDENTIFIER_IN_USE: reasons.PROTOCOL_ERROR,
    reasons.PACKET_IDENTIFIER_NOT_FOUND: reasons.PROTOCOL_ERROR,
}
"""A reason that is no DISCONNECT code, and the one sent for it after CONNACK."""


def connack_for(reason: int, version: int) -> int | None:
    """The CONNACK code (5.0 reason, 3.1.1 return code) that refuses a CONNECT for ``reason``,
    or None: close without a CONNACK."""
    if version == MQTT_5:
        return reason if reason in CONNACK_CODES else reasons.UNSPECIFIED_ERROR
    return reasons.V5_TO_V3_CONNACK.get(reason)


def disconnect_for(reason: int, version: int) -> int | None:
    """The DISCONNECT reason that ends a connected client's connection for ``reason``, or None:
    close without a DISCONNECT (3.1, 3.1.1)."""
    if version != MQTT_5:
        return None
    if reason in DISCONNECT_CODES:
        return reason
    return DISCONNECT_INSTEAD.get(reason, reasons.UNSPECIFIED_ERROR)


_DESCRIBING = ("reason_string", "user_properties")  # dropped first: they only explain
_CONNACK_OPTIONAL = (  # then, for a CONNACK: what only describes the broker
    "server_reference", "response_information", "wildcard_subscription_available",
    "subscription_identifier_available", "shared_subscription_available", "maximum_qos", "retain_available",
    "maximum_packet_size", "topic_alias_maximum", "receive_maximum",
)


def within(packet: ConnAck | Disconnect, version: int, limit: int | None) -> bytes | None:
    """``packet`` encoded within ``limit`` bytes (the client's Maximum Packet Size), leaving
    out what may be left out; None when even the bare packet does not fit."""
    data = codec.encode(packet, version)
    if limit is None or len(data) <= limit:
        return data
    props = packet.properties
    for names in (_DESCRIBING, _CONNACK_OPTIONAL if isinstance(packet, ConnAck) else ()):
        if not names:
            continue
        cleared: dict[str, Any] = {n: () if n == "user_properties" else None for n in names}
        props = replace(props, **cleared)
        data = codec.encode(replace(packet, properties=props), version)
        if len(data) <= limit:
            return data
    return None
