"""Delivering, offline, the durable forwards between workers that a stop left undelivered,
before the stores' layout changes (``storage/layout.py``).

A QoS 1/2 publish for a persistent subscriber on another worker goes through the sender's
outbox (``core/outbox.py``): a row in the sender's store, applied by the receiver, which
advances its mark for that sender in the same commit as the messages it queued. A row above
the receiver's mark is one the receiver has not applied: a kill, or a stop while it was on
its way. On the next start the sender sends it again and the receiver matches it against
*its* sessions. When the layout changes between those two starts, the receiver no longer
holds the sessions the row was meant for, and they would never get it.

So, before the sessions move, each receiver applies what is pending for it with its own
broker core, offline: ``Broker`` on the store (``restore`` as at a start), the pending items
given to it as the peer messages they are, its flushes run until nothing is due, no timers,
no sockets, no bus (what it would send to another worker is in its own outbox, in the same
commit, and goes at the next start). The sender's rows stay: at the next start it sends
them again, the receiver finds them at or under its mark, and acknowledges them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shardbroker.config import Config
from shardbroker.core.broker import Broker
from shardbroker.core.clock import Now
from shardbroker.core.outbox import Outbox
from shardbroker.peer.messages import DurableForward, PeerMessage
from shardbroker.security.auth import load_policies
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore
from shardbroker.storage.records import StoreError

log = logging.getLogger(__name__)

ROUNDS = 1000  # flushes at most per receiver: a core that never settles is a bug, not a wait


class _NoTimer:
    def cancel(self) -> None:
        pass


class _Offline:
    """Scheduler and peer link of a core that runs once, offline: callbacks due "soon" run
    when ``settle`` is called; timers never fire (the real start sets them again); messages
    to other workers are dropped (what must reach them is in the outbox)."""

    def __init__(self, shard: int, shards: int, now: Now) -> None:
        self.now = now
        self.due: list[Callable[[Now], None]] = []
        self.sent = 0
        self.received = 0
        self._peers = [p for p in range(shards) if p != shard]

    # Scheduler
    def soon(self, callback: Callable[[Now], None]) -> None:
        self.due.append(callback)

    def later(self, delay: float, callback: Callable[[Now], None]) -> _NoTimer:
        return _NoTimer()

    # BrokerLink
    @property
    def peers(self) -> list[int]:
        return self._peers

    def send(self, peer: int, message: PeerMessage, size: int = 0) -> None:
        pass

    def broadcast(self, message: PeerMessage) -> None:
        pass

    def has_pending(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def congested(self, now: float) -> bool:
        return False

    def waiting(self, peer: int) -> int:
        return 0

    def settle(self) -> None:
        for _ in range(ROUNDS):
            if not self.due:
                return
            due, self.due = self.due, []
            for callback in due:
                callback(self.now)
        raise RuntimeError("the offline broker core did not settle")


def undelivered(stores: Sequence[ShardStore]) -> dict[int, list[DurableForward]]:
    """receiver shard -> the durable forwards other shards hold for it above its mark, in
    each sender's order (senders in shard order)."""
    marks: dict[int, Outbox] = {}
    for s in stores:
        inbox = Outbox(s.shard)
        inbox.load((), s.meta_items())
        marks[s.shard] = inbox
    out: dict[int, list[DurableForward]] = {}
    for sender in stores:
        box = Outbox(sender.shard)
        box.load(sender.outbox(), ())
        for peer, items in sorted(box.pending.items()):
            receiver = marks.get(peer)
            if receiver is None:
                continue  # a shard this data directory does not have: nothing can apply it
            mark = receiver.mark(sender.shard)
            due = [item for seq, item in items.items() if seq > mark]
            if due:
                out.setdefault(peer, []).extend(due)
    return out


def deliver_pending(config: Config, data_dir: Path, stores: Sequence[ShardStore]) -> list[str]:
    """Have each receiver apply the durable forwards pending for it (``undelivered``); one
    line per receiver that had any, for the log. A failure is a ``StoreError`` naming the
    step: nothing has moved yet, and the next start tries again."""
    try:
        return _deliver(config, data_dir, stores)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{data_dir}: applying the durable forwards between workers that the last"
                         f" stop left undelivered failed ({type(exc).__name__}: {exc}); no session"
                         " has moved") from exc


def _deliver(config: Config, data_dir: Path, stores: Sequence[ShardStore]) -> list[str]:
    pending = undelivered(stores)
    if not pending:
        return []
    policy, _problems = load_policies(config)
    wall = time.time()
    now = Now(wall, time.monotonic())
    lines: list[str] = []
    by_shard = {s.shard: s for s in stores}
    with RetainedStore.open(Path(data_dir), sync=config.storage.durability == "fsync",
                            map_size=config.storage.map_size,
                            max_map_size=config.storage.max_map_size) as retained:
        for shard, items in sorted(pending.items()):
            store = by_shard[shard]
            offline = _Offline(shard, len(stores), now)
            broker = Broker(config, shard, len(stores), store, retained, offline, offline, now,
                            policy=policy)
            broker.restore(now)
            offline.settle()
            broker.peer_messages(items, now)
            offline.settle()
            origins = sorted({item.origin_shard for item in items})
            lines.append(f"shard {shard}: applied {len(items)} durable forwards from shards"
                         f" {', '.join(map(str, origins))} left undelivered at the last stop,"
                         " before the stores' layout changes")
    return lines
