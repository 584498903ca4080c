"""The inter-shard bus: ZeroMQ PUSH/PULL between worker processes.

Every worker binds one PULL socket (``ipc://RUN/shard-N.zmq``, or a ``tcp://``
endpoint between hosts) and connects one PUSH socket to each peer. A PUSH/PULL
pair delivers in order, so messages from one shard to another keep their order
(MQTT 4.6 ordering across shards rests on this). Messages queue in ZeroMQ (and beyond
its HWM in the sender's backlog) while a peer restarts and are delivered when it
is back.

Flow control: each pipe holds at most ``HWM`` batches on either side (so about
``2 * HWM * BATCH_BYTES`` bytes, plus socket buffers of ``KERNEL_BUFFER`` each). A batch
that finds the pipe toward a peer full waits in this shard's backlog for that
peer (order kept: later batches queue behind it) and is retried every
``RETRY`` seconds. ``congested`` says whether some peer is full but still taking
batches, so that the shard can stop reading its clients (``flow.py``); a peer
that took nothing for ``PEER_STALL`` seconds is taken to be down, and its backlog
simply waits in memory until it is back. A shard drains its own pipe as fast as it
can handle what comes: a busy one pushes back on its peers by being slow to drain, and
a backlog holds its publishers back through peer messages (``Hold``), never by
stopping the drain.

Messages sent within one event-loop iteration are batched into ZeroMQ messages
per peer of about ``BATCH_BYTES`` at most (the sender tells a message's size),
encoded by ``messages.encode_batch``: typed, versioned, and valid between hosts
and interpreters, so an endpoint may as well be ``tcp://``. A frame that does not
decode is logged and dropped; it never stops the shard. This module knows nothing
about what the messages mean. It is the only module that imports ``zmq``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq

from shardbroker.peer.messages import PeerFormatError, PeerMessage, decode_batch, encode_batch

log = logging.getLogger(__name__)

DRAIN_BUDGET = 512  # ZeroMQ messages handled per loop callback before yielding
DRAIN_BYTES = 1 << 16  # ... or this many bytes of them, so that the flush writes in between
KERNEL_BUFFER = 64 * 1024  # socket buffer bytes at each end of a pipe: little queues beyond the HWM
HWM = 8  # batches a pipe holds on each side before sends to that peer wait
BATCH_BYTES = 16 * 1024  # a batch is closed once its items' sizes add up to this
ITEM_COST = 40  # bytes counted for an item besides the size its sender gives
RETRY = 0.001  # seconds between tries to send a waiting backlog
PEER_STALL = 1.0  # seconds without taking a batch after which a full peer is taken to be down


def endpoint(run_dir: str, shard: int) -> str:
    return f"ipc://{run_dir}/shard-{shard}.zmq"


def curve_keypair() -> tuple[str, str]:
    """(public, secret), Z85 text: a new CURVE keypair for a cluster node's bus between nodes
    (``cluster/numbers.py`` keeps it in the data directory)."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


class Bus:
    """One worker's end of the bus."""

    def __init__(
        self,
        shard: int,
        endpoints: Sequence[str],
        on_items: Callable[[list[PeerMessage]], None],
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.shard = shard
        self.shards = len(endpoints)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, HWM)
        self._pull.setsockopt(zmq.RCVBUF, KERNEL_BUFFER)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(endpoints[shard])
        self._push: dict[int, zmq.Socket[bytes]] = {}
        for peer, ep in enumerate(endpoints):
            if peer == shard:
                continue
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, HWM)
            s.setsockopt(zmq.SNDBUF, KERNEL_BUFFER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self._push[peer] = s
        self._pending: dict[int, list[list[PeerMessage]]] = {}  # peer -> batches, the last one open
        self._open_size: dict[int, int] = {}  # peer -> bytes counted in its open batch
        self._on_items = on_items
        self._on_progress = on_progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: dict[int, deque[bytes]] = {}  # peer -> encoded batches waiting for room
        self._took_at: dict[int, float] = {}  # peer -> when it last took a batch (monotonic)
        self._retry: asyncio.TimerHandle | None = None
        self.waited = 0  # batches that had to wait for room (statistics)
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

    def send(self, peer: int, item: PeerMessage, size: int = 0) -> None:
        """Queue a message for a peer (``size``: its payload bytes); it leaves at the next :meth:`flush`."""
        batches = self._pending.get(peer)
        size += ITEM_COST
        if batches is None:
            self._pending[peer] = [[item]]
            self._open_size[peer] = size
            return
        total = self._open_size[peer] + size
        if total > BATCH_BYTES:
            batches.append([item])
            self._open_size[peer] = size
        else:
            batches[-1].append(item)
            self._open_size[peer] = total

    def broadcast(self, item: PeerMessage) -> None:
        for peer in self._push:
            self.send(peer, item)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for peer, batches in pending.items():
            for items in batches:
                self.sent += len(items)
                data = encode_batch(items)
                backlog = self._backlog.get(peer)
                if backlog is not None:  # behind earlier batches: order first
                    backlog.append(data)
                    self.waited += 1
                elif not self._send(peer, data):
                    self._backlog[peer] = deque((data,))
                    self._took_at.setdefault(peer, time.monotonic())
                    self.waited += 1
                    self._schedule_retry()

    def _send(self, peer: int, data: bytes) -> bool:
        """Send one batch unless the pipe is full; False when it must wait."""
        try:
            self._push[peer].send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # only on a closed context
            log.error("bus: could not send a batch of %d bytes to shard %d: %s", len(data), peer, exc)
        return True

    def _schedule_retry(self) -> None:
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(RETRY, self._send_backlog)

    def _send_waiting(self, peer: int, backlog: deque[bytes], now: float) -> None:
        """Send what the pipe to ``peer`` takes from its backlog, oldest first."""
        while backlog and self._send(peer, backlog[0]):
            backlog.popleft()
            self._took_at[peer] = now

    def _send_backlog(self) -> None:
        self._retry = None
        now = time.monotonic()
        for peer, backlog in list(self._backlog.items()):
            self._send_waiting(peer, backlog, now)
            if not backlog:
                del self._backlog[peer]
                self._took_at.pop(peer, None)
        if self._backlog:
            self._schedule_retry()
        if self._on_progress is not None:
            self._on_progress()

    def congested(self, now: float) -> bool:
        """Whether a peer's pipe is full while the peer still takes batches (it is busy, not down)."""
        return any(now - self._took_at.get(peer, now) < PEER_STALL for peer in self._backlog)

    def backlog(self) -> int:
        """Batches waiting for room, over all peers."""
        return sum(len(b) for b in self._backlog.values())

    def _drain(self) -> None:
        taken = 0
        for _ in range(DRAIN_BUDGET):
            if taken > DRAIN_BYTES:
                break
            try:
                raw = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.error("bus: receive failed: %s", exc)
                return
            try:
                items = decode_batch(raw)
            except PeerFormatError as exc:  # a bad frame must not stop the shard
                log.error("bus: undecodable message of %d bytes dropped: %s", len(raw), exc)
                continue
            taken += len(raw)
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
        if self._retry is not None:
            self._retry.cancel()
        self.flush()
        now = time.monotonic()
        for peer, backlog in self._backlog.items():  # last try: a peer that is gone loses them
            self._send_waiting(peer, backlog, now)
        for s in self._push.values():
            s.close(linger=200)
        self._pull.close(linger=0)
