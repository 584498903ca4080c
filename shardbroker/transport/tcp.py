"""A plain TCP client connection in a worker, driven by readiness callbacks.

It implements ``shardbroker.core.client.Transport``: it reads the socket when the
worker's ``Poller`` says it is readable (one ``recv`` per turn, so busy clients take turns)
and hands the bytes to the broker (``Broker.received``), which frames and handles
them in order (never a task per packet). ``write`` sends at once with one ``send``;
what the kernel does not take waits in the connection's own write buffer and is
sent when the socket is writable again. There is no asyncio transport in between:
flow control (``core/flow.py``) sees the real write backlog.

Water marks: above ``HIGH_WATER`` bytes waiting the connection is backed up
(``Broker.backed_up``: a backlog, whose publishers are held); below ``LOW_WATER`` it is
drained again (``Broker.drained``). Above ``MAX_WRITE_BUFFER`` QoS 0 to it is
dropped (``write_buffer_full``).

Closing: ``close`` writes what is buffered, sends FIN, then reads and discards for
``CLOSE_LINGER`` seconds so that a client still sending reads our last packets
rather than a reset (not after the client's DISCONNECT: it sends nothing more); a client that does not take what it is owed within
``CLOSE_TIMEOUT`` is cut off. However it ends, the broker is told once
(``Broker.lost``), and so is the acceptor, through the hand-off link's close notices
(``notify_close``), which it needs to count open connections.

No MQTT here: bytes, readiness and the socket's life.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from shardbroker.core.clock import Now

if TYPE_CHECKING:
    from shardbroker.core.broker import Broker
    from shardbroker.core.client import Client

READ_SIZE = 8 * 1024
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_WRITE_BUFFER = 8 << 20  # QoS 0 to a client whose write buffer is beyond this is dropped
CLOSE_LINGER = 1.0  # seconds a server-closed connection keeps draining input after its FIN
CLOSE_TIMEOUT = 5.0  # seconds a server-closed connection may take to write what it owes, then abort


MAX_EVENTS = 256  # ready sockets served per loop callback, each with one read and/or one write
REAP_BATCH = 64  # hung-up connections closed per loop turn

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_BROKEN = select.EPOLLERR | select.EPOLLHUP


# A ``TcpConnection``'s state, the bits of its ``_state`` (one int instead of six flags:
# 40 bytes less per connection). Reading and writing are epoll's own bits, so the set's
# mask is ``_state & (_IN | _OUT)``.
_READING, _WRITING = _IN, _OUT  # in the poller's set for input / for output
_BACKED_UP = 0x100  # the write buffer passed HIGH_WATER; the broker was told
_CLOSE_AFTER = 0x200  # close once the write buffer is empty
_LINGERING = 0x400  # FIN sent: input is read and discarded until the linger ends
_CLOSED = 0x800  # closed, the broker told


def _now() -> Now:
    return Now(time.time(), time.monotonic())


class Poller:
    """Every client socket of a worker in one epoll set; the event loop watches only the set.

    A loop reader per socket costs the loop a handle and a registration (about 600 bytes
    per connection with uvloop, measured) and a callback per ready socket. Here a socket
    costs a slot in one dict, and one loop callback serves up to ``MAX_EVENTS`` ready
    sockets, each getting one read and one write at most, so busy clients take turns as
    before. The set is level-triggered: what a socket still has waits for the next
    callback, and the loop's other readers (the bus, the hand-offs) run in between. A
    socket is in the set exactly while it is read or has something to write: a paused,
    idle socket is out of it, so a peer that hung up cannot make it spin.
    """

    __slots__ = ("_conns", "_dying", "_ep", "_reaping", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ep = select.epoll()
        self._conns: dict[int, TcpConnection] = {}
        self.loop = loop  # the connections' timers run on it too
        self._dying: deque[TcpConnection] = deque()  # hung up, out of the set, not closed yet
        self._reaping = False
        loop.add_reader(self._ep.fileno(), self._ready)

    def __len__(self) -> int:
        return len(self._conns)

    def watch(self, conn: TcpConnection) -> None:
        """Follow ``conn``'s reading and writing bits (call before its socket closes)."""
        mask = conn._state & (_IN | _OUT)
        fd = conn.fd
        if fd in self._conns:
            if mask:
                self._ep.modify(fd, mask)
            else:
                self._ep.unregister(fd)
                del self._conns[fd]
        elif mask:
            self._ep.register(fd, mask)
            self._conns[fd] = conn

    def _ready(self) -> None:
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:  # pragma: no cover - a signal; the loop calls again
            return
        conns = self._conns
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None:  # closed by the handling of an earlier one
                continue
            if conn._state & _READING and ev & (_IN | _BROKEN):
                conn._on_readable()
            if conn._state & (_WRITING | _CLOSED) == _WRITING and ev & (_OUT | _BROKEN):
                conn._on_writable()

    def bury(self, conn: TcpConnection) -> None:
        """``conn`` hung up and is out of the set: close it (and tell the broker) at a later
        turn of the loop, ``REAP_BATCH`` at a time. Closing a TCP socket is the costly part of
        a hang-up (the kernel sends the FIN there); a crowd of clients leaving at once is then
        taken off the ready list at once, and the clients that stay are served in between."""
        self._dying.append(conn)
        if not self._reaping:
            self._reaping = True
            self.loop.call_soon(self._reap)

    def _reap(self) -> None:
        dying = self._dying
        for _ in range(min(REAP_BATCH, len(dying))):
            dying.popleft()._lost()
        if dying:
            self.loop.call_soon(self._reap)
        else:
            self._reaping = False

    def close(self) -> None:
        self.loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._conns.clear()


