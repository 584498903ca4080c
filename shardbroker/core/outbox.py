"""Durable hand-over of QoS 1/2 publishes between shards: the outbox and the inbox marks.

A QoS 1/2 publish that must reach subscribers on another shard is numbered per
peer (1, 2, 3, ... without gaps), written to the origin shard's outbox in the
same batch as everything else the publish promises, and only then acknowledged
to the publisher. The receiving shard applies item ``n`` only when it has
applied ``n - 1`` (its mark for that origin), commits the mark together with the
deliveries, and then acknowledges ``n`` (cumulatively). The origin deletes what
is acknowledged. What is not acknowledged is sent again when the peer announces
itself (restart), when the peer reports a gap, or after ``RESEND_AFTER`` seconds.
Duplicates (at or below the mark) are acknowledged and dropped, so a crash of
either side at any moment loses nothing and delivers nothing twice.

Items are ``DurableForward`` peer messages (``shardbroker.peer.messages``). The
items numbered for a peer in one event-loop iteration are written as ONE outbox
row (``persist``, just before the commit), keyed by the first one's number and
holding them all as a peer batch (``encode_batch``); the row is deleted once the
peer has acknowledged its last item. Rows written before that (store schema 4 and
older) hold one item each, in the peer encoding, or, older still, as a CBOR list;
both are still read.

No I/O here: the shard passes in its store batch and sends what this returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import cbor2

from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    PeerFormatError,
    decode_batch,
    decode_message,
    encode_batch,
)
from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.records import StoreCorrupt, decode_properties

RESEND_AFTER = 5.0

APPLY, DUPLICATE, GAP = 0, 1, 2


class _Batch(Protocol):
    def put_outbox(self, peer: int, seq: int, item: bytes) -> None: ...
    def delete_outbox(self, peer: int, seq: int) -> None: ...
    def set_meta(self, key: str, value: object) -> None: ...


class Outbox:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self._next: dict[int, int] = {}  # peer -> next sequence number
        self.pending: dict[int, dict[int, DurableForward]] = {}  # peer -> seq -> item, in order
        self._inbox: dict[int, int] = {}  # origin -> highest applied sequence number
        self._dirty_next: set[int] = set()
        self._dirty_inbox: set[int] = set()
        self.acks_due: dict[int, int] = {}  # origin -> mark to acknowledge after the commit
        self.last_sent: dict[int, float] = {}
        self._unsaved: dict[int, list[DurableForward]] = {}  # peer -> items not yet in a row
        self._rows: dict[int, deque[tuple[int, int]]] = {}  # peer -> (first, last) of each row

    def load(self, outbox: Iterable[tuple[int, int, bytes]], meta: Iterable[tuple[str, object]]) -> None:
        """Restore from the store: unacknowledged items and the counters."""
        for key, value in meta:
            if key.startswith("handover.next.") and isinstance(value, int):
                self._next[int(key.rsplit(".", 1)[1])] = value
            elif key.startswith("handover.inbox.") and isinstance(value, int):
                self._inbox[int(key.rsplit(".", 1)[1])] = value
        for peer, seq, data in outbox:
            items = _decode_row(data, seq)
            pending = self.pending.setdefault(peer, {})
            for item in items:
                pending[item.seq] = item
            last = items[-1].seq
            self._rows.setdefault(peer, deque()).append((seq, last))
            self._next[peer] = max(self._next.get(peer, 1), last + 1)

    def send(self, peer: int, forward: Forward, batch: _Batch, now: float, mid: int = 0,
             target: tuple[str, tuple[int, ...], int] | None = None) -> DurableForward:
        """Number a publish for ``peer`` and keep it in the outbox; returns the peer message
        (``mid`` and ``target`` as ``DurableForward`` says).

        It is written to ``batch`` by ``persist``, which the broker calls before every commit
        (with the counters), so the row is in the same commit as the rest of the publish."""
        seq = self._next.get(peer, 1)
        self._next[peer] = seq + 1
        self._dirty_next.add(peer)
        item = DurableForward(self.shard, seq, forward, mid, target)
        self.pending.setdefault(peer, {})[seq] = item
        unsaved = self._unsaved.get(peer)
        if unsaved is None:
            self._unsaved[peer] = [item]
        else:
            unsaved.append(item)
        self.last_sent.setdefault(peer, now)
        return item

    def acknowledged(self, peer: int, upto: int, batch: _Batch, now: float) -> None:
        pending = self.pending.get(peer)
        if pending:
            done = []
            for seq in pending:  # in numbering order (``send`` and ``load`` add them so)
                if seq > upto:
                    break
                done.append(seq)
            for seq in done:
                del pending[seq]
        rows = self._rows.get(peer)
        while rows and rows[0][1] <= upto:
            batch.delete_outbox(peer, rows.popleft()[0])
        self.last_sent[peer] = now

    def resend(self, peer: int, now: float) -> list[DurableForward]:
        """Everything not yet acknowledged by ``peer``, oldest first."""
        self.last_sent[peer] = now
        return list(self.pending.get(peer, {}).values())

    def overdue(self, now: float) -> list[int]:
        return [p for p, items in self.pending.items()
                if items and now - self.last_sent.get(p, now) > RESEND_AFTER]

    def accept(self, origin: int, seq: int) -> int:
        """APPLY (and advance the mark), DUPLICATE, or GAP for an incoming item."""
        mark = self._inbox.get(origin, 0)
        if seq <= mark:
            self.acks_due[origin] = mark
            return DUPLICATE
        if seq != mark + 1:
            return GAP
        self._inbox[origin] = seq
        self._dirty_inbox.add(origin)
        self.acks_due[origin] = seq
        return APPLY

    def mark(self, origin: int) -> int:
        return self._inbox.get(origin, 0)

    def last(self, peer: int) -> int:
        """The number of the last item sent to ``peer`` (0: none yet)."""
        return self._next.get(peer, 1) - 1

    def persist(self, batch: _Batch) -> None:
        """Write the items numbered since the last call, one row per peer, and the counters
        that changed (called just before the commit)."""
        for peer, items in self._unsaved.items():
            first = items[0].seq
            batch.put_outbox(peer, first, encode_batch(items))
            self._rows.setdefault(peer, deque()).append((first, items[-1].seq))
        self._unsaved.clear()
        for peer in self._dirty_next:
            batch.set_meta(f"handover.next.{peer}", self._next[peer])
        for origin in self._dirty_inbox:
            batch.set_meta(f"handover.inbox.{origin}", self._inbox[origin])
        self._dirty_next.clear()
        self._dirty_inbox.clear()

    def has_dirty(self) -> bool:
        return bool(self._unsaved or self._dirty_next or self._dirty_inbox)

    def pending_count(self) -> int:
        return sum(len(items) for items in self.pending.values())


def _decode_row(data: bytes, first: int) -> list[DurableForward]:
    """The items of an outbox row: a peer batch of consecutive items from ``first``, or one item
    (written before rows held several)."""
    try:
        items = decode_batch(data)
    except PeerFormatError:
        return [_decode_record(data)]
    if not items or not all(isinstance(item, DurableForward) for item in items):
        raise StoreCorrupt("corrupt outbox row: not a batch of durable forwards")
    durable = [item for item in items if isinstance(item, DurableForward)]
    if [item.seq for item in durable] != list(range(first, first + len(durable))):
        raise StoreCorrupt(f"corrupt outbox row: items are not numbered from {first} on")
    return durable


def _decode_record(data: bytes) -> DurableForward:
    """An outbox record: the peer encoding, or the CBOR list written before it."""
    try:
        message = decode_message(data)
    except PeerFormatError as exc:
        try:
            return _decode_cbor_record(data)
        except (ValueError, TypeError, IndexError, StoreCorrupt, cbor2.CBORDecodeError):
            raise StoreCorrupt(f"corrupt outbox record: {exc}") from None
    if not isinstance(message, DurableForward):
        raise StoreCorrupt(f"corrupt outbox record: a {type(message).__name__}, not a durable forward")
    return message


def _decode_cbor_record(data: bytes) -> DurableForward:
    """``["P", origin, seq, [topic, payload, qos, retain, properties, expires_at, origin], plain,
    groups, hops]`` with properties as ``storage.records`` maps them (or None)."""
    item: Any = cbor2.loads(data)
    if not isinstance(item, list) or len(item) != 7 or item[0] != "P":
        raise ValueError("not an outbox item")
    topic, payload, qos, retain, props, expires_at, origin = item[3]
    forward = Forward(str(topic), bytes(payload), int(qos), bool(retain),
                      decode_properties(props, "outbox message") if props else NO_PROPERTIES,
                      expires_at, origin, bool(item[4]), tuple((str(g), str(f)) for g, f in item[5]), int(item[6]))
    return DurableForward(int(item[1]), int(item[2]), forward)
