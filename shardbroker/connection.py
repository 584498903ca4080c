"""One client connection in a worker: the asyncio Protocol around the codec.

It frames bytes into packets (``PacketReader``), hands each to the shard in
order (never a task per packet), and buffers outgoing bytes until the shard's
flush, which writes them in one ``transport.write`` per connection per loop
iteration, after the group commit.

It holds per-connection protocol state (version, keepalive, topic aliases, the
client's limits) and no broker semantics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .protocol import codec
from .protocol.errors import ProtocolError
from .protocol.packets import MQTT_3_1_1, Connect

if TYPE_CHECKING:
    from .session import Session
    from .shard import Shard

log = logging.getLogger("shardbroker.connection")

MAX_WRITE_BUFFER = 8 << 20
CLOSE_LINGER = 1.0  # seconds a server-closed connection keeps draining input after its FIN  # QoS 0 to a client whose socket backs up beyond this is dropped


class Connection(asyncio.Protocol):
    def __init__(self, shard: Shard, assigned_id: str | None, initial: bytes = b"") -> None:
        self.shard = shard
        self._initial = initial
        self.assigned_id = assigned_id
        self._peer: str | None = None
        self.transport: asyncio.Transport | None = None
        self.reader = codec.PacketReader(MQTT_3_1_1, shard.limits.max_packet_size)
        self.version = MQTT_3_1_1
        self.client_id = ""
        self.session: Session | None = None
        self.connected = False
        self.closing = False
        self.keepalive = 0
        self.last_rx = time.monotonic()
        self.send_window = 20
        self.max_packet_out: int | None = None
        self.alias_max_out = 0
        self.aliases_out: dict[str, int] = {}
        self.aliases_in: dict[int, str] = {}
        self.problem_info = True
        self.unacked_in = 0  # QoS 1 publishes received this iteration, acked at the next flush
        self.out: list[bytes] = []
        self.dirty = False
        self._close_after = False

    @property
    def peer(self) -> str:
        """``host:port`` of the client, for logs (looked up on first use)."""
        if self._peer is None:
            addr = self.transport.get_extra_info("peername") if self.transport is not None else None
            if not addr:
                return "?"
            self._peer = f"{addr[0]}:{addr[1]}"
        return self._peer

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._initial:  # the bytes the acceptor read, CONNECT first: before anything newer
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_rx = time.monotonic()
        try:
            packets = self.reader.feed(data)
        except ProtocolError as exc:
            if not self.connected:
                log.info("%s: bad CONNECT: %s", self.peer, exc.message)
                self._abort()
                return
            self.shard.protocol_violation(self, exc)
            return
        shard = self.shard
        for packet in packets:
            if self.closing:
                break
            if not self.connected:
                if not isinstance(packet, Connect):
                    log.info("%s: first packet is not CONNECT: closing", self.peer)
                    self._abort()
                    return
                try:
                    shard.on_connect(self, packet, self.assigned_id)
                except Exception:
                    log.exception("%s: internal error in CONNECT", self.peer)
                    self._abort()
                    return
                continue
            shard.handle(self, packet)
        error = self.reader.error
        if error is not None and not self.closing:  # bad bytes after good packets in one read
            if self.connected:
                shard.protocol_violation(self, error)
            else:
                self._abort()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.session is not None:
            log.debug("connection of %s lost: %s", self.client_id, exc or "closed by peer")
            self.shard.detach(self, publish_will=True)
            self.shard.schedule_flush()
        self.shard.connections.discard(self)
        self.transport = None

    # ---- output

    def send(self, data: bytes) -> None:
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            self.shard.mark_dirty(self)

    def write_buffer_full(self) -> bool:
        t = self.transport
        return t is not None and t.get_write_buffer_size() > MAX_WRITE_BUFFER

    def write_out(self) -> None:
        self.dirty = False
        self.unacked_in = 0
        out, self.out = self.out, []
        t = self.transport
        if t is not None and out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
        if self._close_after and t is not None:
            self._close_after = False
            if t.can_write_eof():
                # FIN after the queued bytes, then read and discard for a moment before closing:
                # a client still sending does not get a reset before it reads our DISCONNECT.
                t.write_eof()
                self.shard.loop.call_later(CLOSE_LINGER, t.close)
            else:
                t.close()

    def discard_output(self) -> None:
        self.out = []

    def close_after_write(self) -> None:
        """Close once what is queued has been written (after the next flush)."""
        self.closing = True
        self._close_after = True
        if not self.dirty:
            self.dirty = True
            self.shard.mark_dirty(self)

    def _abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()
