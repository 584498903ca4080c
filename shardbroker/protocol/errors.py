"""The one error the protocol core raises for bad input.

Anything else escaping the codec on any input is a bug (the fuzz tests say so).
"""

from __future__ import annotations

from . import reasons


class ProtocolError(Exception):
    """A malformed or illegal packet.

    ``reason`` is the MQTT 5 reason code that a 5.0 peer is told (CONNACK or
    DISCONNECT); a 3.1/3.1.1 peer is simply disconnected.
    """

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"ProtocolError(0x{self.reason:02X}, {self.message!r})"


def malformed(message: str) -> ProtocolError:
    return ProtocolError(reasons.MALFORMED_PACKET, message)


def protocol_error(message: str) -> ProtocolError:
    return ProtocolError(reasons.PROTOCOL_ERROR, message)
