"""The relay between a client whose transport ends in the acceptor (TLS, WebSocket, both) and
the worker that serves it through one end of a Unix socket pair.

``ClientRelay`` reads what the client sends (decrypted by its ``ssl.SSLSocket`` for TLS,
unframed by its ``websocket.WsFramer`` for WebSocket) and writes the MQTT bytes into the
pair; what the worker writes comes back framed and encrypted. It reads and writes in
chunks of up to 64 KB, so a busy client costs a few system calls per batch, not per
packet; SSL writes go one record (16 KB) at a time, so a write that has to be retried is
retried with the same bytes. Each direction buffers at most ``MAX_BUFFER`` bytes before the
relay stops reading the other side: a slow reader pushes back on its writer as TCP would.
When either side ends, what the other still has to say is sent (a WebSocket close frame
among it) and both are closed.

A cluster node relays a plain TCP client to the node that serves it with the same class:
``plain`` is then its TCP connection to that node, and ``initial`` (a PROXY header and the
CONNECT already read) goes there first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from shardbroker.transport.websocket import WsFramer

log = logging.getLogger("shardbroker.transport.relay")

CHUNK = 1 << 16
RECORD = 16 * 1024  # bytes handed to SSL_write at once: one TLS record
MAX_BUFFER = 1 << 20  # bytes waiting in one direction before the other side is no longer read
CLOSE_TIMEOUT = 5.0  # seconds a client has to take the last bytes after the worker closed

_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)

__all__ = ["ClientRelay"]


class ClientRelay:
    __slots__ = ("_closing", "_framer", "_loop", "_on_close", "_read_client", "_read_plain", "_to_client",
                 "_to_plain", "_want_client", "_want_plain", "client", "closed", "plain")

    def __init__(self, client: socket.socket, plain: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_close: Callable[[ClientRelay], None], framer: WsFramer | None = None,
                 initial: bytes = b"") -> None:
        self.client = client  # an ssl.SSLSocket for TLS, else the TCP socket (WebSocket)
        self.plain = plain
        self._framer = framer
        self._loop = loop
        self._on_close = on_close
        self._to_plain = bytearray(initial)  # MQTT bytes not yet taken by the worker
        self._to_client = bytearray()  # bytes for the client's socket, not yet taken
        self._read_client = self._read_plain = False
        self._want_client = self._want_plain = False  # a writer is registered
        self._closing = False  # the worker is done: close once the client has what it wrote
        self.closed = False

    def start(self) -> None:
        self._watch()
        if self._to_plain:
            self._flush_plain()
        if not self.closed and isinstance(self.client, ssl.SSLSocket) and self.client.pending():  # read with the CONNECT
            self._from_client()

    def _watch(self) -> None:
        """Read a side only while the other side's buffer has room."""
        if self.closed:
            return
        self._read_client = self._reader(self.client, len(self._to_plain) < MAX_BUFFER, self._read_client,
                                         self._from_client)
        self._read_plain = self._reader(self.plain, len(self._to_client) < MAX_BUFFER and not self._closing,
                                        self._read_plain, self._from_plain)

    def _reader(self, sock: socket.socket, want: bool, reading: bool, callback: Callable[[], None]) -> bool:
        if want != reading:
            if want:
                self._loop.add_reader(sock.fileno(), callback)
            else:
                self._loop.remove_reader(sock.fileno())
        return want

    # ---- client -> worker

    def _from_client(self) -> None:
        over = False
        while len(self._to_plain) < MAX_BUFFER and not over:
            try:
                data = self.client.recv(CHUNK)
            except _WOULD_BLOCK:
                break
            except (ssl.SSLError, OSError) as exc:
                log.debug("client gone: %s", exc)
                data = b""
            if not data:
                if self._framer is not None:
                    self._to_client += self._framer.eof()
                over = True
                break
            if self._framer is not None:
                data, reply, over = self._framer.feed(data)
                self._to_client += reply
            self._to_plain += data
        self._flush_plain()
        if over:  # what the client sent goes to the worker (as far as the pair takes it)
            self._flush_client()
            self.close()
        elif self._to_client:
            self._flush_client()

    def _flush_plain(self) -> None:
        buf = self._to_plain
        while buf:
            try:
                sent = self.plain.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del buf[:sent]
        self._want(self.plain, bool(buf), plain=True)

    # ---- worker -> client

    def _from_plain(self) -> None:
        try:
            data = self.plain.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker closed the connection: what it wrote goes out, then the end
            if self._framer is not None:
                self._to_client += self._framer.close()
            self._closing = True
            self._loop.remove_reader(self.plain.fileno())
            self._read_plain = False
            self._loop.call_later(CLOSE_TIMEOUT, self.close)  # a client that takes nothing more
            self._flush_client()
            return
        self._to_client += self._framer.encode(data) if self._framer is not None else data
        self._flush_client()

    def _flush_client(self) -> None:
        buf = self._to_client
        tls = isinstance(self.client, ssl.SSLSocket)
        while buf:
            try:
                sent = self.client.send(bytes(buf[:RECORD]) if tls else buf)
            except _WOULD_BLOCK:
                break
            except (ssl.SSLError, OSError):
                self.close()
                return
            del buf[:sent]
        if self._closing and not buf:
            self.close()
            return
        self._want(self.client, bool(buf), plain=False)

    def _want(self, sock: socket.socket, want: bool, *, plain: bool) -> None:
        if self.closed:
            return
        current = self._want_plain if plain else self._want_client
        if want != current:
            flush = self._flush_plain if plain else self._flush_client
            if want:
                self._loop.add_writer(sock.fileno(), flush)
            else:
                self._loop.remove_writer(sock.fileno())
            if plain:
                self._want_plain = want
            else:
                self._want_client = want
        self._watch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        for sock, reading, writing in ((self.client, self._read_client, self._want_client),
                                       (self.plain, self._read_plain, self._want_plain)):
            fd = sock.fileno()
            if fd >= 0:
                if reading:
                    loop.remove_reader(fd)
                if writing:
                    loop.remove_writer(fd)
            try:
                sock.close()
            except OSError:
                pass
        self._read_client = self._read_plain = self._want_client = self._want_plain = False
        self._on_close(self)
