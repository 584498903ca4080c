"""MQTT over WebSocket (``ws`` and ``wss`` listeners): the opening handshake and the framing,
with the sans-I/O ``ServerProtocol`` of the ``websockets`` library.

``WsFramer`` turns what a client sends into MQTT bytes and MQTT bytes into binary frames.
It lives where TLS ends, in the acceptor (``tls.py`` says why): the acceptor reads the
opening handshake and the CONNECT through it, hands the worker one end of a socket pair,
and relays between the client and the pair for the rest of the connection, passing the
bytes through the framer. Pings are answered and closes completed by the protocol itself;
no permessage-deflate (nothing to negotiate, nothing to compress twice).

The rules: the request's path must be the listener's (``/mqtt`` by default; anything
else gets 404) and the client must offer the ``mqtt`` subprotocol (``mqttv3.1`` too, for
old clients) [MQTT-6.0.0-3]; a text frame is a protocol error (close 1003) [MQTT-6.0.0-1];
a message may hold any number of MQTT packets or parts of one [MQTT-6.0.0-2]. A message is
at most the MQTT maximum packet size plus room for its framing. The request is at most
``MAX_REQUEST`` bytes (else 431), and frames are read only once it is answered: what comes
behind it in the same read waits for the 101, and is dropped if the request is refused.
"""

from __future__ import annotations

import logging

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

log = logging.getLogger("shardbroker.transport.websocket")
_protocol_log = logging.getLogger("shardbroker.transport.websocket.protocol")
_protocol_log.setLevel(logging.WARNING)  # it says "connection open" at INFO, once per client

SUBPROTOCOLS = [Subprotocol("mqtt"), Subprotocol("mqttv3.1")]
MAX_REQUEST = 16 * 1024  # bytes of an opening handshake before it is refused

__all__ = ["WsFramer"]


class WsFramer:
    """One client's WebSocket: ``feed`` what it sent, ``encode`` what goes to it."""

    __slots__ = ("_path", "_proto", "_seen", "_tail", "open", "request")

    def __init__(self, path: str, max_packet_size: int) -> None:
        self._proto = ServerProtocol(subprotocols=SUBPROTOCOLS, max_size=max_packet_size + 1024,
                                     logger=_protocol_log)
        self._path = path
        self._seen = 0  # bytes of the opening handshake so far
        self._tail = b""  # its last bytes, to find "\r\n\r\n" across reads
        self.open = False  # the opening handshake was accepted
        self.request: Request | None = None  # the opening request, once read (its headers, for the client's address)

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """``(MQTT bytes, bytes to send back, the connection is over)``."""
        if self.open:
            return self._receive(data)
        # The protocol parses all it is given, frames too, before the request is answered:
        # a ping behind the request would be answered ahead of the 101, and frames behind
        # a refused request would come out as MQTT bytes. So it gets the request alone
        # first (it ends at the first empty line, RFC 7230 3), and what follows only once
        # the request is accepted. (A client sends no frames before the response anyway,
        # RFC 6455 4.1.)
        window = self._tail + data
        at = window.find(b"\r\n\r\n")
        cut = len(data) if at < 0 else at + 4 - len(self._tail)
        self._seen += cut
        if self._seen > MAX_REQUEST:
            return b"", self._refuse(431, "the opening handshake is too large"), True
        self._tail = window[-3:]
        mqtt, out, over = self._receive(data[:cut])
        if over or not self.open or cut == len(data):
            return mqtt, out, over
        more, out_more, over = self._receive(data[cut:])
        return mqtt + more, out + out_more, over

    def _receive(self, data: bytes) -> tuple[bytes, bytes, bool]:
        proto = self._proto
        proto.receive_data(data)
        app: list[bytes] = []
        for event in proto.events_received():
            if isinstance(event, Request):
                self.request = event
                path = event.path.split("?", 1)[0]
                if path != self._path:
                    response = proto.reject(404, f"MQTT is served on {self._path}\n")
                elif not _offers(event.headers):
                    response = proto.reject(400, "the mqtt subprotocol is required\n")
                else:
                    response = proto.accept(event)
                proto.send_response(response)
                self.open = response.status_code == 101
                if not self.open:
                    log.info("WebSocket upgrade refused: %d %s", response.status_code, response.reason_phrase)
            elif isinstance(event, Frame):
                if event.opcode in (Opcode.BINARY, Opcode.CONT):
                    app.append(bytes(event.data))
                elif event.opcode == Opcode.TEXT:
                    proto.fail(1003, "MQTT over WebSocket is sent in binary frames")
                    # RFC 6455 7.1.7: after failing the connection nothing more it sent is
                    # processed, not the frames read with this one either.
                    break
        out, over = self._outgoing()
        return b"".join(app), out, over or (not self.open and proto.state is not State.CONNECTING)

    def encode(self, data: bytes) -> bytes:
        """MQTT bytes for the client, as one binary frame."""
        if self._proto.state is not State.OPEN:
            return b""
        self._proto.send_binary(data)
        return self._outgoing()[0]

    def eof(self) -> bytes:
        """The client's TCP stream ended."""
        self._proto.receive_eof()
        return self._outgoing()[0]

    def close(self) -> bytes:
        """The broker closes the connection: a close frame (1000)."""
        if self._proto.state is State.OPEN:
            self._proto.send_close(1000)
        return self._outgoing()[0]

    def _outgoing(self) -> tuple[bytes, bool]:
        chunks = self._proto.data_to_send()
        over = any(not c for c in chunks)  # an empty chunk: the protocol wants TCP closed
        return b"".join(chunks), over or self._proto.state is State.CLOSED

    @staticmethod
    def _refuse(status: int, text: str) -> bytes:
        body = text.encode()
        return (f"HTTP/1.1 {status} Request Header Fields Too Large\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode() + body


def _offers(headers: Headers) -> bool:
    offered = {p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")}
    return bool(offered & set(SUBPROTOCOLS))
