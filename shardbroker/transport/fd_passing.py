"""Passing an accepted client socket from the acceptor to its worker.

The acceptor reads a client's CONNECT, then sends the socket's file descriptor
(SCM_RIGHTS) together with the bytes already read over a Unix stream socket
that the owning worker listens on (``handoff-N.sock`` in the run directory).

Wire format of one hand-off: a fixed head of 12 bytes, big-endian: the length of the rest
(u32), the index of the listener it came in on (u16), then the lengths of three optional
strings (u16 each, length + 1; 0: none): the assigned client id, the client's address
(``host:port``, for a socket that is not the client's own TCP socket: a TLS client's relay)
and the identity in its certificate; then those strings (UTF-8) and the initial bytes. The
lengths all come first so that the common hand-off, with none of the strings, is read with
one ``unpack_from``.
Hand-offs are sent in batches: one ``sendmsg`` carries up to ``MAX_FDS`` frames
and their descriptors, in the same order. The descriptors ride on the first byte
of the batch, so on the receiving side a descriptor always arrives no later than
the first byte of its frame: frames and descriptors pair up in order.

The link is used both ways: the worker writes a *close notice* back on it for every
connection handed over it, when that connection closes, so that the acceptor can count the
connections that are open (``limits.max_connections``). Both ends number the hand-offs of one
link in order, from 0 (``u32``, wrapping); a notice is that number as a 4-byte big-endian
integer, and the notices of one loop iteration go in one ``send`` (``encode_closed``). The
acceptor reads them with ``ClosedReader``. A link that breaks takes its numbering with it.

This module does no MQTT; it only moves sockets and bytes.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass

_HEAD = struct.Struct(">IHHHH")  # the length after the first 4 bytes, listener, three string lengths + 1
_HEAD_REST = _HEAD.size - 4
_NOTICE = struct.Struct(">I")
MAX_FRAME = 512 << 20
MAX_FDS = 64  # descriptors per sendmsg; the receiver's control buffer holds exactly this many
# Plain ints: ``flags & socket.MSG_CTRUNC`` would go through the enum's ``__rand__`` (Python code)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)


@dataclass(slots=True)
class Handoff:
    """One connection handed over. A value, though not frozen (one per connection on each
    side; a frozen dataclass's ``__init__`` costs an ``object.__setattr__`` per field)."""

    fd: int
    client_id: str | None  # an identifier the acceptor assigned, or None
    initial: bytes  # everything read from the client so far (CONNECT first)
    peer: str | None = None  # the client's address when ``fd`` is not its own socket
    identity: str | None = None  # the identity in its TLS certificate, when it is the username
    listener: int = 0  # which listener (its index in the configuration) it came in on


def _opt(text: str | None) -> tuple[int, bytes]:
    if text is None:
        return 0, b""
    raw = text.encode()
    return len(raw) + 1, raw


def encode_frame(client_id: str | None, initial: bytes, peer: str | None = None,
                 identity: str | None = None, listener: int = 0) -> bytes:
    if client_id is None and peer is None and identity is None:  # the common hand-off
        return _HEAD.pack(_HEAD_REST + len(initial), listener, 0, 0, 0) + initial
    (n1, s1), (n2, s2), (n3, s3) = _opt(client_id), _opt(peer), _opt(identity)
    rest = s1 + s2 + s3 + initial
    return _HEAD.pack(_HEAD_REST + len(rest), listener, n1, n2, n3) + rest


def send_handoffs(sock: socket.socket, batch: list[Handoff]) -> bytes | None:
    """Send up to ``MAX_FDS`` hand-offs in one ``sendmsg`` on a Unix stream socket. On a
    non-blocking socket the kernel may take only the first bytes: the descriptors went with
    them (they are the receiver's now), and the bytes not sent are returned, to be sent before
    anything else on the socket. None when all went. Raises ``BlockingIOError`` when nothing
    went (the descriptors are still the caller's), OSError on failure."""
    if not 0 < len(batch) <= MAX_FDS:
        raise ValueError(f"a hand-off batch holds 1 to {MAX_FDS} sockets, not {len(batch)}")
    data = b"".join(encode_frame(h.client_id, h.initial, h.peer, h.identity, h.listener) for h in batch)
    fds = array.array("i", [h.fd for h in batch])
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent < len(data):
        if sock.gettimeout() != 0.0:  # a blocking socket: send the rest now
            sock.sendall(data[sent:])
            return None
        return data[sent:]
    return None


class HandoffReceiver:
    """Reassembles hand-offs from a non-blocking Unix stream socket. No event loop inside:
    call :meth:`read` when the socket is readable; it returns completed hand-offs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self.closed = False

    def read(self) -> list[Handoff]:
        out: list[Handoff] = []
        fds_size = array.array("i").itemsize
        while True:
            try:
                data, ancdata, flags, _addr = self.sock.recvmsg(
                    1 << 18, socket.CMSG_SPACE(MAX_FDS * fds_size)
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if flags & _CTRUNC:  # descriptors were dropped: frames no longer pair up
                raise ValueError("hand-off descriptors truncated")
            for level, kind, payload in ancdata:
                if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                    self._fds.extend(fds)
            if not data:
                self.closed = True
                break
            self._buf += data
            out.extend(self._frames())
        return out

    def _frames(self) -> list[Handoff]:
        """The whole frames in the buffer that have their descriptor, read in place; the buffer
        is cut once, after them (not once per frame: a batch holds up to ``MAX_FDS``)."""
        out: list[Handoff] = []
        buf, fds = self._buf, self._fds
        at, n = 0, len(buf)
        head, unpack = _HEAD.size, _HEAD.unpack_from
        while n - at >= head:
            size, listener, n1, n2, n3 = unpack(buf, at)
            if not _HEAD_REST <= size <= MAX_FRAME:
                raise ValueError(f"hand-off frame of {size} bytes")
            end = at + 4 + size
            if n < end or not fds:
                break
            pos = at + head
            if n1 | n2 | n3:
                if n1 + n2 + n3 - (n1 > 0) - (n2 > 0) - (n3 > 0) > end - pos:
                    raise ValueError("hand-off frame shorter than its strings")
                fields: list[str | None] = []
                for marker in (n1, n2, n3):
                    if marker:
                        fields.append(buf[pos : pos + marker - 1].decode())
                        pos += marker - 1
                    else:
                        fields.append(None)
                out.append(Handoff(fds.popleft(), fields[0], bytes(buf[pos:end]), fields[1], fields[2], listener))
            else:
                out.append(Handoff(fds.popleft(), None, bytes(buf[pos:end]), None, None, listener))
            at = end
        if at:
            del buf[:at]
        return out

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()


def encode_closed(numbers: list[int]) -> bytes:
    """Close notices for the hand-offs numbered ``numbers`` on a link."""
    return struct.pack(f">{len(numbers)}I", *numbers)


class ClosedReader:
    """Close notices from the bytes read off a link, whatever their chunking."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[int]:
        if self._rest:
            data = self._rest + data
        whole = len(data) - len(data) % _NOTICE.size
        self._rest = data[whole:]
        return [n for (n,) in _NOTICE.iter_unpack(memoryview(data)[:whole])]


class ClosedWriter:
    """The worker's side of the close notices of one link, no event loop inside: ``add`` a
    number (True for the first since the last flush: schedule one), ``flush`` once per
    iteration (True while bytes wait for the socket to be writable)."""

    __slots__ = ("_numbers", "_out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # non-blocking
        self._numbers: list[int] = []
        self._out = bytearray()

    def add(self, number: int) -> bool:
        self._numbers.append(number)
        return len(self._numbers) == 1

    def flush(self) -> bool:
        if self._numbers:
            self._out += encode_closed(self._numbers)
            self._numbers = []
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:  # the acceptor is gone: so is the numbering
                self._out.clear()
                return False
            del self._out[:sent]
        return False
