"""In-memory session state of one client on its shard.

A session outlives its connections when it is persistent (3.1.1 Clean Session 0,
5.0 Session Expiry Interval > 0). Its durable part mirrors what the shard store
holds (``shardbroker.storage.records``); this module holds no I/O and no store handle: the
shard decides what to persist and when.

Invariants:
- ``inflight`` holds at most the send window of QoS 1/2 messages, keyed by the
  broker's outgoing packet IDs, in send order (dicts keep insertion order).
- ``qos2_in`` holds the client's incoming QoS 2 packet IDs awaiting PUBREL; the two
  packet-ID spaces never mix.
- ``queue`` holds messages waiting for a connection or for room in the window,
  oldest first; ``queued_bytes`` is the sum of their payload sizes. Its limits apply
  while the session is offline or ``slow``; otherwise its publishers are held back
  (``backpressure.py``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.storage.records import AWAIT_PUBACK, AWAIT_PUBCOMP, AWAIT_PUBREC

if TYPE_CHECKING:
    from shardbroker.core.client import Client

NEVER = 0xFFFFFFFF

__all__ = [
    "AWAIT_PUBACK",
    "AWAIT_PUBCOMP",
    "AWAIT_PUBREC",
    "NEVER",
    "NO_INFLIGHT",
    "Message",
    "Outgoing",
    "Queued",
    "Session",
    "Subscribed",
    "WillState",
    "subscribed",
]


@dataclass(slots=True, eq=False)
class Message:
    """An application message as routed: what every subscriber copy is made from."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = NO_PROPERTIES  # forwarded ones only: no alias, no subscription ids
    expires_at: float | None = None  # wall clock
    origin: str | None = None  # publishing client id (No Local)
    store_id: int | None = None  # id in this shard's store while stored rows reference it
    refs: int = 0  # stored queue/inflight rows referencing store_id (the store deletes it at 0)
    cache: dict[tuple[int, bool], bytes] | None = None  # encoded QoS 0 copies by (version, retain)
    topic_bytes: bytes | None = None  # UTF-8 topic, encoded on first use
    props_bytes: bytes | None = None  # 5.0 property block of ``properties``, encoded on first use
    src: int = 0  # the shard that numbered it (a peer id as this shard knows it), with ``mid``
    mid: int = 0  # its number there (``Peers.route``; 0: unnumbered, as QoS 0 is)

    # Written out rather than generated: compiled (``shardbroker/_compiled.py``), an explicit
    # __init__ is native code, a dataclass-generated one is interpreted (6 x slower to construct).
    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties = NO_PROPERTIES, expires_at: float | None = None,
                 origin: str | None = None, store_id: int | None = None, refs: int = 0,
                 cache: dict[tuple[int, bool], bytes] | None = None, topic_bytes: bytes | None = None,
                 props_bytes: bytes | None = None, src: int = 0, mid: int = 0) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.origin = origin
        self.store_id = store_id
        self.refs = refs
        self.cache = cache
        self.topic_bytes = topic_bytes
        self.props_bytes = props_bytes
        self.src = src
        self.mid = mid

    def ref(self) -> None:
        self.refs += 1

    def unref(self) -> None:
        """One stored row less; at none the store drops the message, so forget its id."""
        self.refs -= 1
        if self.refs <= 0:
            self.refs = 0
            self.store_id = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        if self.expires_at is None:
            return None
        return max(0, math.ceil(self.expires_at - now))


@dataclass(slots=True)
class Outgoing:
    """A QoS 1/2 message sent to the client and not yet fully acknowledged."""

    message: Message | None  # None once only PUBCOMP is awaited
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    state: int = AWAIT_PUBACK
    group: tuple[str, str] | None = None  # (group, filter) when sent for a shared subscription

    def __init__(self, message: Message | None, qos: int, retain: bool, sub_ids: tuple[int, ...],
                 state: int = AWAIT_PUBACK, group: tuple[str, str] | None = None) -> None:
        self.message = message  # explicit, as ``Message.__init__`` says why
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.state = state
        self.group = group


class _NoInflight(dict[int, Outgoing]):
    """The in-flight map of every session that has nothing in flight: an empty dict is 64
    bytes a session, idle ones being most of them. Read it like any dict; ``Session.track``
    puts a dict of the session's own in its place first, and a write to it raises."""

    __slots__ = ()

    def __setitem__(self, pid: int, out: Outgoing) -> None:
        raise TypeError("NO_INFLIGHT is shared by every session: use Session.track")


NO_INFLIGHT: dict[int, Outgoing] = _NoInflight()


def _no_inflight() -> dict[int, Outgoing]:
    return NO_INFLIGHT


@dataclass(slots=True)
class Queued:
    message: Message
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    seq: int | None = None  # store sequence number when the session is persistent
    group: tuple[str, str] | None = None  # (group, filter) when queued for a shared subscription

    def __init__(self, message: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                 seq: int | None = None, group: tuple[str, str] | None = None) -> None:
        self.message = message  # explicit, as ``Message.__init__`` says why
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.seq = seq
        self.group = group


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The options of one of a session's subscriptions; its filter (as subscribed,
    ``$share/group/`` included) is the key it is held under. Subscriptions with the same
    options and no Subscription Identifier share one instance (``subscribed``), so that
    such a subscription costs no object of its own."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None


_SHARED_OPTIONS: dict[tuple[int, bool, bool, int], Subscribed] = {}  # at most 3 * 2 * 2 * 3


