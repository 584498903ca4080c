"""One client connection in a worker: its socket, driven by readiness callbacks.

It reads the socket when the loop says it is readable (one ``recv`` per callback,
so busy clients take turns), frames bytes into packets (``PacketReader``) and hands
each to the shard in order (never a task per packet). Outgoing bytes wait in
``out`` until the shard's flush, which runs after the group commit and writes them
with one ``send``; what the kernel does not take waits in the connection's own
write buffer, sent when the socket is writable again. There is no asyncio
transport in between: the shard's flow control (``flow.py``) sees the real write
backlog, and a write goes to the kernel at once.

Water marks: above ``HIGH_WATER`` bytes waiting the connection is backed up (the
shard holds its inputs, ``flow.py``); below ``LOW_WATER`` it is drained again.
Above ``MAX_WRITE_BUFFER`` QoS 0 to it is dropped (``delivery.py``).

It holds per-connection protocol state (version, keepalive, topic aliases, the
client's limits) and no broker semantics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from .protocol import codec
from .protocol.errors import ProtocolError
from .protocol.packets import MQTT_3_1_1, Connect

if TYPE_CHECKING:
    from .session import Session
    from .shard import Shard

log = logging.getLogger("shardbroker.connection")

READ_SIZE = 256 * 1024
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_WRITE_BUFFER = 8 << 20  # QoS 0 to a client whose write buffer is beyond this is dropped
CLOSE_LINGER = 1.0  # seconds a server-closed connection keeps draining input after its FIN
CLOSE_TIMEOUT = 5.0  # seconds a server-closed connection may take to write what it owes, then abort


class Connection:
    __slots__ = (
        "_backed_up", "_close_after", "_close_timer", "_closed", "_initial", "_lingering", "_loop", "_peer", "_reading",
        "_wbuf", "_writing", "alias_max_out", "aliases_in", "aliases_out", "assigned_id", "bytes_sent",
        "client_id", "closing", "connected", "dirty", "fd", "keepalive", "last_rx", "max_packet_out", "out",
        "problem_info", "reader", "send_window", "session", "shard", "sock", "unacked_in", "version",
    )

    def __init__(self, shard: Shard, sock: socket.socket, assigned_id: str | None, initial: bytes = b"") -> None:
        self.shard = shard
        self.sock = sock
        self.fd = sock.fileno()
        self._loop = shard.loop
        self._initial = initial
        self.assigned_id = assigned_id
        self._peer: str | None = None
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
        self._wbuf = bytearray()  # what the kernel has not taken yet
        self.bytes_sent = 0
        self._reading = False
        self._writing = False
        self._backed_up = False
        self._lingering = False  # FIN sent: input is read and discarded until the linger ends
        self._closed = False
        self._close_timer: asyncio.TimerHandle | None = None  # the close timeout, then the linger

    @property
    def peer(self) -> str:
        """``host:port`` of the client, for logs (looked up on first use)."""
        if self._peer is None:
            try:
                addr = self.sock.getpeername()
            except OSError:
                return "?"
            self._peer = f"{addr[0]}:{addr[1]}"
        return self._peer

    # ---- socket events

    def start(self) -> None:
        """Start reading; the bytes the acceptor read (CONNECT first) come before anything newer."""
        self.resume_reading()
        if self._initial:
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
        elif not self._lingering:
            self.data_received(data)

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
        if shard.flow.holding:
            shard.flow.received(self)

    def _lost(self, exc: Exception | None) -> None:
        """The connection is over (closed by the client, an error, or by us): tell the shard once."""
        if self._closed:
            return
        self._closed = True
        self.closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        self._wbuf = bytearray()
        self.out = []
        try:
            self.sock.close()
        except OSError:
            pass
        shard = self.shard
        shard.flow.forget(self)
        if self.session is not None:
            log.debug("connection of %s lost: %s", self.client_id, exc or "closed by peer")
            shard.detach(self, publish_will=True)
            shard.schedule_flush()
        shard.connections.discard(self)

    # ---- flow control (``flow.py``)

    def pause_reading(self) -> None:
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self._loop.add_reader(self.fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.fd)

    # ---- output

    def send(self, data: bytes) -> None:
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            self.shard.mark_dirty(self)

    def write_buffer_full(self) -> bool:
        return len(self._wbuf) > MAX_WRITE_BUFFER

    def write_out(self) -> None:
        """Write what the shard queued (the flush, after the commit)."""
        self.dirty = False
        self.unacked_in = 0
        out, self.out = self.out, []
        if self._closed:
            return
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            if self._wbuf:
                self._wbuf += data
            else:
                try:
                    sent = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._lost(exc)
                    return
                self.bytes_sent += sent
                if sent < len(data):
                    self._wbuf += memoryview(data)[sent:]
            if self._wbuf:
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self.fd, self._on_writable)
                if not self._backed_up and len(self._wbuf) > HIGH_WATER:
                    self._backed_up = True
                    self.shard.flow.backed_up_at(self, time.monotonic())
        if self._close_after and not self._wbuf:
            self._finish_close()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._wbuf[:sent]
        self.bytes_sent += sent
        if self._backed_up and len(self._wbuf) < LOW_WATER:
            self._backed_up = False
            self.shard.flow.drained(self)
            self.shard.schedule_flush()
        if not self._wbuf:
            self._loop.remove_writer(self.fd)
            self._writing = False
            if self._close_after:
                self._finish_close()

    def _finish_close(self) -> None:
        """Everything is written: FIN, then read and discard for a moment before closing, so a
        client still sending does not get a reset before it reads our DISCONNECT."""
        self._close_after = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._lost(None)
            return
        self._lingering = True
        self.resume_reading()  # drain (and discard) until EOF or the linger ends
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self._loop.call_later(CLOSE_LINGER, self._lost, None)

    def discard_output(self) -> None:
        self.out = []

    def close_after_write(self) -> None:
        """Close once what is queued has been written (after the next flush); a client that
        does not read it within ``CLOSE_TIMEOUT`` is cut off."""
        if self._close_timer is None and not self._closed:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._lost, None)
        self.closing = True
        self._close_after = True
        if not self.dirty:
            self.dirty = True
            self.shard.mark_dirty(self)

    def _abort(self) -> None:
        self.closing = True
        self._lost(None)
