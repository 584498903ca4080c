"""TLS for ``mqtts`` listeners: the server context, and the relay that carries a TLS client's
bytes to the worker that owns it.

Where TLS ends: in the acceptor. The acceptor has to read the CONNECT, which is inside
TLS, before it knows which worker owns the client, and an OpenSSL session cannot be
passed to another process with its socket. So the acceptor does the handshake, reads the
CONNECT, and hands the worker one end of a Unix socket pair instead of the TCP socket,
with the bytes read so far, the client's address and, when the listener asks for it, the
identity in its certificate. From then on a ``relay.ClientRelay`` in the acceptor decrypts
what the client sends into the pair and encrypts what the worker writes to it. The worker serves
the pair as it serves a TCP socket (``tcp.TcpConnection``): nothing in the broker knows TLS.

The cost (``docs/ARCHITECTURE.md`` has the figures): every TLS byte crosses one more
process, and the acceptor, one process, does all TLS work (``relay.py``).

Handing over the record-layer state instead (so that the worker continues the TLS
session itself) is the faster design that is not built: it needs a record layer of our
own for TLS 1.2 and 1.3 on the worker side.
"""

from __future__ import annotations

import logging
import ssl

from shardbroker.config import ListenerConfig

log = logging.getLogger("shardbroker.transport.tls")

__all__ = ["TlsError", "identity", "server_context"]


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


SAN_KINDS = ("DNS", "email", "URI")  # the subjectAltName entries that can name a client


def identity(tls: ssl.SSLSocket, source: str = "cn") -> str | None:
    """The common name (``source`` "cn") or the first DNS name, email address or URI among the
    subject alternative names ("san") of the client's verified certificate, or None."""
    cert = tls.getpeercert()
    if not cert:
        return None
    if source == "san":
        for entry in cert.get("subjectAltName", ()):
            if entry[0] in SAN_KINDS:
                return str(entry[1])
        return None
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                return str(attr[1])
    return None