class CloseNotice(Protocol):
    """Told once when a connection that came over a hand-off link closes (``fd_passing``)."""

    def closed(self, number: int) -> None: ...


class TcpConnection:
    __slots__ = (
        "_broker", "_client", "_close_timer", "_handoff", "_initial", "_notice", "_peer", "_poller", "_state",
        "_wbuf", "bytes_received", "bytes_sent", "fd", "sock",
    )

    identity: str | None = None  # a certificate's identity, for ``RelayedConnection``
    listener: int = 0  # the first listener's; ``RelayedConnection`` carries another

    def __init__(self, sock: socket.SocketType, poller: Poller, initial: bytes = b"") -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._poller = poller
        self._initial = initial
        self._peer: str | None = None
        self._broker: Broker | None = None
        self._client: Client | None = None
        self._wbuf: bytearray | None = None  # what the kernel has not taken yet (None: nothing)
        self.bytes_sent = 0  # taken by the kernel (one add per ``send``)
        self.bytes_received = len(initial)  # the acceptor's read included (one add per ``recv``)
        self._state = 0  # _READING | _WRITING | _BACKED_UP | _CLOSE_AFTER | _LINGERING | _CLOSED
        self._close_timer: asyncio.TimerHandle | None = None  # the close timeout, then the linger
        self._notice: CloseNotice | None = None
        self._handoff = 0

    def notify_close(self, notice: CloseNotice, number: int) -> None:
        """Tell ``notice`` the hand-off ``number`` when the connection closes."""
        self._notice, self._handoff = notice, number

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

    def start(self, broker: Broker, client: Client, now: Now) -> None:
        """Start reading; the bytes the acceptor read (CONNECT first) come before anything newer."""
        self._broker = broker
        self._client = client
        self.resume_reading()
        if self._initial:
            initial, self._initial = self._initial, b""
            broker.received(client, initial, now)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._hung_up()
            return
        if not data:
            self._hung_up()
            return
        self.bytes_received += len(data)
        if not self._state & _LINGERING:
            assert self._broker is not None and self._client is not None
            self._broker.received(self._client, data, _now())

    def _hung_up(self) -> None:
        """The client closed, or the connection broke: out of the poller's set now, closed at
        its next reaping (``Poller.bury``)."""
        if self._state & (_READING | _WRITING):
            self._state &= ~(_READING | _WRITING)
            self._poller.watch(self)
        self._poller.bury(self)

    def _lost(self) -> None:
        """The connection is over (closed by the client, an error, or by us): tell the broker once."""
        if self._state & _CLOSED:
            return
        self._state |= _CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._state & (_READING | _WRITING):
            self._state &= ~(_READING | _WRITING)
            self._poller.watch(self)
        self._wbuf = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self._notice is not None:
            self._notice.closed(self._handoff)
        if self._broker is not None and self._client is not None:
            self._broker.lost(self._client, _now())
        # The client refers to its transport: without this the pair would wait for the
        # cyclic collector, which runs seldom here (worker.GC_THRESHOLDS), and a storm of
        # short connections would pile up as garbage.
        self._client = None

    # ---- reading (flow control pauses and resumes it)

    def pause_reading(self) -> None:
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self._state & (_READING | _CLOSED):  # (a hung-up one is read again, and buried again)
            self._state |= _READING
            self._poller.watch(self)

    def _stop_reading(self) -> None:
        if self._state & _READING:
            self._state &= ~_READING
            self._poller.watch(self)

    # ---- writing

    def write_buffer_full(self) -> bool:
        wbuf = self._wbuf
        return wbuf is not None and len(wbuf) > MAX_WRITE_BUFFER

    def write(self, data: bytes) -> None:
        if self._state & _CLOSED:
            return
        wbuf = self._wbuf
        if wbuf is not None:
            wbuf += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._lost()
                return
            self.bytes_sent += sent
            if sent < len(data):
                wbuf = self._wbuf = bytearray(memoryview(data)[sent:])
        if wbuf is not None:
            if not self._state & _WRITING:
                self._state |= _WRITING
                self._poller.watch(self)
            if not self._state & _BACKED_UP and len(wbuf) > HIGH_WATER:
                self._state |= _BACKED_UP
                if self._broker is not None and self._client is not None:
                    self._broker.backed_up(self._client, _now())

    def _on_writable(self) -> None:
        wbuf = self._wbuf
        if wbuf is None:  # pragma: no cover - the writer is removed with the buffer
            return
        try:
            sent = self.sock.send(wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del wbuf[:sent]
        self.bytes_sent += sent
        if self._state & _BACKED_UP and len(wbuf) < LOW_WATER:
            self._state &= ~_BACKED_UP
            if self._broker is not None and self._client is not None:
                self._broker.drained(self._client)
        if not wbuf:
            self._wbuf = None  # an idle connection keeps no buffer
            self._state &= ~_WRITING
            self._poller.watch(self)
            if self._state & _CLOSE_AFTER:
                self._finish_close()

    # ---- closing

    def close(self, reason: str, linger: bool = True) -> None:
        """Close once what is buffered has been written; a client that does not read it within
        ``CLOSE_TIMEOUT`` is cut off. Closing twice is closing once. TCP has no way to say why:
        ``reason`` is the broker's, which it has logged. ``linger`` False (the client sent
        DISCONNECT): with nothing buffered, the socket is closed at once (the kernel still
        sends what it holds, then the FIN), since there is no input to drain first."""
        if self._state & (_CLOSED | _LINGERING | _CLOSE_AFTER):
            return
        self._state |= _CLOSE_AFTER
        if self._wbuf is None:  # nothing to wait for: no close timeout to set (and cancel at once)
            if linger:
                self._finish_close()
            else:
                self._lost()
        elif self._close_timer is None:
            self._close_timer = self._poller.loop.call_later(CLOSE_TIMEOUT, self._lost)

    def _finish_close(self) -> None:
        """Everything is written: FIN, then read and discard for a moment before closing, so a
        client still sending does not get a reset before it reads our last packets."""
        self._state &= ~_CLOSE_AFTER
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._lost()
            return
        self._state |= _LINGERING
        self.resume_reading()  # drain (and discard) until EOF or the linger ends
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self._poller.loop.call_later(CLOSE_LINGER, self._lost)

    def abort(self, reason: str) -> None:
        self._lost()


class RelayedConnection(TcpConnection):
    """A client whose address came with the hand-off: its bytes come through a relay, one end
    of a Unix socket pair (its TLS or WebSocket ends in the acceptor, ``relay.py``), or over a
    proxy that said who it is (``proxy.py``). The identity in its certificate comes along too,
    and the listener it came in on. (A plain client of any listener but the first is one as
    well, with no address given: it is its own socket's. The first listener's plain clients
    are ``TcpConnection``s, which spend no memory on these.)"""

    __slots__ = ("identity", "listener")

    def __init__(self, sock: socket.SocketType, poller: Poller, initial: bytes,
                 peer: str | None, identity: str | None, listener: int = 0) -> None:
        super().__init__(sock, poller, initial)
        self._peer = peer
        self.identity = identity
        self.listener = listener

