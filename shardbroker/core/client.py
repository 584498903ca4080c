"""A client as the broker sees it: its negotiated MQTT state and its transport.

``Transport`` is all the core needs of a connection: write bytes, close, pause and
resume reading, and two figures for flow control. TCP implements it today
(``shardbroker.transport.tcp``); TLS and WebSocket transports implement the same
and need nothing else. A transport reports back through ``Broker.received``,
``Broker.lost``, ``Broker.backed_up`` and ``Broker.drained``.

``Client`` holds what the broker negotiated with the client (version, keepalive,
windows, limits, topic aliases), its session once connected, the packet reader
(framing happens here, so every transport hands over plain bytes), and the bytes
the broker queued for it until the next flush. Queued bytes leave only at the flush,
after the group commit (``Broker.flush``): nothing is written that the store has not
made true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from shardbroker.protocol import codec
from shardbroker.protocol.packets import MQTT_3_1_1

if TYPE_CHECKING:
    from shardbroker.core.session import Session
    from shardbroker.security.acl import ClientAcl


class Transport(Protocol):
    """One client connection's byte stream (no MQTT)."""

    @property
    def peer(self) -> str:
        """``host:port`` of the client, for logs."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Bytes the client has taken so far (flow control measures slow consumers by it)."""
        ...

    @property
    def bytes_received(self) -> int:
        """Bytes read from the client so far (for ``shardbroker ctl client``)."""
        ...

    @property
    def identity(self) -> str | None:
        """The identity in the client's TLS certificate when its listener makes it the
        username (``use_identity_as_username``), else None."""
        ...

    @property
    def listener(self) -> int:
        """The index of the listener the client came in on (its authentication settings apply)."""
        ...

    def write(self, data: bytes) -> None:
        """Send now; what the client does not take yet waits in the transport's buffer."""

    def write_buffer_full(self) -> bool:
        """Whether so much waits that QoS 0 to this client is dropped."""
        ...

    def close(self, reason: str, linger: bool = True) -> None:
        """Close after what was written has gone out (bounded in time by the transport).
        ``reason`` says why, for the transport's own close (a WebSocket close frame) and logs.
        ``linger`` False: the client sent DISCONNECT and sends nothing more, so there is no
        input to drain before the close."""

    def abort(self, reason: str) -> None:
        """Close at once (``reason`` as for ``close``)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


PAUSED_BY_FLOW = 1  # the shard holds its inputs while the bus is full (``flow.py``)
PAUSED_BY_HOLD = 2  # a held publisher (``backpressure.py``)
PAUSED_BY_AUTH = 4  # its password is being verified (``handshake.py``)
PAUSED_BY_RATE = 8  # it publishes faster than its limit, until the next second (``inbound.py``)


class Client:
    """One connected (or connecting) client of this shard."""

    __slots__ = (
        "acl",
        "alias_max_out",
        "aliases_in",
        "aliases_out",
        "assigned_id",
        "client_id",
        "close_reason",
        "closing",
        "connected",
        "connected_at",
        "expiry_asked",
        "gone",
        "identity",
        "keepalive",
        "last_ack",
        "last_rx",
        "max_packet_out",
        "out",
        "output_due",
        "paused",
        "problem_info",
        "reader",
        "send_window",
        "session",
        "transport",
        "unacked_in",
        "username",
        "version",
        "withheld",
    )

    def __init__(self, transport: Transport, assigned_id: str | None, max_packet_size: int, mono: float,
                 send_window: int, strict_utf8: bool = True) -> None:
        self.transport = transport
        self.assigned_id = assigned_id  # an identifier the acceptor assigned, or None
        self.reader = codec.PacketReader(MQTT_3_1_1, max_packet_size, strict_utf8, server=True)
        self.version = MQTT_3_1_1
        self.client_id = ""
        self.session: Session | None = None
        self.connected = False  # CONNACK sent
        self.connected_at: float | None = None  # wall clock when the CONNACK was sent
        self.username: str | None = None  # the username it connected with (a certificate's identity included)
        self.closing = False  # no more input is handled, nothing new is sent
        self.close_reason: str | None = None  # close the transport after the next flush, and why
        self.gone = False  # the transport is closed
        self.keepalive = 0
        self.expiry_asked = 0  # the Session Expiry Interval of its CONNECT (before the broker's cap)
        self.last_rx = mono
        self.last_ack = mono  # when it last acknowledged a QoS 1/2 message sent to it
        self.withheld: list[bytes] | None = None  # acknowledgements held back while it is held
        self.paused = 0  # who stopped reading it (PAUSED_BY_FLOW | PAUSED_BY_HOLD), 0 while read
        self.send_window = send_window  # QoS 1/2 in flight toward the client
        self.max_packet_out: int | None = None  # the client's Maximum Packet Size
        self.alias_max_out = 0  # the client's Topic Alias Maximum
        self.aliases_out: dict[str, int] | None = None  # topic -> alias, made on first use
        self.aliases_in: dict[int, str] | None = None  # alias -> topic, made on first use
        self.problem_info = True
        self.unacked_in = 0  # QoS 1 publishes received since the last flush (acked at it)
        self.out: list[bytes] | None = None  # bytes for the client, written at the next flush
        self.output_due = False  # listed in ``Output`` to be written at the next flush
        self.acl: ClientAcl | None = None  # what it may read and write, when an ACL file is in use

    @property
    def peer(self) -> str:
        return self.transport.peer

    @property
    def name(self) -> str:
        """The client id once known, else the peer address (for logs)."""
        return self.client_id or self.transport.peer

    # The flow-control view of a client (``flow.Reader``). Two parts may stop reading it, each
    # for its own reason (``PAUSED_BY_FLOW``, ``PAUSED_BY_HOLD``); it is read again only once
    # neither does: one must not resume what the other still holds.

    @property
    def bytes_sent(self) -> int:
        return self.transport.bytes_sent

    def pause_reading(self, by: int = PAUSED_BY_FLOW) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= by

    def resume_reading(self, by: int = PAUSED_BY_FLOW) -> None:
        if self.paused & by:
            self.paused &= ~by
            if not self.paused:
                self.transport.resume_reading()
