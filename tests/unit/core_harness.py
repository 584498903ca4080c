"""A broker core with fake clients, a fake clock and a fake peer link: no loop, no sockets.

``Harness`` builds one shard's ``Broker`` on a real LMDB store in a temporary
directory, and drives it the way its shell does: bytes in through ``received``,
the flush when the scheduler says, ``tick`` for the sweep, ``lost`` when a
connection ends. Time only moves when a test moves it (``advance``). Clients
speak through ``FakeTransport``, which keeps what the broker wrote; ``FakeClient``
encodes what a client sends and decodes what the broker answered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardbroker.config import Config, load_config
from shardbroker.core.broker import Broker
from shardbroker.core.client import Client
from shardbroker.core.clock import Now
from shardbroker.peer.messages import PeerMessage
from shardbroker.protocol import codec
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    NO_PROPERTIES,
    Connect,
    Packet,
    Properties,
    Will,
)
from shardbroker.security.auth import Policy
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore

START = Now(1_800_000_000.0, 1000.0)


class FakeTimer:
    def __init__(self, due: float, callback: Callable[[Now], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    """Callbacks run only when the test lets time pass (``Harness.run``/``advance``)."""

    def __init__(self, clock: Callable[[], Now]) -> None:
        self._clock = clock
        self.due_soon: list[Callable[[Now], None]] = []
        self.timers: list[FakeTimer] = []

    def soon(self, callback: Callable[[Now], None]) -> None:
        self.due_soon.append(callback)

    def later(self, delay: float, callback: Callable[[Now], None]) -> FakeTimer:
        timer = FakeTimer(self._clock().mono + delay, callback)
        self.timers.append(timer)
        return timer

    def run_due(self) -> None:
        for _ in range(1000):
            now = self._clock()
            ready = [t for t in self.timers if not t.cancelled and t.due <= now.mono]
            if not self.due_soon and not ready:
                return
            for t in ready:
                self.timers.remove(t)
                t.callback(now)
            soon, self.due_soon = self.due_soon, []
            for cb in soon:
                cb(now)
        raise AssertionError("the scheduler never settles")


class FakeTransport:
    """What the broker wrote, and whether it closed or paused the connection."""

    identity: str | None = None
    listener = 0

    def __init__(self, name: str) -> None:
        self.peer = f"fake:{name}"
        self.written = bytearray()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        self.aborted = False
        self.close_reason: str | None = None
        self.lingered: bool | None = None  # how ``close`` was asked to end it
        self.paused = False
        self.buffer_full = False
        self.on_close: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data
        self.bytes_sent += len(data)

    def write_buffer_full(self) -> bool:
        return self.buffer_full

    def close(self, reason: str, linger: bool = True) -> None:
        self.closed = True
        self.lingered = linger
        self.close_reason = reason
        if self.on_close is not None:
            self.on_close()

    def abort(self, reason: str) -> None:
        self.aborted = self.closed = True
        self.close_reason = reason
        if self.on_close is not None:
            self.on_close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@dataclass
class FakeLink:
    """The peer link: what this shard sent to which peer, flushed or not."""

    peers: list[int] = field(default_factory=list)
    pending: list[tuple[int, PeerMessage]] = field(default_factory=list)
    sent_messages: list[tuple[int, PeerMessage]] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    held: bool = False
    backlog: dict[int, int] = field(default_factory=dict)  # batches a test says wait toward a peer

    def send(self, peer: int, message: PeerMessage, size: int = 0) -> None:
        self.pending.append((peer, message))

    def broadcast(self, message: PeerMessage) -> None:
        for peer in self.peers:
            self.send(peer, message)

    def has_pending(self) -> bool:
        return bool(self.pending)

    def flush(self) -> None:
        self.sent += len(self.pending)
        self.sent_messages += self.pending
        self.pending = []

    def congested(self, now: float) -> bool:
        return False

    def waiting(self, peer: int) -> int:
        return self.backlog.get(peer, 0)

    def take(self) -> list[tuple[int, PeerMessage]]:
        out, self.sent_messages = self.sent_messages, []
        return out


class FakeClient:
    def __init__(self, harness: Harness, name: str, version: int) -> None:
        self.harness = harness
        self.version = version
        self.transport = FakeTransport(name)
        self.client: Client = harness.broker.open_client(self.transport, None, harness.now)
        self.transport.on_close = lambda: harness.broker.lost(self.client, harness.now)
        self._reader = codec.PacketReader(version)
        self._read = 0

    def send(self, packet: Packet) -> None:
        self.harness.broker.received(self.client, codec.encode(packet, self.version), self.harness.now)
        self.harness.run()

    def send_raw(self, data: bytes) -> None:
        self.harness.broker.received(self.client, data, self.harness.now)
        self.harness.run()

    def packets(self) -> list[Any]:
        """The packets the broker wrote since the last call."""
        data = bytes(self.transport.written[self._read:])
        self._read = len(self.transport.written)
        return list(self._reader.feed(data))

    def drop(self) -> None:
        """The network connection breaks (no DISCONNECT)."""
        self.transport.closed = True
        self.harness.broker.lost(self.client, self.harness.now)
        self.harness.run()


class Harness:
    def __init__(self, data_dir: Path, config: Config | None = None, peers: list[int] | None = None,
                 shard: int = 0, shards: int = 1, now: Now = START,
                 policy: Policy | tuple[Policy, ...] | None = None) -> None:
        self.data_dir = data_dir
        self.config = config or load_config(None, {"server.data_dir": str(data_dir)})
        self.now = now
        self.shard, self.shards = shard, shards
        self.link = FakeLink(list(peers or []))
        self.scheduler = FakeScheduler(lambda: self.now)
        self.store = ShardStore.open(data_dir, shard, shards, sync=False)
        self.retained = RetainedStore.open(data_dir, sync=False)
        self.broker = Broker(self.config, shard, shards, self.store, self.retained, self.link, self.scheduler, now,
                             policy=policy)
        self.broker.restore(now)
        self.run()

    def run(self) -> None:
        """Let the event loop's iteration finish: scheduled flushes and due timers run."""
        self.scheduler.run_due()

    def advance(self, seconds: float, *, tick: bool = True) -> None:
        self.now = Now(self.now.wall + seconds, self.now.mono + seconds)
        if tick:
            self.broker.tick(self.now)
        self.run()

    def peer_messages(self, messages: list[PeerMessage]) -> None:
        self.broker.peer_messages(messages, self.now)
        self.run()

    def client(self, name: str = "c", version: int = MQTT_3_1_1) -> FakeClient:
        return FakeClient(self, name, version)

    def connect(self, client_id: str, version: int = MQTT_3_1_1, *, clean: bool = True, keepalive: int = 60,
                will: Will | None = None, properties: Properties = NO_PROPERTIES) -> FakeClient:
        c = self.client(client_id, version)
        c.send(Connect(protocol_version=version, client_id=client_id, clean_start=clean, keepalive=keepalive,
                       will=will, properties=properties))
        return c

    def close(self) -> None:
        self.store.close()
        self.retained.close()

    def restart(self) -> Harness:
        """Close the store as a crash would leave it (nothing flushed after the last commit) and
        start a new broker on it."""
        self.close()
        return Harness(self.data_dir, self.config, self.link.peers, self.shard, self.shards, self.now)
