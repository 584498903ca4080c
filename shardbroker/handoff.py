"""Passing an accepted client socket from the acceptor to its worker.

The acceptor reads a client's CONNECT, then sends the socket's file descriptor
(SCM_RIGHTS) together with the bytes already read over a Unix stream socket
that the owning worker listens on (``handoff-N.sock`` in the run directory).

Wire format of one hand-off: a 4-byte big-endian length, then a frame:
``u16 length of the assigned client id + 1 (0: none), the id (UTF-8), initial bytes``.
The descriptor rides on the first ``sendmsg`` of the frame, so on the receiving
side a descriptor always arrives no later than the first byte of its frame:
frames and descriptors pair up in order.

This module does no MQTT; it only moves sockets and bytes.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass

_LEN = struct.Struct(">I")
_HLEN = struct.Struct(">H")
MAX_FRAME = 512 << 20


@dataclass(frozen=True, slots=True)
class Handoff:
    fd: int
    client_id: str | None  # an identifier the acceptor assigned, or None
    initial: bytes  # everything read from the client so far (CONNECT first)


def encode_frame(client_id: str | None, initial: bytes) -> bytes:
    header = b"" if client_id is None else client_id.encode()
    body = _HLEN.pack(0 if client_id is None else len(header) + 1) + header + initial
    return _LEN.pack(len(body)) + body


def send_handoff(sock: socket.socket, fd: int, client_id: str | None, initial: bytes) -> None:
    """Send one hand-off on a blocking Unix stream socket (raises OSError on failure)."""
    frame = encode_frame(client_id, initial)
    fds = array.array("i", [fd])
    sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent < len(frame):
        sock.sendall(frame[sent:])


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
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    1 << 18, socket.CMSG_SPACE(64 * 4)
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
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
        out: list[Handoff] = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf, 0)
            if size > MAX_FRAME:
                raise ValueError(f"hand-off frame of {size} bytes")
            if len(self._buf) < 4 + size or not self._fds:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            (marker,) = _HLEN.unpack_from(body, 0)
            hlen = max(0, marker - 1)
            client_id = body[2 : 2 + hlen].decode() if marker else None
            out.append(Handoff(self._fds.popleft(), client_id, body[2 + hlen :]))
        return out

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()
