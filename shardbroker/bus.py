"""The inter-shard bus: ZeroMQ PUSH/PULL between worker processes.

Every worker binds one PULL socket (``ipc://RUN/shard-N.zmq``, or a ``tcp://``
endpoint between hosts) and connects one PUSH socket to each peer. A PUSH/PULL
pair delivers in order, so messages from one shard to another keep their order
(MQTT 4.6 ordering across shards rests on this). Messages queue in ZeroMQ while a
peer restarts and are delivered when it is back.

Items sent within one event-loop iteration are batched into one ZeroMQ message
per peer, encoded with ``marshal``: both ends are processes of the same
interpreter started by one supervisor, and the ipc endpoints live in the
supervisor's private run directory (mode 0700), so the fastest encoding of plain
lists, strings, bytes and numbers is safe here (CBOR cost 3 µs an item, marshal
0.25). This module knows nothing about MQTT: items are plain lists. It is the
only module that imports ``zmq``.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
from collections.abc import Callable, Sequence
from typing import Any

import zmq

log = logging.getLogger(__name__)

Item = list[Any]
DRAIN_BUDGET = 512  # ZeroMQ messages handled per loop callback before yielding


def endpoint(run_dir: str, shard: int) -> str:
    return f"ipc://{run_dir}/shard-{shard}.zmq"


class Bus:
    """One worker's end of the bus."""

    def __init__(
        self,
        shard: int,
        endpoints: Sequence[str],
        on_items: Callable[[list[Item]], None],
    ) -> None:
        self.shard = shard
        self.shards = len(endpoints)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(endpoints[shard])
        self._push: dict[int, zmq.Socket[bytes]] = {}
        for peer, ep in enumerate(endpoints):
            if peer == shard:
                continue
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self._push[peer] = s
        self._pending: dict[int, list[Item]] = {}
        self._on_items = on_items
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sent = 0
        self.received = 0

    @property
    def peers(self) -> list[int]:
        return list(self._push)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd(), self._drain)
        loop.call_soon(self._drain)

    def _fd(self) -> int:
        fd = self._pull.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        return fd

    def send(self, peer: int, item: Item) -> None:
        """Queue an item for a peer; it leaves at the next :meth:`flush`."""
        batch = self._pending.get(peer)
        if batch is None:
            self._pending[peer] = [item]
        else:
            batch.append(item)

    def broadcast(self, item: Item) -> None:
        for peer in self._push:
            self.send(peer, item)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for peer, items in pending.items():
            try:
                self._push[peer].send(marshal.dumps(items), zmq.NOBLOCK)
                self.sent += len(items)
            except zmq.ZMQError as exc:  # only on a closed context or an unlimited-HWM surprise
                log.error("bus: could not send %d items to shard %d: %s", len(items), peer, exc)

    def _drain(self) -> None:
        for _ in range(DRAIN_BUDGET):
            try:
                raw = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.error("bus: receive failed: %s", exc)
                return
            try:
                items = marshal.loads(raw)
            except Exception as exc:  # noqa: BLE001 - a bad frame must not stop the shard
                log.error("bus: undecodable message of %d bytes dropped: %s", len(raw), exc)
                continue
            self.received += len(items)
            self._on_items(items)
        # More may be waiting: the FD is edge-triggered, so come back soon.
        if self._loop is not None:
            self._loop.call_soon(self._drain)

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._fd())
            except (zmq.ZMQError, RuntimeError) as exc:  # loop or socket already closed
                log.debug("bus: remove_reader on close: %s", exc)
        self.flush()
        for s in self._push.values():
            s.close(linger=200)
        self._pull.close(linger=0)
