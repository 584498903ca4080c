"""Group commit: one store transaction per event-loop iteration, and what a failed one means.

Handlers add their writes to ``batch()`` and retained-message changes to ``retain`` (stamped,
``core/retained.py``; ``on_retained`` is told what the retained store wrote);
``Broker.flush`` calls ``run`` once per iteration, before any byte or peer message
leaves. A commit that fails (the disk is full, the map cannot grow) sets
``store_full``: the broker then refuses new QoS 1/2 work until the store has room
again (``check_fill``, every sweep and after each commit near the map's limit).

Alive marks: while the shard stores sessions, it writes ``alive_at`` every
``ALIVE_EVERY`` seconds, so that after a crash the downtime counts toward the
expiry of sessions that were connected. A shard without stored sessions writes
nothing (an fsync a second would stall its loop for nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shardbroker.core.clock import EventTime
from shardbroker.core.store import Batch, RetainedStore, ShardStore, StoreError
from shardbroker.storage.stamps import RetainedOp

log = logging.getLogger("shardbroker.commit")

STORE_FULL_AT = 0.9  # fraction of storage.max_map_size at which new QoS 1/2 work is refused
STORE_FULL_RETRY = 5.0  # seconds after a failed commit before new QoS 1/2 work is tried again
ALIVE_EVERY = 1.0  # seconds between "alive at" marks while sessions are stored


class Commit:
    def __init__(self, shard: int, store: ShardStore, retained: RetainedStore, time: EventTime,
                 stats: dict[str, int]) -> None:
        self.shard = shard
        self.store = store
        self.retained = retained
        self.time = time
        self.stats = stats
        self._batch: Batch | None = None
        self._retained_ops: list[RetainedOp] = []
        self.on_retained: Callable[[list[RetainedOp]], None] = lambda ops: None  # set by the broker
        self.store_full = False
        self._failed_at = -1e9  # monotonic time of the last failed commit
        self._alive_written = 0.0

    def batch(self) -> Batch:
        """The batch of this iteration (opened on first use)."""
        if self._batch is None:
            self._batch = self.store.batch()
        return self._batch

    def retain(self, op: RetainedOp) -> None:
        """Set (or, with no message, delete) the retained message of ``op.topic`` at the next
        commit, if the store's last-writer rule lets it (``RetainedStore.write``)."""
        self._retained_ops.append(op)

    def pending(self) -> bool:
        return self._batch is not None or bool(self._retained_ops)

    def run(self) -> bool:
        """Commit what this iteration wrote; False if any of it failed (nothing may be promised)."""
        ok = True
        if self._retained_ops:
            ops, self._retained_ops = self._retained_ops, []
            try:
                written = self.retained.write(ops)
            except StoreError as exc:
                log.error("retained store write failed: %s", exc)
                ok = False
            else:
                self.on_retained(written)
        batch, self._batch = self._batch, None
        if batch is not None and len(batch):
            try:
                n_ops = len(batch)
                batch.commit()
                self.stats["commits"] += 1
                self.stats["commit_ops"] += n_ops
                if self.store.map_at_max():  # close to the limit: look after every commit
                    self.check_fill()
            except StoreError as exc:
                log.error("shard %d: store commit failed: %s", self.shard, exc)
                ok = False
        if not ok:
            self.store_full = True
            self._failed_at = self.time.mono
        return ok

    def check_fill(self) -> None:
        """Refuse new QoS 1/2 work while the store is nearly full: the headroom left is what
        draining queues needs (LMDB writes even to delete). A failed commit also sets it."""
        try:
            fill = self.store.fill()
        except StoreError as exc:
            log.error("shard %d: cannot read store fill: %s", self.shard, exc)
            return
        full = fill >= STORE_FULL_AT or self.time.mono - self._failed_at < STORE_FULL_RETRY
        if full != self.store_full:
            if full:
                log.warning("shard %d: message store %.0f%% full: refusing new QoS 1/2 publishes",
                            self.shard, 100 * fill)
            else:
                log.warning("shard %d: message store %.0f%% full: accepting QoS 1/2 again",
                            self.shard, 100 * fill)
            self.store_full = full

    def mark_alive(self) -> None:
        """Write an alive mark now (startup, and the first stored session)."""
        self.batch().set_meta("alive_at", self.time.wall)
        self._alive_written = self.time.wall

    def sweep(self, sessions_stored: bool) -> None:
        if sessions_stored and self.time.wall - self._alive_written >= ALIVE_EVERY:
            self.mark_alive()