def subscribed(qos: int, no_local: bool = False, retain_as_published: bool = False, retain_handling: int = 0,
               subscription_id: int | None = None) -> Subscribed:
    """The ``Subscribed`` of these options: the shared one without a Subscription Identifier,
    a new one with (identifiers are many)."""
    if subscription_id is not None:
        return Subscribed(qos, no_local, retain_as_published, retain_handling, subscription_id)
    key = (qos, bool(no_local), bool(retain_as_published), retain_handling)
    sub = _SHARED_OPTIONS.get(key)
    if sub is None:
        sub = _SHARED_OPTIONS[key] = Subscribed(*key)
    return sub


@dataclass(slots=True)
class WillState:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    delay: int


@dataclass(slots=True, eq=False)
class Leaving:
    """``Session.moving`` of a session given to ``peer``, another node's worker, and not yet
    known by every shard to be there: its copies are relayed to it (``core/moves.py``)."""

    peer: int


@dataclass(slots=True, eq=False)
class Restored:
    """``Session.moving`` of a session taken from its copy (``core/replicas.py``) while other
    shards may still send the lost node's outbox the publishes they send it here (they keep its
    routes until its shards are taken, ``Peers.peer_removed``): the numbers taken here, per
    source (global id), until ``until`` (monotonic). When the lost node's own session merges
    with this one (``core/moves.py``), its copies of those are dropped, not delivered twice,
    also those that reach the merged session later (from an outbox kept for the lost node),
    until ``forget_at``."""

    until: float
    forget_at: float
    got: dict[int, set[int]] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Arrived:
    """``Session.moving`` of a session that moved in, while its previous worker may still
    relay copies for it (at most until ``until``, monotonic): a publish may then reach it
    twice, straight from the shard that numbered it and relayed; these marks, per source
    (global id), let one copy through. ``seen``: the highest number the previous worker had
    applied when it gave the session up (its state holds those); ``relayed`` and ``direct``:
    the numbers taken each way since (a copy that came the other way is not taken again)."""

    seen: dict[int, int]
    until: float
    relayed: dict[int, set[int]] = field(default_factory=dict)
    direct: dict[int, set[int]] = field(default_factory=dict)
    got: dict[int, set[int]] = field(default_factory=dict)  # as ``Restored.got``, to drop


@dataclass(slots=True, eq=False)
class Session:
    client_id: str
    version: int
    expiry_interval: int  # seconds; NEVER = no expiry; 0 = ends with the connection
    subscriptions: dict[str, Subscribed] | None = None  # made on the first, dropped with the last
    will: WillState | None = None
    client: Client | None = None  # the connected client, None while offline
    inflight: dict[int, Outgoing] = field(default_factory=_no_inflight)  # written through ``track``
    queue: deque[Queued] | None = None  # made on first use, dropped when empty (see ``push``)
    queued_bytes: int = 0
    qos2_in: set[int] | None = None  # made on first use (``add_qos2_in``)
    next_pid: int = 1
    disconnected_at: float | None = None  # wall clock
    will_due: float | None = None  # wall clock at which a delayed will is published
    dropped: int = 0  # messages dropped because the queue was full
    backlog: int = 0  # the kinds of backlog it is in (``backpressure.QUEUE | WRITE``), 0 for none
    slow: bool = False  # online but not acknowledging (``backpressure.py``): its queue limits apply
    moving: Leaving | Arrived | Restored | None = None  # on its way between nodes (``core/moves.py``)

    @property
    def persistent(self) -> bool:
        return self.expiry_interval > 0

    def expires_at(self) -> float | None:
        """Wall-clock time the session ends, when disconnected and not NEVER."""
        if self.client is not None or self.disconnected_at is None or self.expiry_interval >= NEVER:
            return None
        return self.disconnected_at + self.expiry_interval

    def push(self, q: Queued) -> None:
        """Queue ``q`` last. An idle session keeps no empty deque (760 bytes each)."""
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        queue.append(q)

    def track(self, pid: int, out: Outgoing) -> None:
        """``out`` is in flight under ``pid``. A session with nothing in flight shares
        ``NO_INFLIGHT`` (see ``untrack``)."""
        inflight = self.inflight
        if inflight is NO_INFLIGHT:
            inflight = self.inflight = {}
        inflight[pid] = out

    def untrack(self, pid: int) -> None:
        """``pid``'s exchange is over; the last one gives the session's dict back."""
        inflight = self.inflight
        del inflight[pid]
        if not inflight:
            self.inflight = NO_INFLIGHT

    def queued(self) -> int:
        queue = self.queue
        return len(queue) if queue is not None else 0

    def add_qos2_in(self, pid: int) -> None:
        if self.qos2_in is None:
            self.qos2_in = set()
        self.qos2_in.add(pid)

    def has_qos2_in(self, pid: int) -> bool:
        return self.qos2_in is not None and pid in self.qos2_in

    def remove_qos2_in(self, pid: int) -> None:
        if self.qos2_in is not None:
            self.qos2_in.discard(pid)
            if not self.qos2_in:
                self.qos2_in = None

    def alloc_pid(self) -> int:
        """The next free outgoing packet ID (1..65535, skipping ones in flight)."""
        pid = self.next_pid
        for _ in range(65535):
            if pid not in self.inflight:
                break
            pid = pid + 1 if pid < 65535 else 1
        else:  # pragma: no cover - the window is far below 65535
            raise RuntimeError("no free packet identifier")
        self.next_pid = pid + 1 if pid < 65535 else 1
        return pid
