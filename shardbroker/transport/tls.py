"""TLS for ``mqtts`` listeners: the server context, and the relay that carries a TLS client's
bytes to the worker that owns it.

Where TLS ends: in the acceptor. The acceptor has to read the CONNECT, which is inside
TLS, before it knows which worker owns the client, and an OpenSSL session cannot be
passed to another process with its socket. So the acceptor does the handshake, reads the
CONNECT, and hands the worker one end of a Unix socket pair instead of the TCP socket,
with the bytes read so far, the client's address and, when the listener asks for it, the
identity in its certificate. From then on a ``TlsRelay`` in the acceptor decrypts what the
client sends into the pair and encrypts what the worker writes to it. The worker serves
the pair as it serves a TCP socket (``tcp.TcpConnection``): nothing in the broker knows TLS.

The cost (``docs/ARCHITECTURE.md`` has the figures): every TLS byte crosses one more
process, and the acceptor, one process, does all TLS work; the relay reads and writes in
chunks of up to 64 KB, so a busy client costs a few system calls per batch, not per
packet. Each direction buffers at most ``MAX_BUFFER`` bytes before the relay stops
reading the other side, so a slow reader pushes back on its writer as TCP would.

Handing over the record-layer state instead (so that the worker continues the TLS
session itself) is the faster design that is not built: it needs a record layer of our
own for TLS 1.2 and 1.3 on the worker side.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from shardbroker.config import ListenerConfig

log = logging.getLogger("shardbroker.transport.tls")

CHUNK = 1 << 16
RECORD = 16 * 1024  # bytes handed to SSL_write at once: one TLS record
MAX_BUFFER = 1 << 20  # bytes waiting in one direction before the other side is no longer read

__all__ = ["TlsError", "TlsRelay", "identity", "server_context"]


class TlsError(Exception):
    """A listener's certificate, key or CA file that does not load (the message says why)."""


def server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """The ``SSLContext`` of an ``mqtts`` listener; ``TlsError`` when its files do not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if listener.tls_version == "tlsv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        if listener.ciphers:
            ctx.set_ciphers(listener.ciphers)
        ctx.load_cert_chain(listener.certfile, listener.keyfile)
        if listener.cafile:
            ctx.load_verify_locations(cafile=listener.cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED if listener.require_certificate else ssl.CERT_OPTIONAL
    except FileNotFoundError as exc:
        raise TlsError(f"{exc.filename}: no such file") from None
    except ssl.SSLError as exc:
        raise TlsError(f"certificate, key or CA file does not load: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsError(f"cannot read a certificate, key or CA file: {exc.strerror or exc}") from None
    return ctx


def identity(tls: ssl.SSLSocket) -> str | None:
    """The common name of the client's verified certificate, or None."""
    cert = tls.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                return str(attr[1])
    return None


class TlsRelay:
    """Carries one client's bytes between its TLS socket and the plain end of the pair whose
    other end its worker serves; closes both when either side ends."""

    __slots__ = ("_loop", "_on_close", "_read_plain", "_read_tls", "_to_plain", "_to_tls", "_want_plain",
                 "_want_tls", "closed", "plain", "tls")

    def __init__(self, tls: ssl.SSLSocket, plain: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_close: Callable[[TlsRelay], None]) -> None:
        self.tls = tls
        self.plain = plain
        self._loop = loop
        self._on_close = on_close
        self._to_plain = bytearray()  # decrypted, not yet taken by the worker
        self._to_tls = bytearray()  # from the worker, not yet taken by OpenSSL
        self._read_tls = self._read_plain = False
        self._want_tls = self._want_plain = False  # a writer is registered
        self.closed = False

    def start(self) -> None:
        self._watch()
        if self.tls.pending():  # records decrypted while the CONNECT was read
            self._from_tls()

    def _watch(self) -> None:
        """Read a side only while the other side's buffer has room."""
        if self.closed:
            return
        loop = self._loop
        read_tls = len(self._to_plain) < MAX_BUFFER
        if read_tls != self._read_tls:
            self._read_tls = read_tls
            if read_tls:
                loop.add_reader(self.tls.fileno(), self._from_tls)
            else:
                loop.remove_reader(self.tls.fileno())
        read_plain = len(self._to_tls) < MAX_BUFFER
        if read_plain != self._read_plain:
            self._read_plain = read_plain
            if read_plain:
                loop.add_reader(self.plain.fileno(), self._from_plain)
            else:
                loop.remove_reader(self.plain.fileno())

    def _from_tls(self) -> None:
        while len(self._to_plain) < MAX_BUFFER:
            try:
                data = self.tls.recv(CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS client gone: %s", exc)
                self.close()
                return
            if not data:
                self._end_of_tls()
                return
            self._to_plain += data
        self._flush_plain()

    def _end_of_tls(self) -> None:
        """The client closed: what it sent goes to the worker (as far as the pair takes it),
        which then sees the end too."""
        self._flush_plain()
        self.close()

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
        want = bool(buf)
        if want != self._want_plain and not self.closed:
            self._want_plain = want
            if want:
                self._loop.add_writer(self.plain.fileno(), self._flush_plain)
            else:
                self._loop.remove_writer(self.plain.fileno())
        self._watch()

    def _from_plain(self) -> None:
        try:
            data = self.plain.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker closed the connection: send what it wrote, then close
            self._flush_tls()
            if not self.closed:
                try:
                    self.tls.setblocking(True)
                    self.tls.settimeout(1.0)
                    if self._to_tls:
                        self.tls.sendall(bytes(self._to_tls))
                except (ssl.SSLError, OSError):
                    pass
                self.close()
            return
        self._to_tls += data
        self._flush_tls()

    def _flush_tls(self) -> None:
        buf = self._to_tls
        while buf:
            chunk = bytes(buf[:RECORD])
            try:
                sent = self.tls.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except (ssl.SSLError, OSError):
                self.close()
                return
            del buf[:sent]
        want = bool(buf)
        if want != self._want_tls and not self.closed:
            self._want_tls = want
            if want:
                self._loop.add_writer(self.tls.fileno(), self._flush_tls)
            else:
                self._loop.remove_writer(self.tls.fileno())
        self._watch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        for sock, reading, writing in ((self.tls, self._read_tls, self._want_tls),
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
        self._read_tls = self._read_plain = self._want_tls = self._want_plain = False
        self._on_close(self)
