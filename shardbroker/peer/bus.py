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
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
from zmq.utils import z85

from shardbroker.peer.messages import (
    REMOTE_BASE,
    PeerFormatError,
    PeerMessage,
    decode_batch,
    encode_batch,
)

log = logging.getLogger(__name__)

DRAIN_BUDGET = 512  # ZeroMQ messages handled per loop callback before yielding
DRAIN_BYTES = 1 << 16  # ... or this many bytes of them, so that the flush writes in between
KERNEL_BUFFER = 64 * 1024  # socket buffer bytes at each end of a pipe: little queues beyond the HWM
HWM = 8  # batches a pipe holds on each side before sends to that peer wait
BATCH_BYTES = 16 * 1024  # a batch is closed once its items' sizes add up to this
ITEM_COST = 40  # bytes counted for an item besides the size its sender gives
RETRY = 0.001  # seconds between tries to send a waiting backlog
PEER_STALL = 1.0  # seconds without taking a batch after which a full peer is taken to be down
REMOTE_BACKLOG = 1024  # batches kept for an unreachable worker of another node; older ones go
SENDER = struct.Struct(">HHQ")  # a remote batch's header: node number, worker, lease
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks whether a CURVE client may connect
ZAP_DOMAIN = b"shardbroker"
ZAP_WAIT = 20.0  # seconds a CURVE client whose key is not known yet waits before it is refused
ZAP_WAITING = 1024  # ... at most this many at once (more are refused at once)
REMOTE_STALL = 2.0  # seconds a worker of another node may take nothing before its socket is made anew

RemoteItems = Callable[[int, int, int, list[PeerMessage]], None]  # number, worker, lease, items


def remote_endpoint(advertise: str, worker: int) -> str:
    """The endpoint of ``worker``'s bus on the node whose bus address is ``advertise``
    (``HOST:PORT``, ``[V6]:PORT``): that port plus the worker's index."""
    host, _, port = advertise.rpartition(":")
    return f"tcp://{host}:{int(port) + worker}"


