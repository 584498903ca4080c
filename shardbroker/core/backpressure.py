"""Back-pressure from a backlog to the publishers that feed it, on any shard.

A *backlog* is an online subscriber that cannot take messages as fast as they come:

* ``QUEUE``: its QoS 1/2 queue, waiting for room in its in-flight window, has reached
  ``QUEUE_HIGH_WATER`` messages;
* ``WRITE``: its connection's write buffer is above the transport's high-water mark.

While a backlog lasts, every publisher whose message lands in it is *held*, and only those:

* its PUBACKs and PUBRECs are withheld (in order, after the commit as always), so a client
  that pipelines against acknowledgements stops at its own window, while it goes on reading
  and acknowledging what it is sent itself (pausing its socket would stop its own PUBACKs
  too, and two clients that publish to each other would wait for each other for ever);
* its socket stops being read only when it sends QoS 0 (which has no acknowledgement to
  withhold) or has ``WITHHELD_MAX`` acknowledgements withheld (it ignores its window), and
  never while it is itself backed up or has QoS 1/2 messages in flight toward it (which it
  must read to acknowledge).

A publisher of another shard is held through that shard: ``Hold`` over the bus, renewed
every sweep, and ``Release`` when the last backlog it fed is over. A hold that is not
renewed for ``HOLD_LEASE`` seconds ends by itself (a shard that restarted, a lost
``Release``). A message that no client published (a will, ``$SYS``) holds no one.

A backlog ends when its queue is down to ``QUEUE_LOW_WATER`` and its write buffer has
drained, when its subscriber goes offline, or when the subscriber is *slow*:

* by bytes: it reads less than ``flow.SLOW_CONSUMER_RATE`` while backed up (``flow.py``);
* by acknowledgements, while its queue is a backlog and its window is full:
  - it acknowledges fewer than ``limits.slow_ack_rate`` messages/s, judged over each
    ``SLOW_ACK_GRACE`` seconds (as the byte rate is judged over ``flow.SLOW_CONSUMER_GRACE``):
    a subscriber that takes a message now and then still holds every publisher it matches,
    a subscriber of ``#`` all of them, for as long as it is connected;
  - or it has acknowledged nothing for its ack timeout (``limits.ack_timeout``; by default
    its keep-alive, at most ``MAX_ACK_WAIT``), which decides alone with ``slow_ack_rate`` 0.

A slow subscriber holds no one, and only then (or while it is offline) do the session
queue limits and ``queue_full_policy`` apply to it. So a QoS 1/2 message the broker
acknowledged for an online subscriber that keeps acknowledging at that rate is never
dropped by a queue limit: its publishers wait instead. It is slow no longer once it has
caught up, its queue down to ``QUEUE_LOW_WATER`` (``Delivery.pump``), as a slow consumer by
bytes counts again once its write buffer has drained.

``Backlogs`` and ``Holds`` are the decisions, pure and loop-free; ``Backpressure`` applies
them to clients, sessions and the peer link. Time comes in as an argument or through
``EventTime``; nothing here reads a clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from shardbroker.config import LimitsConfig
from shardbroker.core.client import PAUSED_BY_HOLD, Client
from shardbroker.core.clock import EventTime
from shardbroker.core.output import Output
from shardbroker.peer.messages import Hold, Release
from shardbroker.sharding import shard_for

if TYPE_CHECKING:
    from shardbroker.core.peers import PeerLink
    from shardbroker.core.session import Session
    from shardbroker.core.sessions import Sessions

log = logging.getLogger("shardbroker.backpressure")

QUEUE = 1  # backlog kinds (a bit mask on ``Session.backlog``)
WRITE = 2
QUEUE_HIGH_WATER = 512  # queued QoS 1/2 messages of an online subscriber that start a backlog
QUEUE_LOW_WATER = 128  # ... and at which it ends
WITHHELD_MAX = 1000  # acknowledgements withheld from one client before its socket is paused too
HOLD_LEASE = 2.0  # seconds a hold from another shard lasts unless renewed
MAX_ACK_WAIT = 60.0  # the default ack timeout: the client's keep-alive, at most this
SLOW_ACK_GRACE = 2.0  # seconds over which a backlogged subscriber's acknowledgements are counted


K = TypeVar("K", bound=Hashable)


class Backlogs(Generic[K]):
    """Which subscribers are backlogged, since when, and which publishers each one holds.

    Keys are whatever identifies a subscriber (the broker uses its ``Session``); publishers
    are client ids. ``feed`` and ``end`` return the publishers whose hold starts or ends,
    counted over all backlogs: a publisher that feeds two is held until both are over.
    """

    def __init__(self) -> None:
        self.kinds: dict[K, int] = {}  # backlog -> its kinds (QUEUE | WRITE)
        self.since: dict[K, float] = {}  # backlog -> when its QUEUE kind started
        self._feeders: dict[K, set[str]] = {}  # backlog -> publishers it holds
        self._holding: dict[str, int] = {}  # publisher -> backlogs holding it

    def __contains__(self, key: object) -> bool:
        return key in self.kinds

    def start(self, key: K, kind: int, now: float) -> None:
        kinds = self.kinds.get(key, 0)
        if kind == QUEUE and not kinds & QUEUE:
            self.since[key] = now
        self.kinds[key] = kinds | kind

    def stop(self, key: K, kind: int) -> list[str]:
        """``key`` is no longer backlogged in ``kind``: the publishers released if it is over."""
        kinds = self.kinds.get(key)
        if kinds is None:
            return []
        if kind & QUEUE:
            self.since.pop(key, None)
        kinds &= ~kind
        if kinds:
            self.kinds[key] = kinds
            return []
        return self.end(key)

    def end(self, key: K) -> list[str]:
        """``key`` is not backlogged any more (drained, slow, gone): the publishers released."""
        self.kinds.pop(key, None)
        self.since.pop(key, None)
        released: list[str] = []
        holding = self._holding
        for publisher in self._feeders.pop(key, ()):
            n = holding[publisher] - 1
            if n:
                holding[publisher] = n
            else:
                del holding[publisher]
                released.append(publisher)
        return released

    def feed(self, key: K, publisher: str) -> bool:
        """A message of ``publisher`` landed in backlog ``key``: True if its hold starts now."""
        feeders = self._feeders.get(key)
        if feeders is None:
            if key not in self.kinds:
                return False
            feeders = self._feeders[key] = set()
        if publisher in feeders:
            return False
        feeders.add(publisher)
        n = self._holding.get(publisher, 0)
        self._holding[publisher] = n + 1
        return n == 0

    def holds(self, publisher: str) -> bool:
        return publisher in self._holding

    def held(self) -> list[str]:
        """Every publisher some backlog holds."""
        return list(self._holding)


class Holds:
    """This shard's publishers that are held, and by which shards (this one included).

    A hold from a shard lasts until that shard releases it or its lease runs out
    (``until``, monotonic seconds; this shard's own holds use ``math.inf``).
    """

    def __init__(self) -> None:
        self._by: dict[str, dict[int, float]] = {}  # publisher -> {holding shard: lease end}

    def __contains__(self, publisher: str) -> bool:
        return publisher in self._by

    def __len__(self) -> int:
        return len(self._by)

    def add(self, publisher: str, shard: int, until: float) -> bool:
        """True when ``publisher`` was not held before."""
        by = self._by.get(publisher)
        if by is None:
            self._by[publisher] = {shard: until}
            return True
        by[shard] = until
        return False

    def remove(self, publisher: str, shard: int) -> bool:
        """True when ``publisher`` is no longer held by anyone."""
        by = self._by.get(publisher)
        if by is None or by.pop(shard, None) is None or by:
            return False
        del self._by[publisher]
        return True

    def expire(self, now: float) -> list[str]:
        """Drop the holds whose lease ran out: the publishers no longer held."""
        freed: list[str] = []
        for publisher, by in list(self._by.items()):
            for shard, until in list(by.items()):
                if until <= now:
                    del by[shard]
            if not by:
                del self._by[publisher]
                freed.append(publisher)
        return freed

    def drop_shard(self, shard: int) -> list[str]:
        """``shard`` restarted: its holds are gone; the publishers no longer held."""
        freed: list[str] = []
        for publisher, by in list(self._by.items()):
            if by.pop(shard, None) is not None and not by:
                del self._by[publisher]
                freed.append(publisher)
        return freed


def ack_timeout(limits: LimitsConfig, keepalive: int) -> float:
    """Seconds a subscriber with a full window may go without acknowledging before it is slow."""
    if limits.ack_timeout > 0:
        return limits.ack_timeout
    return min(float(keepalive), MAX_ACK_WAIT) if keepalive else MAX_ACK_WAIT


class Backpressure:
    """The broker's part that holds and releases publishers for the backlogs of its shard."""

    def __init__(self, shard: int, shards: int, limits: LimitsConfig, sessions: Sessions, output: Output,
                 link: PeerLink, time: EventTime, stats: dict[str, int], wake: Callable[[], None]) -> None:
        self.shard = shard
        self.shards = shards
        self.limits = limits
        self.sessions = sessions
        self.output = output
        self.link = link
        self.time = time
        self.stats = stats
        self._wake = wake
        # the shard of a publisher's client ID (a cluster node's workers own clients by the map)
        self.owner: Callable[[str], int] = lambda publisher: shard_for(publisher, self.shards)
        self.backlogs: Backlogs[Session] = Backlogs()
        self.holds = Holds()  # publishers of this shard held, by which shards
        self.paused: set[Client] = set()  # held clients whose socket is paused as well
        # A QUEUE backlog's acknowledgements: when the period they are counted over began, and
        # how many came since (only backlogged subscribers are counted).
        self._period: dict[Session, float] = {}
        self._acks: dict[Session, int] = {}

    # ---- the subscriber side

    def start(self, sess: Session, kind: int) -> None:
        if not sess.backlog:
            self.stats["backlogs"] += 1
        if kind & QUEUE and not sess.backlog & QUEUE:
            self._period[sess] = self.time.mono
            self._acks[sess] = 0
        sess.backlog |= kind
        self.backlogs.start(sess, kind, self.time.mono)

    def stop(self, sess: Session, kind: int) -> None:
        if sess.backlog & kind:
            sess.backlog &= ~kind
            if kind & QUEUE:
                self._uncount(sess)
            self._released(self.backlogs.stop(sess, kind))

    def end(self, sess: Session) -> None:
        """``sess`` holds no one any more (offline, slow, ended)."""
        if sess.backlog:
            sess.backlog = 0
            self._uncount(sess)
            self._released(self.backlogs.end(sess))

    def _uncount(self, sess: Session) -> None:
        self._period.pop(sess, None)
        self._acks.pop(sess, None)

    def acked(self, sess: Session) -> None:
        """``sess``'s subscriber acknowledged a message (counted while its queue is a backlog)."""
        acks = self._acks
        if sess in acks:
            acks[sess] += 1

    def fed(self, sess: Session, publisher: str | None) -> None:
        """A message of ``publisher`` landed in ``sess``'s backlog."""
        if publisher is None or not self.backlogs.feed(sess, publisher):
            return
        self.stats["holds"] += 1
        self._tell(publisher, True)

    def _released(self, publishers: list[str]) -> None:
        for publisher in publishers:
            self._tell(publisher, False)

    def _tell(self, publisher: str, hold: bool, *, renewal: bool = False) -> None:
        """Hold or release ``publisher`` here, or through a peer message to the shard that owns it."""
        owner = self.owner(publisher)
        if owner == self.shard:
            if renewal:
                return  # this shard's own holds need no lease
            if hold:
                self.hold(publisher, self.shard, math.inf)
            else:
                self.release(publisher, self.shard)
        else:
            self.link.send(owner, Hold(self.shard, publisher) if hold else Release(self.shard, publisher))
            self._wake()

    def check_slow(self) -> None:
        """The sweep: a backlogged subscriber that acknowledges too little is slow (see above)."""
        now = self.time.mono
        rate = self.limits.slow_ack_rate
        for sess, since in list(self.backlogs.since.items()):
            client = sess.client
            if client is None:
                self.end(sess)
                continue
            if len(sess.inflight) < client.send_window:
                # it has room: its queue only waits for the next pump; judged from when it is full
                self._period[sess], self._acks[sess] = now, 0
                continue
            waited = now - max(since, client.last_ack)
            if waited >= ack_timeout(self.limits, client.keepalive):
                self._slow(sess, f"nothing acknowledged for {waited:.1f} s")
                continue
            began = self._period.get(sess, since)
            if not rate or now - began < SLOW_ACK_GRACE:
                continue
            got = self._acks.get(sess, 0) / (now - began)
            if got < rate:
                self._slow(sess, f"{got:.1f} acknowledgements/s over {now - began:.1f} s, under"
                                 f" limits.slow_ack_rate ({rate:g}/s)")
            else:
                self._period[sess], self._acks[sess] = now, 0  # it keeps up: judged again over the next period

    def _slow(self, sess: Session, why: str) -> None:
        sess.slow = True
        self.stats["slow_subscribers"] += 1
        log.warning("subscriber %s is slow: %d messages in flight, %s; its publishers are no longer held and "
                    "its queue (%d messages) is limited to %d messages (%s) until it has caught up (down to %d queued)",
                    sess.client_id, len(sess.inflight), why, sess.queued(), self.limits.max_queued_messages,
                    self.limits.queue_full_policy, QUEUE_LOW_WATER)
        self.end(sess)

    def renew(self) -> None:
        """The sweep: renew the holds on other shards' publishers, drop the expired ones here."""
        for publisher in self.backlogs.held():
            self._tell(publisher, True, renewal=True)
        for publisher in self.holds.expire(self.time.mono):
            self._unhold(publisher)

    # ---- the publisher side

    def hold(self, publisher: str, by: int, until: float) -> None:
        if self.holds.add(publisher, by, until):
            client = self._client(publisher)
            if client is not None and client.withheld is None:
                client.withheld = []

    def on_hold(self, m: Hold) -> None:
        self.hold(m.publisher, m.shard, self.time.mono + HOLD_LEASE)

    def release(self, publisher: str, by: int) -> None:
        if self.holds.remove(publisher, by):
            self._unhold(publisher)

    def on_release(self, m: Release) -> None:
        self.release(m.publisher, m.shard)

    def peer_restarted(self, shard: int) -> None:
        for publisher in self.holds.drop_shard(shard):
            self._unhold(publisher)

    def attached(self, client: Client) -> None:
        """A client connected under an id that is held: it starts held."""
        if client.client_id in self.holds and client.withheld is None:
            client.withheld = []

    def _client(self, publisher: str) -> Client | None:
        sess = self.sessions.get(publisher)
        return sess.client if sess is not None else None

    def _unhold(self, publisher: str) -> None:
        client = self._client(publisher)
        if client is None:
            return
        withheld, client.withheld = client.withheld, None
        if client in self.paused:
            self.paused.discard(client)
            client.resume_reading(PAUSED_BY_HOLD)
        if withheld and not client.closing:
            for data in withheld:
                self.output.send(client, data)

    def withhold(self, client: Client, data: bytes) -> None:
        """``data`` (an acknowledgement) waits while ``client`` is held."""
        withheld = client.withheld
        assert withheld is not None
        withheld.append(data)
        self.output.mark(client)  # so that a failed commit closes it like any client with output due
        if len(withheld) > WITHHELD_MAX:
            self.pause(client)

    def pause(self, client: Client) -> None:
        """Stop reading a held client (QoS 0 from it, or too many withheld). Never one that is
        backed up itself or has messages in flight toward it: it must go on reading to take
        them, and to acknowledge them (see ``resume_subscribers``)."""
        if client not in self.paused:
            sess = client.session
            if sess is not None and (sess.backlog & WRITE or sess.inflight):
                return
            self.paused.add(client)
            client.pause_reading(PAUSED_BY_HOLD)

    def resume_subscribers(self) -> None:
        """The sweep: a paused client that has since been sent QoS 1/2 is read again (it must
        acknowledge them; two paused clients publishing to each other would wait for ever)."""
        for client in list(self.paused):
            sess = client.session
            if sess is None or sess.inflight or sess.backlog & WRITE:
                self.paused.discard(client)
                client.resume_reading(PAUSED_BY_HOLD)

    def forget(self, client: Client) -> None:
        """``client``'s connection is gone."""
        self.paused.discard(client)
        client.withheld = None
