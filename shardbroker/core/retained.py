"""Retained messages across the nodes of a cluster: stamped writes, last writer wins, catch-up.

Each node keeps its retained messages in its own store, shared by its workers. To make every
node hold the same set, each write is stamped ``(stamp, node)``: a hybrid logical clock value
(``hlc.HybridClock``, one per worker) and the writing node's ID. A store keeps, per topic,
the write with the greatest pair (``storage/stamps.py``; a delete stays as a tombstone).

* A retained PUBLISH (or will, or ``$SYS`` value) of this node: ``local`` stamps it and queues
  it in ``Commit``; the store writes it (raising the stamp above the one it holds if need be,
  so that a local write is never refused), and once committed ``written`` sends it as a
  ``Retain`` to worker 0 of every other node: one store per node, so one worker is enough.
* A ``Retain`` from another node (``remote``): the clock observes its stamp, and the store
  writes it only if its pair is greater than the one held.
* Catch-up: when worker 0 of another node becomes reachable (``peer_added``: a node joined,
  restarted, or came back after a partition) and this is worker 0, every entry this node holds,
  tombstones included, goes to it as ``Retain`` messages, ``PAGE`` entries a turn, and only
  while the bus to it has fewer than ``WAITING_MAX`` batches waiting, so that a large set
  neither blocks the loop nor overflows the bounded backlog toward another node.

The publish itself is routed as any other (``Peers.route``): this is only the store. Topics
that start with ``$`` (``$SYS``, which each node publishes about itself) stay each node's own
(``stamps.shared``): never sent, and refused from another node.

What it does not guarantee: a ``Retain`` lost on the way (a node unreachable for longer than
its bus backlog lasts, a commit that failed on the receiver) is made good only by the next
catch-up, at the next ``peer_added``. Two nodes whose clocks differ by more than the time
between two writes of one topic keep the write of the node whose clock is ahead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from shardbroker.core.clock import EventTime, Now, Scheduler, Timer
from shardbroker.core.commit import Commit
from shardbroker.core.hlc import HybridClock
from shardbroker.core.session import Message
from shardbroker.core.store import RetainedStore, StoreError
from shardbroker.peer.messages import REMOTE_BASE, PeerMessage, Retain
from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.records import StoredMessage
from shardbroker.storage.stamps import RetainedOp, shared

log = logging.getLogger("shardbroker.retained")

PAGE = 256  # entries sent per turn of the loop to a node catching up
WAITING_MAX = 2  # batches waiting on the bus toward that node before the next page waits too
RECHECK = 0.02  # seconds before a catch-up held by the bus looks again


class RetainLink(Protocol):
    """The part of the peer link this needs (``shardbroker.peer.bus.Bus``)."""

    @property
    def peers(self) -> list[int]: ...
    def send(self, peer: int, message: PeerMessage, size: int = 0) -> None: ...
    def waiting(self, peer: int) -> int: ...


def is_remote_first(peer: int) -> bool:
    """Whether ``peer`` is worker 0 of another node (remote ids are number * 256 + worker)."""
    return peer >= REMOTE_BASE and peer % REMOTE_BASE == 0


def to_message(op: RetainedOp) -> Retain:
    m = op.msg
    if m is None:
        return Retain(op.topic, b"", 0, NO_PROPERTIES, None, op.stamp, op.node)
    return Retain(op.topic, m.payload, m.qos, m.properties, m.expires_at, op.stamp, op.node)


def from_message(m: Retain) -> RetainedOp:
    msg = (StoredMessage(m.topic, m.payload, m.qos, True, m.properties, m.expires_at)
           if m.payload else None)
    return RetainedOp(m.topic, msg, m.stamp, m.node, True)


class RetainedSync:
    def __init__(self, shard: int, node: str, link: RetainLink, commit: Commit, store: RetainedStore,
                 scheduler: Scheduler, time: EventTime, wake: Callable[[], None]) -> None:
        self.shard = shard
        self.node = node
        self.link = link
        self.commit = commit
        self.store = store
        self.scheduler = scheduler
        self.time = time
        self._wake = wake
        self.clock = HybridClock()
        self.catching_up: dict[int, bytes] = {}  # peer -> key after which its next page starts
        self._timer: Timer | None = None
        self._page_due = False
        self.stats = {"retain_sent": 0, "retain_received": 0, "retain_applied": 0, "catchup_sent": 0}

    # ---- writes

    def local(self, msg: Message) -> None:
        """A retained publish of this node: stamp it and store it at the next commit
        ([MQTT-3.3.1-6/7]: an empty payload deletes)."""
        stored = (StoredMessage(msg.topic, msg.payload, msg.qos, True, msg.properties, msg.expires_at)
                  if msg.payload else None)
        self.commit.retain(RetainedOp(msg.topic, stored, self.clock.stamp(self.time.wall), self.node))
        self._wake()

    def remote(self, m: Retain) -> None:
        """Another node's write: store it if it is newer than what this node holds."""
        self.stats["retain_received"] += 1
        if not shared(m.topic):
            log.warning("retained: a Retain of %r from node %r refused: $ topics are each node's own",
                        m.topic, m.node)
            return
        self.clock.observe(m.stamp)
        self.commit.retain(from_message(m))
        self._wake()

    def written(self, ops: list[RetainedOp]) -> None:
        """The ops the store committed, with their stamps: tell the other nodes of local ones."""
        targets = [p for p in self.link.peers if is_remote_first(p)]
        for op in ops:
            self.clock.observe(op.stamp)
            if op.remote:
                self.stats["retain_applied"] += 1
                continue
            if targets and shared(op.topic):
                m = to_message(op)
                size = len(m.payload) + len(m.topic)
                for peer in targets:
                    self.link.send(peer, m, size)
                self.stats["retain_sent"] += len(targets)

    # ---- catch-up

    def peer_added(self, peer: int) -> None:
        """Another node's worker became reachable: if it is its worker 0 and this is worker 0,
        send it every entry this node holds, a page per turn from now on."""
        if self.shard != 0 or not is_remote_first(peer):
            return
        log.info("retained: sending node peer %d every retained message and tombstone", peer)
        self.catching_up[peer] = b""
        self._next_page(0.0)

    def peer_removed(self, peer: int) -> None:
        self.catching_up.pop(peer, None)

    def _next_page(self, delay: float) -> None:
        if delay > 0:
            if self._timer is None and not self._page_due:
                self._timer = self.scheduler.later(delay, self._page)
        elif not self._page_due:
            self._page_due = True
            self.scheduler.soon(self._page)

    def _page(self, now: Now) -> None:
        self._page_due = False
        if self._timer is not None:  # this turn does what it was waiting for
            self._timer.cancel()
            self._timer = None
        if not self.catching_up:
            return
        self.time.set(now)
        ready = False  # some peer may take its next page at once
        for peer, after in list(self.catching_up.items()):
            if peer not in self.link.peers:
                del self.catching_up[peer]
                continue
            if self.link.waiting(peer) >= WAITING_MAX:
                continue
            try:
                ops, following = self.store.entries(after, PAGE)
            except StoreError as exc:
                log.error("retained: catch-up of peer %d stopped: %s", peer, exc)
                del self.catching_up[peer]
                continue
            for op in ops:
                m = to_message(op)
                self.link.send(peer, m, len(m.payload) + len(m.topic))
            self.stats["catchup_sent"] += len(ops)
            if following is None:
                del self.catching_up[peer]
                log.info("retained: catch-up of peer %d done", peer)
            else:
                self.catching_up[peer] = following
                ready = True
        self._wake()
        if self.catching_up:
            self._next_page(0.0 if ready else RECHECK)