def remote_peer(number: int, worker: int) -> int:
    """The peer id of ``worker`` of the node numbered ``number`` (1..255)."""
    return number * REMOTE_BASE + worker


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
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()  # its own: one ZAP handler each
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
        # between nodes (listen_remote): the tcp:// PULL socket, this worker's keys, the
        # header of what it sends, the public keys let in, and what ZAP said no to
        self._rpull: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._keys: tuple[bytes, bytes] = (b"", b"")
        self._header = b""
        self._allowed: frozenset[bytes] = frozenset()
        self._on_remote: RemoteItems | None = None
        self._zap_waiting: list[tuple[float, list[bytes]]] = []  # (until, request), oldest first
        self._zap_timer: asyncio.TimerHandle | None = None
        self.zap_wait = ZAP_WAIT
        self._remote: dict[int, tuple[str, str]] = {}  # remote peer -> (endpoint, server key)
        self.refused_keys = 0  # CURVE clients refused (statistics)
        self.shed = 0  # batches dropped for an unreachable node (statistics)
        self.refused_frames = 0  # batches from other nodes the worker refused (statistics)
        self.renewed = 0  # sockets to other nodes' workers made anew (statistics)
        self.unreached = 0  # messages for peers not reached (forgotten), dropped (statistics)
        self._shed_said = 0.0

    @property
    def peers(self) -> list[int]:
        return list(self._push)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(_fd(self._pull), self._drain)
        loop.call_soon(self._drain)
        if self._rpull is not None and self._zap is not None:
            loop.add_reader(_fd(self._zap), self._answer_zap)
            loop.add_reader(_fd(self._rpull), self._drain_remote)
            loop.call_soon(self._answer_zap)
            loop.call_soon(self._drain_remote)

    # ---- between nodes

    def listen_remote(self, endpoint: str, public: str, secret: str, on_items: RemoteItems) -> None:
        """Bind the ``tcp://`` endpoint other nodes' workers send to (before :meth:`start`);
        ``public``/``secret``: this node's CURVE keys (Z85). ``on_items(number, worker, lease,
        items)`` gets each batch with its sender's header. ``OSError`` when it cannot bind."""
        if not zmq.has("curve"):
            raise OSError("this libzmq has no CURVE support: nodes cannot talk securely")
        zap = self._ctx.socket(zmq.ROUTER)  # not REP: an answer may wait while others come
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, HWM)
        pull.setsockopt(zmq.RCVBUF, KERNEL_BUFFER)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.IPV6, 1)
        pull.setsockopt(zmq.CURVE_SERVER, 1)
        pull.setsockopt(zmq.CURVE_SECRETKEY, secret.encode("ascii"))
        pull.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        pull.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            pull.bind(endpoint)
        except zmq.ZMQError as exc:
            pull.close(linger=0)
            zap.close(linger=0)
            raise OSError(exc.errno, exc.strerror) from None
        self._zap, self._rpull = zap, pull
        self._keys = (public.encode("ascii"), secret.encode("ascii"))
        self._on_remote = on_items

    def identify(self, number: int, lease: int) -> None:
        """What this worker's batches to other nodes say it is: its node's number and lease."""
        self._header = SENDER.pack(number, self.shard, lease)

    def allow(self, keys: frozenset[str]) -> None:
        """The public keys (Z85) of the nodes whose workers may connect from now on."""
        self._allowed = frozenset(k.encode("ascii") for k in keys)
        if self._zap_waiting:
            self._zap_settle()

    def connect(self, peer: int, endpoint: str, server_key: str) -> None:
        """A PUSH socket to a remote worker (``peer`` = ``remote_peer(...)``) whose node's
        public key is ``server_key``; its batches queue while it is not reachable."""
        s = self._ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.SNDBUF, KERNEL_BUFFER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IPV6, 1)
        s.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
        s.setsockopt(zmq.CURVE_PUBLICKEY, self._keys[0])
        s.setsockopt(zmq.CURVE_SECRETKEY, self._keys[1])
        s.connect(endpoint)
        self._push[peer] = s
        self._remote[peer] = (endpoint, server_key)

    def _renew(self, peer: int, now: float) -> None:
        """A worker of another node took nothing for ``REMOTE_STALL`` seconds: make its socket
        anew. libzmq gives up on a connection whose handshake failed (the other side was
        restarting and did not know our key yet, say) and would never try again."""
        endpoint, key = self._remote[peer]
        self._push.pop(peer).close(linger=0)
        self.connect(peer, endpoint, key)
        self._took_at[peer] = now
        self.renewed += 1

    def disconnect(self, peer: int) -> None:
        """Forget a remote worker: its socket closes, and what waited for it is dropped (what
        the durable outbox holds is sent again once it is back)."""
        s = self._push.pop(peer, None)
        if s is not None:
            s.close(linger=0)
        self._remote.pop(peer, None)
        self._pending.pop(peer, None)
        self._open_size.pop(peer, None)
        self._backlog.pop(peer, None)
        self._took_at.pop(peer, None)

    def _shed(self, peer: int, backlog: deque[bytes]) -> None:
        """A worker of another node has taken nothing for a long while (its node still holds a
        lease, but this one cannot reach it): drop the oldest batch for it rather than grow
        without bound. A durable forward in it is still in the outbox and is sent again."""
        backlog.popleft()
        self.shed += 1
        now = time.monotonic()
        if now - self._shed_said >= 1.0:
            self._shed_said = now
            log.warning("bus: peer %d (another node) takes nothing: %d batches for it dropped so"
                        " far (durable forwards are sent again once it answers)", peer, self.shed)

    def _answer_zap(self) -> None:
        """Answer libzmq's questions: may this CURVE client connect? A key this worker does
        not know yet is not refused at once: the answer waits up to ``ZAP_WAIT`` seconds for
        an ``allow`` that names it (a node that has just registered reaches us before our
        grant names it), since libzmq never reconnects after a refusal."""
        zap = self._zap
        assert zap is not None
        while True:
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.error("bus: ZAP receive failed: %s", exc)
                break
            # routing id, delimiter, version, request id, domain, address, identity,
            # mechanism, credentials
            if len(request) < 9 or request[7] != b"CURVE" or len(self._zap_waiting) >= ZAP_WAITING:
                self._zap_reply(request, False)
            else:
                self._zap_waiting.append((time.monotonic() + self.zap_wait, request))
        self._zap_settle()

    def _zap_settle(self) -> None:
        """Answer the waiting ZAP requests whose key is known now, or whose wait is over."""
        if self._zap_timer is not None:
            self._zap_timer.cancel()
            self._zap_timer = None
        now = time.monotonic()
        waiting: list[tuple[float, list[bytes]]] = []
        for until, request in self._zap_waiting:
            if z85.encode(request[8]) in self._allowed:
                self._zap_reply(request, True)
            elif now >= until:
                self._zap_reply(request, False)
            else:
                waiting.append((until, request))
        self._zap_waiting = waiting
        if waiting and self._loop is not None:
            self._zap_timer = self._loop.call_later(max(0.0, waiting[0][0] - now) + 0.01,
                                                    self._zap_settle)

    def _zap_reply(self, request: list[bytes], ok: bool) -> None:
        assert self._zap is not None
        if not ok:
            self.refused_keys += 1
            log.warning("bus: a connection from %s refused: not a registered node's key",
                        request[5].decode("ascii", "replace") if len(request) > 5 else "?")
        reply = [request[0], b"", b"1.0", request[3] if len(request) > 3 else b"",
                 b"200" if ok else b"400", b"OK" if ok else b"unknown node key", b"", b""]
        try:
            self._zap.send_multipart(reply, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.error("bus: ZAP reply failed: %s", exc)

    def _drain_remote(self) -> None:
        pull, on_items = self._rpull, self._on_remote
        assert pull is not None and on_items is not None
        taken = 0
        for _ in range(DRAIN_BUDGET):
            if taken > DRAIN_BYTES:
                break
            try:
                parts = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.error("bus: receive from another node failed: %s", exc)
                return
            if len(parts) != 2 or len(parts[0]) != SENDER.size:
                log.error("bus: a message of %d parts from another node dropped: no sender header",
                          len(parts))
                continue
            try:
                items = decode_batch(parts[1])
            except PeerFormatError as exc:
                log.error("bus: undecodable message of %d bytes from another node dropped: %s",
                          len(parts[1]), exc)
                continue
            number, worker, lease = SENDER.unpack(parts[0])
            taken += len(parts[1])
            self.received += len(items)
            on_items(number, worker, lease, items)
        if self._loop is not None:
            self._loop.call_soon(self._drain_remote)

    def send(self, peer: int, item: PeerMessage, size: int = 0) -> None:
        """Queue a message for a peer (``size``: its payload bytes); it leaves at the next :meth:`flush`.
        A peer this bus does not reach (a worker of a node whose registration ended, which the
        outbox still resends to) gets nothing: the message is dropped and counted, as the batches
        waiting for it were at :meth:`disconnect`."""
        if peer not in self._push:
            self.unreached += 1
            return
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
                    if peer >= REMOTE_BASE and len(backlog) > REMOTE_BACKLOG:
                        self._shed(peer, backlog)
                elif not self._send(peer, data):
                    self._backlog[peer] = deque((data,))
                    self._took_at.setdefault(peer, time.monotonic())
                    self.waited += 1
                    self._schedule_retry()

    def _send(self, peer: int, data: bytes) -> bool:
        """Send one batch unless the pipe is full; False when it must wait."""
        try:
            if peer >= REMOTE_BASE:
                self._push[peer].send_multipart((self._header, data), zmq.NOBLOCK)
            else:
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
            elif peer >= REMOTE_BASE and now - self._took_at.get(peer, now) > REMOTE_STALL:
                self._renew(peer, now)
        if self._backlog:
            self._schedule_retry()
        if self._on_progress is not None:
            self._on_progress()

    def congested(self, now: float) -> bool:
        """Whether a peer's pipe is full while the peer still takes batches (it is busy, not down)."""
        return any(now - self._took_at.get(peer, now) < PEER_STALL for peer in self._backlog)

    def waiting(self, peer: int) -> int:
        """Batches waiting for room toward ``peer``."""
        backlog = self._backlog.get(peer)
        return 0 if backlog is None else len(backlog)

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
            for sock in (self._pull, self._rpull, self._zap):
                if sock is None:
                    continue
                try:
                    self._loop.remove_reader(_fd(sock))
                except (zmq.ZMQError, RuntimeError) as exc:  # loop or socket already closed
                    log.debug("bus: remove_reader on close: %s", exc)
        if self._retry is not None:
            self._retry.cancel()
        if self._zap_timer is not None:
            self._zap_timer.cancel()
        self.flush()
        now = time.monotonic()
        for peer, backlog in self._backlog.items():  # last try: a peer that is gone loses them
            self._send_waiting(peer, backlog, now)
        for s in self._push.values():
            s.close(linger=200)
        self._pull.close(linger=0)
        for sock in (self._rpull, self._zap):
            if sock is not None:
                sock.close(linger=0)


def _fd(sock: zmq.Socket[bytes]) -> int:
    fd = sock.getsockopt(zmq.FD)
    assert isinstance(fd, int)
    return fd
