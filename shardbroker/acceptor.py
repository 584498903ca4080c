"""The acceptor process: accept, read CONNECT under a deadline, hand the socket over.

The acceptor speaks MQTT only as far as the CONNECT packet: it reads it under a
deadline (``limits.connect_timeout``) and a size limit, assigns an identifier to a
client that sent an empty one where the version allows it, and hands the socket
with every byte read so far to the worker that owns the client ID
(``shard_for(client_id, workers)``). A CONNECT that is malformed or illegal gets
the spec's answer here (a CONNACK with a reason code where one exists, then a
close), and the reason is logged.

It never touches a store, a session or the bus.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid

from .config import Config
from .handoff import send_handoff
from .protocol import codec, reasons
from .protocol.errors import ProtocolError
from .protocol.packets import MQTT_3_1, MQTT_3_1_1, MQTT_5, ConnAck, Connect, PacketType
from .sharding import shard_for

log = logging.getLogger("shardbroker.acceptor")


class Acceptor:
    def __init__(self, config: Config, listen: socket.socket, run_dir: str, shards: int) -> None:
        self.config = config
        self.listen = listen
        self.run_dir = run_dir
        self.shards = shards
        self._links: dict[int, socket.socket] = {}
        self._stopping = False
        self.accepted = 0
        self.handed_off = 0

    def _link(self, shard: int) -> socket.socket:
        link = self._links.get(shard)
        if link is not None:
            return link
        path = os.path.join(self.run_dir, f"handoff-{shard}.sock")
        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        link.settimeout(5.0)
        link.connect(path)
        self._links[shard] = link
        return link

    def _handoff(self, shard: int, sock: socket.socket, client_id: str | None, data: bytes) -> bool:
        # A worker that is restarting refuses for a moment: retry briefly, then give up.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                send_handoff(self._link(shard), sock.fileno(), client_id, data)
                return True
            except OSError as exc:
                stale = self._links.pop(shard, None)
                if stale is not None:
                    stale.close()
                if time.monotonic() > deadline or self._stopping:
                    log.warning("hand-off to shard %d failed: %s", shard, exc)
                    return False
                time.sleep(0.05)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.listen.setblocking(False)
        while not self._stopping:
            try:
                sock, _addr = await loop.sock_accept(self.listen)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            self.accepted += 1
            sock.setblocking(False)
            loop.create_task(self._connection(sock))

    async def _connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        reader = codec.PacketReader(max_packet_size=limits.max_packet_size)
        data = bytearray()
        peer = _peername(sock)
        try:
            async with asyncio.timeout(limits.connect_timeout):
                raw: list[tuple[int, memoryview | bytes]] = []
                while not raw:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        log.debug("%s closed before CONNECT", peer)
                        sock.close()
                        return
                    data += chunk
                    if data[0] != PacketType.CONNECT << 4:  # [MQTT-3.1.0-1], judged from the first byte
                        log.info("%s: first packet is not CONNECT (byte 0x%02X): closing", peer, data[0])
                        sock.close()
                        return
                    raw = reader.feed_raw(bytes(chunk))
        except TimeoutError:
            log.info("%s sent no CONNECT within %.1fs: closing", peer, limits.connect_timeout)
            sock.close()
            return
        except ProtocolError as exc:
            log.info("%s: bad first packet: %s: closing", peer, exc.message)
            sock.close()
            return
        except OSError as exc:
            log.debug("%s: %s", peer, exc)
            sock.close()
            return
        first, body = raw[0]
        if first >> 4 != PacketType.CONNECT:
            log.info("%s: first packet is type %d, not CONNECT [MQTT-3.1.0-1]: closing", peer, first >> 4)
            sock.close()
            return
        try:
            version = codec.connect_version(body)
        except ProtocolError as exc:
            await self._refuse(sock, peer, MQTT_3_1_1 if exc.reason == reasons.UNSUPPORTED_PROTOCOL_VERSION else None, exc)
            return
        try:
            connect = codec.decode(first, body, version)
        except ProtocolError as exc:
            await self._refuse(sock, peer, version, exc)
            return
        assert isinstance(connect, Connect)
        client_id: str | None = None
        if not connect.client_id:
            if version == MQTT_5 or (version == MQTT_3_1_1 and connect.clean_start):
                client_id = "auto-" + uuid.uuid4().hex  # [MQTT-3.1.3-6]
            else:  # [MQTT-3.1.3-8]
                await self._refuse(
                    sock, peer, version,
                    ProtocolError(reasons.CLIENT_IDENTIFIER_NOT_VALID, "empty client identifier with a persistent session"),
                )
                return
        elif version == MQTT_3_1 and len(connect.client_id) > 23:
            await self._refuse(
                sock, peer, version,
                ProtocolError(reasons.CLIENT_IDENTIFIER_NOT_VALID, "MQTT 3.1 client identifier longer than 23 characters"),
            )
            return
        owner = shard_for(client_id or connect.client_id, self.shards)
        ok = self._handoff(owner, sock, client_id, bytes(data))
        if ok:
            self.handed_off += 1
        else:
            await self._refuse(sock, peer, version, ProtocolError(reasons.SERVER_UNAVAILABLE, "shard unavailable"))
            return
        sock.close()  # the worker has its own descriptor now

    async def _refuse(self, sock: socket.socket, peer: str, version: int | None, exc: ProtocolError) -> None:
        log.info("%s: CONNECT refused: %s (%s)", peer, exc.message, reasons.name(exc.reason))
        if version is not None and (version == MQTT_5 or exc.reason in reasons.V5_TO_V3_CONNACK):
            code = exc.reason if version == MQTT_5 else reasons.V5_TO_V3_CONNACK.get(exc.reason)
            if code is not None:
                try:
                    await asyncio.get_running_loop().sock_sendall(
                        sock, codec.encode(ConnAck(False, code), version)
                    )
                except OSError:
                    pass
        sock.close()

    def stop(self) -> None:
        self._stopping = True
        for link in self._links.values():
            link.close()
        self._links.clear()


def _peername(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def run(config: Config, listen_fd: int, run_dir: str, shards: int) -> None:
    """Process entry point."""
    from .runtime import install_loop, ready

    install_loop()
    listen = socket.socket(fileno=listen_fd)
    acceptor = Acceptor(config, listen, run_dir, shards)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(acceptor.serve())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready("acceptor")
        await stop.wait()
        acceptor.stop()
        task.cancel()
        listen.close()
        log.info("acceptor stopped (accepted %d, handed off %d)", acceptor.accepted, acceptor.handed_off)

    asyncio.run(main())
