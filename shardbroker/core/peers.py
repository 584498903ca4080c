"""Routing across shards and the peer protocol: where a publish goes, and what shards tell
each other about it.

It owns this shard's copy of the route table (``routing.RouteTable``), which peers
have told us their routes (``synced``), and the durable outbox (``outbox.Outbox``).
``route(msg)`` is the one way a publish enters the broker's fan-out, whether it came
from a client, a will or ``$SYS``: the retained store first (``retained.RetainedSync``), then this shard's
subscribers (``Subscriptions.deliver_local``) and one ``Forward`` to each other shard
that wants it. A QoS 1/2 publish for a persistent session on another shard goes
through the outbox (a numbered ``DurableForward``, committed before the publisher is
acknowledged); everything else goes straight over the link.

Messages between shards are the typed ones of ``shardbroker.peer.messages``;
``on_messages`` handles what peers send, one handler per message type. What goes
out waits in the link until ``Broker.flush`` has committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol

from shardbroker.core.clock import EventTime
from shardbroker.core.commit import Commit
from shardbroker.core.outbox import APPLY, GAP, Outbox
from shardbroker.core.routing import RouteTable, Target
from shardbroker.core.session import Message
from shardbroker.core.topics import SHARE_PREFIX
from shardbroker.peer.messages import (
    REMOTE_BASE,
    DurableForward,
    Forward,
    ForwardAck,
    Hold,
    LoginFailed,
    PeerMessage,
    Release,
    ReplicasQuery,
    ResendRequest,
    Retain,
    RouteAck,
    RouteAdd,
    RouteDigest,
    RouteRemove,
    Routes,
    RoutesAdd,
    RoutesQuery,
    RoutesRemove,
    SessionReplicas,
    ShardRelayEnd,
    ShardsTaken,
    ShardState,
    ShardStateAck,
    ShardStateEnd,
    ShardStateQuery,
)

DIGEST_EVERY = 10.0  # seconds between two route digests sent to every peer (anti-entropy)
# seconds a gone peer's durable routes are kept at most, waiting for its shards to be taken
# (the default of ``peer_removed``'s ``keep``; a cluster node's workers pass their lease TTL
# plus a slack)
LOST_ROUTES_KEEP = 20.0

if TYPE_CHECKING:
    from shardbroker.core.backpressure import Backpressure
    from shardbroker.core.moves import Moves
    from shardbroker.core.replicas import Replicas
    from shardbroker.core.retained import RetainedSync
    from shardbroker.core.subscriptions import Subscriptions

log = logging.getLogger("shardbroker.peers")


class PeerLink(Protocol):
    """How messages reach the other shards (``shardbroker.peer.bus.Bus``): in order per peer,
    sent at ``flush``."""

    sent: int
    received: int

    @property
    def peers(self) -> list[int]: ...
    def send(self, peer: int, message: PeerMessage, size: int = 0) -> None: ...
    def broadcast(self, message: PeerMessage) -> None: ...
    def has_pending(self) -> bool: ...
    def flush(self) -> None: ...


class Peers:
    def __init__(self, shard: int, shards: int, link: PeerLink, commit: Commit, time: EventTime,
                 stats: dict[str, int], wake: Callable[[], None]) -> None:
        self.shard = shard
        self.shards = shards
        self.link = link
        self.commit = commit
        self.time = time
        self.stats = stats
        self._wake = wake
        self.routes = RouteTable()
        self.outbox = Outbox(shard)
        self.synced: set[int] = set()  # peers whose routes we know
        self.unsynced = shards - 1  # peers whose routes we do not know yet
        self._replay_asked: set[int] = set()  # peers asked for a resend this iteration
        self._requests = count(1)
        # Publishes of QoS 1/2 are numbered per shard (``DurableForward.mid``) from the wall
        # clock in microseconds at the first, so that numbers keep rising across restarts (no
        # shard publishes a million a second for long).
        self.mid = 0
        self.seen: dict[int, int] = {}  # peer -> the highest publish number applied from it
        self.node_number = 0  # this node's cluster number (0: no cluster), for ``global_id``
        self._digest_sent = 0.0  # monotonic: when this shard last told its peers its route digest
        self._repairing: set[int] = set()  # peers asked for their routes because a digest differed
        # workers of nodes whose registration ended, whose durable routes are kept until every
        # virtual shard they served is taken (``peer_removed``): peer -> (shards not taken yet,
        # monotonic deadline); and shards taken from a peer before this worker saw it go
        self.lost: dict[int, tuple[set[int], float]] = {}
        self._taken_early: dict[int, tuple[set[int], float]] = {}
        stats.setdefault("route_repairs", 0)
        for key in ("lost_routes_kept", "lost_routes_taken", "lost_routes_expired", "forwarded_to_lost"):
            stats.setdefault(key, 0)
        self.subscriptions: Subscriptions  # set by the broker (they need each other)
        self.backpressure: Backpressure  # set by the broker
        self.retained_sync: RetainedSync  # set by the broker
        self.moves: Moves  # set by the broker
        self.replicas: Replicas  # set by the broker
        self._handlers: dict[type, Callable[[Any], None]] = {
            Forward: self._on_forward, DurableForward: self._on_durable_forward, ForwardAck: self._on_forward_ack,
            ResendRequest: self._on_resend_request, RouteAdd: self._on_route_add,
            RoutesAdd: self._on_routes_add, RouteRemove: self._on_route_remove, RoutesRemove: self._on_routes_remove, RouteAck: self._on_route_ack, RoutesQuery: self._on_routes_query,
            Routes: self._on_routes, Hold: self._on_hold, Release: self._on_release,
            LoginFailed: self._on_login_failed, Retain: self._on_retain, ShardState: self._on_shard_state,
            ShardStateEnd: self._on_shard_state_end, ShardStateAck: self._on_shard_state_ack,
            ShardStateQuery: self._on_shard_state_query, ShardRelayEnd: self._on_shard_relay_end,
            RouteDigest: self._on_route_digest, SessionReplicas: self._on_session_replicas,
            ShardsTaken: self._on_shards_taken, ReplicasQuery: self._on_replicas_query,
        }
        self.login_failed: Callable[[str], None] = lambda address: None  # set by the broker

    def peer_ids(self) -> list[int]:
        return self.link.peers

    def global_id(self, peer: int) -> int:
        """``peer`` (an id as this shard knows it) as every node knows it: a worker of this
        node is ``node number * 256 + worker`` there, as it is on other nodes."""
        return peer if peer >= REMOTE_BASE else self.node_number * REMOTE_BASE + peer

    def seen_marks(self) -> tuple[tuple[int, int], ...]:
        """(global id, highest publish number applied from it) for every source so far,
        this shard's own publishes included."""
        glob = self.global_id
        marks = {glob(peer): mid for peer, mid in self.seen.items()}
        marks[glob(self.shard)] = self.mid
        return tuple(marks.items())

    # ---- routes

    def announce(self) -> None:
        """Ask every peer for its routes and tell them ours (startup and restart)."""
        self.link.broadcast(RoutesQuery(self.shard))
        self.link.broadcast(Routes(self.shard, self._route_keys()))
        self._wake()

    def peer_added(self, peer: int) -> None:
        """The link reaches a new peer (a worker of another node that registered): ask for its
        routes and tell it ours, as at startup."""
        self.unsynced = len(self.link.peers) - len(self.synced)
        # back before its shards were taken: the routes kept stay until its own replace them
        self.lost.pop(peer, None)
        self._taken_early.pop(peer, None)
        self.link.send(peer, RoutesQuery(self.shard))
        self.link.send(peer, Routes(self.shard, self._route_keys()))
        self.retained_sync.peer_added(peer)
        self._wake()

    def peer_removed(self, peer: int, vshards: Iterable[int] = (), keep: float = LOST_ROUTES_KEEP) -> None:
        """A peer is gone for good (its node's registration ended): its holds on our publishers
        go. What the outbox holds for it stays, and is sent again if it comes back.

        Its routes go too, but not at once when it served virtual shards (``vshards``, by the
        last map that named it) and had persistent sessions: its durable keys stay until every
        one of those shards is taken by another worker, which restores the sessions from its
        copies and announces their routes (``ShardsTaken``), or ``keep`` seconds have passed. Meanwhile a QoS 1/2 publish for them still goes into the outbox for the
        peer (nothing else does), so one acknowledged between the end of its registration
        and the routes of the sessions' new owner is not dropped as matching nobody: it waits
        for the lost node's return, and comes to the new owner with its sessions."""
        pending = set(vshards)
        early = self._taken_early.pop(peer, None)
        if early is not None and self.time.mono < early[1]:
            pending -= early[0]
        kept = {key: True for key, durable in self.routes.keys(peer).items()
                if durable and not key.startswith(SHARE_PREFIX)}
        if pending and kept:
            self.routes.replace(peer, kept)
            self.lost[peer] = (pending, self.time.mono + keep)
            self.stats["lost_routes_kept"] += 1
            log.info("shard %d: peer %d is gone; its %d durable routes are kept until its %d virtual"
                     " shards are taken", self.shard, peer, len(kept), len(pending))
        else:
            self._drop_routes(peer)
        self.synced.discard(peer)
        self.unsynced = len(self.link.peers) - len(self.synced)
        self.backpressure.peer_restarted(peer)
        self.subscriptions.peer_gone(peer)
        self.retained_sync.peer_removed(peer)
        self.moves.forget_peer(peer)

    def _route_keys(self) -> tuple[tuple[str, bool], ...]:
        return tuple(self.subscriptions.route_keys().items())

    def announce_route(self, key: str, durable: bool, *, ack: bool) -> int | None:
        """This shard subscribes to ``key`` (or changed its durable flag): tell every peer.
        With ``ack``, the request id that their ``RouteAck``s will carry (None without peers)."""
        self.routes.add(self.shard, key, durable)
        peers = self.link.peers
        if not peers:
            return None
        request = next(self._requests) if ack else 0
        self.link.broadcast(RouteAdd(self.shard, key, request, durable))
        self._wake()
        return request or None

    def announce_routes(self, keys: list[tuple[str, bool]]) -> int | None:
        """This shard subscribes to each of ``keys``, (key, durable) pairs, each key once (the
        new filters of a SUBSCRIBE): tell every peer in one ``RoutesAdd``. The request id that
        their ``RouteAck``s will carry (None without peers)."""
        routes, shard = self.routes, self.shard
        for key, durable in keys:
            routes.add(shard, key, durable)
        if not self.link.peers:
            return None
        request = next(self._requests)
        self.link.broadcast(RoutesAdd(shard, tuple(keys), request))
        self._wake()
        return request

    def withdraw_routes(self, keys: list[str]) -> None:
        """This shard no longer subscribes to ``keys`` (each once: the last subscriptions of an
        UNSUBSCRIBE or of a session that ended): tell every peer in one ``RoutesRemove`` (a
        ``RouteRemove`` for one key)."""
        if not keys:
            return
        routes, shard = self.routes, self.shard
        for key in keys:
            routes.remove(shard, key)
        self.link.broadcast(RouteRemove(shard, keys[0]) if len(keys) == 1 else RoutesRemove(shard, tuple(keys)))
        self._wake()

    # ---- publishes

    def route(self, msg: Message) -> bool:
        """Send a publish to every shard that wants it (this one included). True if any does."""
        if msg.retain:
            self.retained_sync.local(msg)
        targets = self.routes.targets(msg.topic)
        if self.unsynced > 0 and msg.qos:
            # A peer whose routes we do not know yet (it is starting) may have persistent
            # subscribers: send it QoS 1/2 durably and let it match; it drops what it has no use for.
            targets = dict(targets)
            for peer in self.link.peers:
                if peer not in self.synced:
                    known = targets.get(peer)
                    targets[peer] = Target(True, list(known.groups) if known else [], True)
        if not targets:
            return False
        mid = 0
        if msg.qos:
            mid = self.mid = self.mid + 1 if self.mid else int(self.time.wall * 1_000_000)
            msg.src = self.shard
            msg.mid = mid
        lost = self.lost
        for shard, target in targets.items():
            if shard == self.shard:
                self.subscriptions.deliver_local(msg, target.non_shared, target.groups, 0)
            elif lost and shard in lost:
                if msg.qos:  # kept for a lost node's persistent sessions: into the outbox
                    self.stats["forwarded_to_lost"] += 1
                    self._forward(shard, Forward(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties,
                                                 msg.expires_at, msg.origin, True, (), 0), True, mid)
            else:
                self._forward(shard, Forward(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties,
                                             msg.expires_at, msg.origin, target.non_shared, tuple(target.groups), 0),
                              target.durable, mid)
        return True

    def relay(self, peer: int, client_id: str, msg: Message, qos: int, retain: bool,
              sub_ids: tuple[int, ...], group: tuple[str, str] | None) -> None:
        """A copy of ``msg`` for session ``client_id``, which is on its way to ``peer`` (another
        node's worker, ``core/moves.py``): through the durable outbox, to that session alone
        (``group``: for its shared subscription)."""
        forward = Forward(msg.topic, msg.payload, qos, retain, msg.properties, msg.expires_at,
                          msg.origin, False, () if group is None else (group,), 0)
        item = self.outbox.send(peer, forward, self.commit.batch(), self.time.mono, msg.mid,
                                (client_id, sub_ids, self.global_id(msg.src)))
        self.link.send(peer, item, len(msg.payload) + len(msg.topic))
        self.stats["moves_relayed"] += 1
        self._wake()

    def pass_shared(self, msg: Message, group: str, flt: str, hops: int) -> None:
        """No member of ``group`` here: pass ``msg`` to another shard that has members."""
        others = [s for s in self.routes.shards_for_group(group, flt) if s != self.shard]
        if others:
            self._forward(others[hops % len(others)], Forward(
                msg.topic, msg.payload, msg.qos, msg.retain, msg.properties, msg.expires_at, msg.origin,
                False, ((group, flt),), hops + 1), True)

    def _forward(self, peer: int, forward: Forward, durable: bool, mid: int = 0) -> None:
        """QoS 1/2 for a persistent session there through the durable outbox, the rest straight."""
        size = len(forward.payload) + len(forward.topic)
        if forward.qos and durable:
            self.link.send(peer, self.outbox.send(peer, forward, self.commit.batch(), self.time.mono, mid), size)
        else:
            self.link.send(peer, forward, size)
        self.stats["forwarded"] += 1
        self._wake()

    # ---- what peers send

    def on_messages(self, messages: Iterable[PeerMessage]) -> None:
        handlers = self._handlers
        for m in messages:
            try:
                handlers[type(m)](m)
            except Exception:
                log.exception("shard %d: bad peer message %s", self.shard, type(m).__name__)
        self._wake()

    def _deliver(self, f: Forward) -> None:
        msg = Message(f.topic, f.payload, f.qos, f.retain, f.properties, f.expires_at, f.origin)
        self.subscriptions.deliver_local(msg, f.non_shared, f.groups, f.hops)

    def _on_forward(self, m: Forward) -> None:
        self._deliver(m)

    def _on_durable_forward(self, m: DurableForward) -> None:
        origin = m.origin_shard
        verdict = self.outbox.accept(origin, m.seq)
        if verdict == APPLY:
            f = m.forward
            target = m.target
            if target is not None:  # relayed by a moving session's previous worker
                self.moves.relayed(Message(f.topic, f.payload, f.qos, f.retain, f.properties,
                                           f.expires_at, f.origin, src=target[2], mid=m.mid),
                                   target[0], target[1], f.groups[0] if f.groups else None)
                return
            mid = m.mid
            if mid:
                self.seen[origin] = mid
            self.subscriptions.deliver_local(
                Message(f.topic, f.payload, f.qos, f.retain, f.properties, f.expires_at, f.origin,
                        src=origin, mid=mid), f.non_shared, f.groups, f.hops)
        elif verdict == GAP and origin not in self._replay_asked:
            mark = self.outbox.mark(origin)
            log.info("shard %d: hand-over gap from shard %d (got %d, mark %d): asking for a resend",
                     self.shard, origin, m.seq, mark)
            self._replay_asked.add(origin)
            self.link.send(origin, ResendRequest(self.shard, mark))

    def _on_forward_ack(self, m: ForwardAck) -> None:
        self.outbox.acknowledged(m.shard, m.upto, self.commit.batch(), self.time.mono)

    def _on_resend_request(self, m: ResendRequest) -> None:
        self._resend(m.shard)

    def _resend(self, peer: int) -> None:
        for again in self.outbox.resend(peer, self.time.mono):
            self.link.send(peer, again)

    def _on_route_add(self, m: RouteAdd) -> None:
        self.routes.add(m.shard, m.key, m.durable)
        if m.request:
            self.link.send(m.shard, RouteAck(self.shard, m.request))

    def _on_routes_add(self, m: RoutesAdd) -> None:
        routes, shard = self.routes, m.shard
        for key, durable in m.keys:
            routes.add(shard, key, durable)
        if m.request:
            self.link.send(shard, RouteAck(self.shard, m.request))

    def _on_route_remove(self, m: RouteRemove) -> None:
        self.routes.remove(m.shard, m.key)

    def _on_routes_remove(self, m: RoutesRemove) -> None:
        routes, shard = self.routes, m.shard
        for key in m.keys:
            routes.remove(shard, key)

    def _on_route_ack(self, m: RouteAck) -> None:
        self.subscriptions.route_acknowledged(m.shard, m.request)

    def _on_routes_query(self, m: RoutesQuery) -> None:
        self.link.send(m.shard, Routes(self.shard, self._route_keys()))

    def _on_route_digest(self, m: RouteDigest) -> None:
        """Anti-entropy: a peer's digest of its routes, sent after every change it made
        before; a copy here that gives another one has gone astray (a lost batch, a bug):
        all of them are asked for again."""
        peer = m.shard
        if peer not in self.synced or peer in self._repairing:
            return
        mine = self.routes.digest(peer)
        if mine != m.digest:
            log.warning("shard %d: the routes held for shard %d differ from its own (digest %x,"
                        " its %x): asking for them all", self.shard, peer, mine, m.digest)
            self.stats["route_repairs"] += 1
            self._repairing.add(peer)
            self.link.send(peer, RoutesQuery(self.shard))
            self._wake()

    def _on_routes(self, m: Routes) -> None:
        log.debug("shard %d: routes of shard %d: %d filters", self.shard, m.shard, len(m.keys))
        self.routes.replace(m.shard, dict(m.keys))
        if m.shard in self._repairing:  # asked for after a digest differed: nothing restarted
            self._repairing.discard(m.shard)
            return
        self.synced.add(m.shard)
        self.unsynced = len(self.link.peers) - len(self.synced)
        self._resend(m.shard)  # it (re)started: what it has not acknowledged goes again
        self.moves.peer_synced(m.shard)  # ... and the shards on their way to it
        self.replicas.peer_synced(m.shard)  # ... and the session copies it keeps
        self.backpressure.peer_restarted(m.shard)  # ... and its holds on our publishers are gone

    def _on_hold(self, m: Hold) -> None:
        self.backpressure.on_hold(m)

    def _on_release(self, m: Release) -> None:
        self.backpressure.on_release(m)

    def _on_login_failed(self, m: LoginFailed) -> None:
        self.login_failed(m.address)

    def _on_retain(self, m: Retain) -> None:
        self.retained_sync.remote(m)

    def _on_shard_state(self, m: ShardState) -> None:
        self.moves.on_state(m)

    def _on_shard_state_end(self, m: ShardStateEnd) -> None:
        self.moves.on_end(m)

    def _on_shard_state_ack(self, m: ShardStateAck) -> None:
        self.moves.on_ack(m)

    def _on_shard_state_query(self, m: ShardStateQuery) -> None:
        self.moves.asked(m.vshard, m.shard, m.version)

    def _on_shard_relay_end(self, m: ShardRelayEnd) -> None:
        self.moves.on_relay_end(m)

    def _on_session_replicas(self, m: SessionReplicas) -> None:
        self.replicas.on_replicas(m)

    def _on_replicas_query(self, m: ReplicasQuery) -> None:
        self.replicas.on_query(m)

    def shards_taken(self, previous: int, vshards: list[int]) -> None:
        """This shard took ``vshards`` from ``previous`` (a worker of a node that is gone) and
        has announced their sessions' routes: tell every peer, and drop what this one kept."""
        message = ShardsTaken(self.shard, previous, tuple(vshards))
        self.link.broadcast(message)
        self._on_shards_taken(message)
        self._wake()

    def _on_shards_taken(self, m: ShardsTaken) -> None:
        previous = m.previous
        lost = self.lost.get(previous)
        if lost is None:
            if previous in self.link.peers:  # its end has not reached this worker yet
                early = self._taken_early.get(previous)
                if early is None or self.time.mono >= early[1]:
                    early = self._taken_early[previous] = (set(), self.time.mono + LOST_ROUTES_KEEP)
                early[0].update(m.vshards)
            return
        lost[0].difference_update(m.vshards)
        if not lost[0]:
            self._drop_routes(previous)
            self.stats["lost_routes_taken"] += 1
            log.info("shard %d: every virtual shard of peer %d is taken (the last by peer %d): its"
                     " routes are dropped", self.shard, previous, m.shard)

    def _drop_routes(self, peer: int) -> None:
        """A gone peer's routes go, those kept for its shards included (``peer_removed``)."""
        self.lost.pop(peer, None)
        self.routes.replace(peer, {})

    # ---- the flush and the sweep

    def committed(self, ok: bool) -> None:
        """The iteration's commit is done: acknowledge what it made durable (nothing if it failed,
        so the origins resend), then send everything queued."""
        self.moves.committed(ok)
        acks = self.outbox.acks_due
        if ok:
            for origin, mark in acks.items():
                self.link.send(origin, ForwardAck(self.shard, mark))
        acks.clear()
        self._replay_asked.clear()
        self.link.flush()

    def sweep(self) -> None:
        """Resend durable forwards that a peer has left unacknowledged too long (not to a worker
        of a node that is gone: they wait in the outbox until it is back, and go then)."""
        if self.link.peers and self.time.mono - self._digest_sent >= DIGEST_EVERY:
            self._digest_sent = self.time.mono
            self.link.broadcast(RouteDigest(self.shard, self.routes.digest(self.shard)))
            self._wake()
        if self.lost:
            for peer, (pending, until) in list(self.lost.items()):
                if self.time.mono >= until:
                    self._drop_routes(peer)
                    self.stats["lost_routes_expired"] += 1
                    log.warning("shard %d: %d virtual shards of peer %d, which is gone, were not taken"
                                " in time: its routes are dropped", self.shard, len(pending), peer)
        overdue = self.outbox.overdue(self.time.mono)
        if overdue:
            reached = set(self.link.peers)
            for peer in overdue:
                if peer in reached:
                    self._resend(peer)
        self.moves.sweep()
