"""Subscriptions of one shard: the local tries, route references, SUBSCRIBE and UNSUBSCRIBE,
retained delivery, and the local fan-out of a publish.

The first local subscriber of a filter adds it to every shard's route table
(``Peers.announce_routes``: one ``RoutesAdd`` for a SUBSCRIBE's new filters) and its
SUBACK waits until all of them have acknowledged, so that a publish accepted anywhere
after SUBACK reaches the subscription; later
subscribers of the same filter wait for the same acknowledgements while they are
outstanding. A SUBACK waits at most ``ROUTE_ACK_TIMEOUT`` seconds (a peer that is
down must not stall subscribers). The last local subscriber removes the filter.
Retained messages are sent after SUBACK, per Retain Handling.

A publish that reaches this shard is fanned out here (``deliver_local``): one copy per
session, at the highest QoS of its matching subscriptions, with all their
identifiers; a shared group's message goes to one member, taken in turns, online
members first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shardbroker.config import LimitsConfig
from shardbroker.core.access import AccessRules
from shardbroker.core.client import Client
from shardbroker.core.clock import EventTime, Now, Scheduler, Timer
from shardbroker.core.delivery import Delivery
from shardbroker.core.output import Output
from shardbroker.core.routing import RoundRobin
from shardbroker.core.session import Message, Session, Subscribed, subscribed
from shardbroker.core.store import RetainedStore, StoreError
from shardbroker.core.topics import (
    SHARE_PREFIX,
    FilterMap,
    TopicTrie,
    beyond_limits,
    matches,
    parse_shared,
    validate_topic_filter,
)
from shardbroker.protocol import codec, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import MQTT_5, SubAck, Subscribe, UnsubAck, Unsubscribe
from shardbroker.storage.records import StoredMessage

if TYPE_CHECKING:
    from shardbroker.core.peers import Peers
    from shardbroker.core.sessions import Sessions

log = logging.getLogger("shardbroker.subscriptions")

ROUTE_ACK_TIMEOUT = 2.0
MAX_HOPS = 3  # shards a shared-group message may be passed on to in search of a member


Options = Callable[[str, str], Subscribed | None]
"""(client ID, filter) -> the options of that session's subscription to that filter."""


class PlainIndex:
    """This shard's plain (not shared) subscriptions by filter. A filter with one
    subscriber, the usual case, maps to that session's client ID (the session's own string;
    its options are in ``Session.subscriptions``); one with more to a dict client ID ->
    options. So a subscription costs a slot here, neither a table nor an object."""

    __slots__ = ("_map", "_options")

    def __init__(self, options: Options) -> None:
        self._map: FilterMap[str | dict[str, Subscribed]] = FilterMap()
        self._options = options  # for the first subscriber, when a second one comes

    def __len__(self) -> int:
        return len(self._map)

    def add(self, flt: str, client_id: str, sub: Subscribed) -> bool:
        """Index ``client_id``'s subscription to ``flt`` with options ``sub`` (new options of a
        subscription it has: its session holds them, or the filter's dict). True if ``flt``
        had no subscriber here before."""
        held = self._map.get(flt)
        if held is None:
            self._map.set(flt, client_id)
            return True
        if isinstance(held, dict):
            held[client_id] = sub
        elif held != client_id:
            first = self._options(held, flt)
            self._map.set(flt, client_id if first is None else {held: first, client_id: sub})
        return False

    def remove(self, flt: str, client_id: str) -> None:
        held = self._map.get(flt)
        if isinstance(held, dict):
            held.pop(client_id, None)
            if len(held) == 1:
                (last,) = held
                self._map.set(flt, last)
        elif held == client_id:
            self._map.remove(flt)

    def count(self, flt: str) -> int:
        held = self._map.get(flt)
        return 0 if held is None else len(held) if isinstance(held, dict) else 1

    def filters(self) -> list[str]:
        return [flt for flt, _ in self._map.items()]

    def match(self, topic: str) -> list[tuple[str, str | dict[str, Subscribed]]]:
        """``(filter, subscriber's client ID or {client ID: options})`` for every filter
        matching ``topic``."""
        return self._map.match(topic)


@dataclass(eq=False)
class _WaitingSuback:
    """A SUBACK held until the route announcements it depends on are acknowledged."""

    client: Client
    session: Session
    suback: bytes
    retained_for: list[tuple[str, Subscribed]]
    requests: set[int]
    timer: Timer | None = field(default=None)


REPLAY_ROWS = 1024  # retained rows read and delivered per turn of the loop once a SUBSCRIBE's first page is out


@dataclass(eq=False)
class _Replay:
    """The rest of one filter's retained messages for one subscriber, read a page per turn."""

    text: str  # the filter's text up to its first wildcard
    flt: str
    sub: Subscribed
    after: bytes  # the last key read


class Subscriptions:
    def __init__(self, shard: int, sessions: Sessions, delivery: Delivery, output: Output, access: AccessRules,
                 retained: RetainedStore, scheduler: Scheduler, time: EventTime, limits: LimitsConfig,
                 stats: dict[str, int]) -> None:
        self.shard = shard
        self.limits = limits
        self.stats = stats
        self.sessions = sessions
        self.delivery = delivery
        self.output = output
        self.access = access
        self.retained = retained
        self.scheduler = scheduler
        self.time = time
        self.peers: Peers  # set by the broker (the peers need the subscriptions too)
        self.subs = PlainIndex(self._options)
        self.shared_subs: TopicTrie[tuple[str, str], Subscribed] = TopicTrie()
        # a plain route key's local subscriptions are its entries in ``subs``; a shared
        # key's are counted here
        self.shared_refs: dict[str, int] = {}  # $share/... route key -> local subscriptions
        self.durable_refs: dict[str, int] = {}  # route key -> local persistent subscriptions
        self._requests: dict[int, set[int]] = {}  # route announcement -> peers yet to acknowledge
        self._filter_request: dict[str, int] = {}  # filter -> its outstanding announcement
        self._request_filters: dict[int, list[str]] = {}  # announcement -> the filters it announced
        self._waiting: dict[int, list[_WaitingSuback]] = {}  # announcement -> SUBACKs waiting for it
        self._barriers: dict[int, Callable[[], None]] = {}  # announcement -> called when acknowledged
        self._members = RoundRobin()
        # Parked sessions (a cluster node's sessions of virtual shards it does not serve: it lost
        # its lease, or the shard went elsewhere while it was away): still matched here (the
        # forwards other nodes' outboxes kept for them must find them), but their routes are
        # not announced, so no peer sends them new publishes that their shard's owner gets too
        self._parked: set[str] = set()
        self.parked_refs: dict[str, int] = {}  # route key -> parked sessions' subscriptions
        # Retained messages still to send after a SUBSCRIBE's first page (``_send_retained``):
        # per session, its client then and the filters' replays, in order
        self._replays: dict[Session, tuple[Client, list[_Replay]]] = {}
        self._replay_due = False

    # ---- the local tries and the route references

    def _options(self, client_id: str, flt: str) -> Subscribed | None:
        """The options of ``client_id``'s subscription to ``flt`` (None: it has none)."""
        sess = self.sessions.sessions.get(client_id)
        subs = sess.subscriptions if sess is not None else None
        return subs.get(flt) if subs is not None else None

    def restore(self, sess: Session, flt: str, sub: Subscribed) -> None:
        """A subscription of a session restored from the store (startup: persistent, so durable)."""
        if self._add(sess, flt, sub)[0]:
            self.durable_refs[flt] = self.durable_refs.get(flt, 0) + 1
            self.peers.routes.add(self.shard, flt, True)

    def adopt(self, sess: Session, flt: str, sub: Subscribed) -> bool:
        """A subscription of a session moved in from another node (persistent, so durable).
        Whether the peers must hear of its route (the shard's first subscription to it, or its
        first persistent one): the caller passes those to ``announce``."""
        new, first = self._add(sess, flt, sub)
        if not new:
            return False
        d = self.durable_refs.get(flt, 0)
        self.durable_refs[flt] = d + 1
        if sess.client_id in self._parked:
            return False  # announced when it is unparked
        return first or d == 0

    def announce(self, filters: list[str]) -> None:
        """Tell every peer of these routes (each once; durable), in one ``RoutesAdd``."""
        self._announce(list(dict.fromkeys(filters)))

    def _add(self, sess: Session, flt: str, sub: Subscribed) -> tuple[bool, bool]:
        """Store the subscription to ``flt`` (or new options of one the session has). Whether it
        is new, and whether it is the first of this shard to that route key."""
        subs = sess.subscriptions
        if subs is None:
            subs = sess.subscriptions = {}
        new = subs.get(flt) is None
        subs[flt] = sub
        shared = parse_shared(flt)
        if shared is None:
            first = self.subs.add(flt, sess.client_id, sub)
        else:
            self.shared_subs.add(shared[1], (shared[0], sess.client_id), sub)
            if not new:
                return False, False
            refs = self.shared_refs[flt] = self.shared_refs.get(flt, 0) + 1
            first = refs == 1
        if not self.parked_refs and not self._parked:
            return new, first
        if sess.client_id in self._parked:
            if new:
                self.parked_refs[flt] = self.parked_refs.get(flt, 0) + 1
            return new, False
        return new, new and self._visible(flt) == 1

    def _visible(self, flt: str) -> int:
        """This shard's subscriptions to route key ``flt`` that its peers know of (not parked)."""
        return self._local_count(flt) - self.parked_refs.get(flt, 0)

    def park(self, sess: Session) -> list[str]:
        """Keep ``sess`` matched here but its routes unannounced (``_parked``); the route keys
        that no other session here holds, to withdraw (``Peers.withdraw_routes``)."""
        if sess.client_id in self._parked:
            return []
        self._parked.add(sess.client_id)
        withdrawn = []
        for flt in sess.subscriptions or ():
            self.parked_refs[flt] = self.parked_refs.get(flt, 0) + 1
            if self._visible(flt) == 0:
                withdrawn.append(flt)
        return withdrawn

    def unpark(self, sess: Session) -> list[str]:
        """``sess`` is served here again: the route keys its peers must hear of again."""
        if sess.client_id not in self._parked:
            return []
        self._parked.discard(sess.client_id)
        announce = []
        for flt in sess.subscriptions or ():
            left = self.parked_refs.get(flt, 0) - 1
            if left > 0:
                self.parked_refs[flt] = left
            else:
                self.parked_refs.pop(flt, None)
            if self._visible(flt) == 1:
                announce.append(flt)
        return announce

    def is_parked(self, client_id: str) -> bool:
        return client_id in self._parked

    def _local_count(self, flt: str) -> int:
        """This shard's subscriptions to route key ``flt``."""
        if flt.startswith(SHARE_PREFIX):
            return self.shared_refs.get(flt, 0)
        return self.subs.count(flt)

    def remove(self, sess: Session, flt: str, withdrawn: list[str]) -> bool:
        """Remove ``sess``'s subscription to ``flt``; False if it had none. When it was this
        shard's last to that route key, the key joins ``withdrawn``, which the caller passes
        to ``Peers.withdraw_routes`` once it has removed all it had to."""
        subs = sess.subscriptions
        if subs is None or subs.pop(flt, None) is None:
            return False
        if not subs:
            sess.subscriptions = None
        parked = sess.client_id in self._parked
        if parked:
            left = self.parked_refs.get(flt, 0) - 1
            if left > 0:
                self.parked_refs[flt] = left
            else:
                self.parked_refs.pop(flt, None)
        shared = parse_shared(flt)
        if shared is None:
            self.subs.remove(flt, sess.client_id)
        else:
            self.shared_subs.remove(shared[1], (shared[0], sess.client_id))
            left = self.shared_refs.get(flt, 0) - 1
            if left > 0:
                self.shared_refs[flt] = left
            else:
                self.shared_refs.pop(flt, None)
        n = self._local_count(flt)
        d = self.durable_refs.get(flt, 0) - (1 if sess.persistent else 0)
        if n <= 0:
            self.durable_refs.pop(flt, None)
            if not parked:
                withdrawn.append(flt)
            return True
        if parked or (self.parked_refs and self._visible(flt) <= 0):
            # the peers never heard of it from this session, or it was the last one they did
            if d > 0:
                self.durable_refs[flt] = d
            else:
                self.durable_refs.pop(flt, None)
            if not parked:
                withdrawn.append(flt)
            return True
        if d <= 0 and flt in self.durable_refs:  # no persistent subscriber left: plain hand-over
            del self.durable_refs[flt]
            self.peers.announce_route(flt, False, ack=False)
        elif d > 0:
            self.durable_refs[flt] = d
        return True

    def remove_all(self, sess: Session) -> None:
        withdrawn: list[str] = []
        for flt in list(sess.subscriptions or ()):
            self.remove(sess, flt, withdrawn)
        self._parked.discard(sess.client_id)
        self.peers.withdraw_routes(withdrawn)

    def route_count(self) -> int:
        """How many route keys this shard holds."""
        return len(self.subs) + len(self.shared_refs)

    def route_keys(self) -> dict[str, bool]:
        """Every filter this shard subscribes to, and whether a persistent session does."""
        keys = [*self.subs.filters(), *self.shared_refs]
        if self.parked_refs:
            keys = [key for key in keys if self._visible(key) > 0]
        return {key: key in self.durable_refs for key in keys}

    def _ref_route(self, flt: str, first: bool, durable: bool, announce: list[str]) -> int | None:
        """A new subscription to ``flt`` (already stored; ``first`` of this shard). When it is
        the first one, or the first persistent one, every shard must hear of it: ``flt`` joins
        ``announce``. Otherwise returns the announcement still outstanding for ``flt``, if any."""
        d = self.durable_refs.get(flt, 0)
        if durable:
            self.durable_refs[flt] = d + 1
        if not first and not (durable and d == 0):
            return self._filter_request.get(flt)
        announce.append(flt)
        return None

    def _announce(self, filters: list[str]) -> int | None:
        """Tell every shard of ``filters`` (a SUBSCRIBE's new ones, in one ``RoutesAdd``);
        returns the announcement to wait for (None without peers)."""
        durable = self.durable_refs
        request = self.peers.announce_routes([(flt, flt in durable) for flt in filters])
        if request is not None:
            self._requests[request] = set(self.peers.peer_ids())
            self._request_filters[request] = filters
            for flt in filters:
                self._filter_request[flt] = request
        return request

    def barrier(self, done: Callable[[], None]) -> None:
        """Call ``done`` once every peer has acknowledged an empty announcement sent now: each
        has then taken everything this shard sent it before (the bus keeps order per peer),
        and what it sent this shard before acknowledging is here too. At once without peers."""
        request = self.peers.announce_routes([])
        if request is None:
            done()
            return
        self._requests[request] = set(self.peers.peer_ids())
        self._barriers[request] = done
        if not self._requests[request]:
            self._request_done(request)

    def route_acknowledged(self, peer: int, request: int) -> None:
        waiting = self._requests.get(request)
        if waiting is None:
            return
        waiting.discard(peer)
        if waiting:
            return
        self._request_done(request)

    def peer_gone(self, peer: int) -> None:
        """A peer left for good (another node's worker): no SUBACK waits for it any longer."""
        for request in [r for r, waiting in self._requests.items() if peer in waiting]:
            self.route_acknowledged(peer, request)

    def _request_done(self, request: int) -> None:
        self._requests.pop(request, None)
        done = self._barriers.pop(request, None)
        if done is not None:
            done()
        for flt in self._request_filters.pop(request, ()):
            if self._filter_request.get(flt) == request:
                del self._filter_request[flt]
        for w in self._waiting.pop(request, ()):
            w.requests.discard(request)
            if not w.requests:
                self._release(w)

    def _release(self, w: _WaitingSuback) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        for request in w.requests:  # the timeout: stop waiting for the rest
            others = self._waiting.get(request)
            if others is not None and w in others:
                others.remove(w)
        w.requests.clear()
        if w.client.session is w.session and not w.client.closing:
            self.output.send(w.client, w.suback)
            self._send_retained(w.session, w.client, w.retained_for)

    # ---- SUBSCRIBE, UNSUBSCRIBE

    def on_subscribe(self, client: Client, sess: Session, pkt: Subscribe) -> None:
        v5 = client.version == MQTT_5
        sub_id = pkt.properties.subscription_identifiers[0] if pkt.properties.subscription_identifiers else None
        codes: list[int] = []
        waits: set[int] = set()
        retained_for: list[tuple[str, Subscribed]] = []
        announce: list[str] = []
        for s in pkt.subscriptions:
            try:
                validate_topic_filter(s.topic_filter)
                beyond = beyond_limits(s.topic_filter, self.limits.max_topic_levels, self.limits.max_topic_length)
                if beyond is not None:
                    self.stats["subscriptions_refused"] += 1
                    raise ProtocolError(reasons.TOPIC_FILTER_INVALID, beyond)
            except ProtocolError as exc:
                log.info("%s: subscription to %r refused: %s", client.client_id, s.topic_filter, exc.message)
                codes.append(reasons.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            denied = self.access.subscribe_denied(s.topic_filter, client.acl)
            if denied is not None:
                log.info("%s: subscription to %r %s", client.client_id, s.topic_filter, denied)
                codes.append(reasons.NOT_AUTHORIZED if v5 else 0x80)
                continue
            shared = parse_shared(s.topic_filter)
            if shared is not None and s.no_local:  # [MQTT-3.8.3-4]
                raise ProtocolError(reasons.PROTOCOL_ERROR, "No Local on a shared subscription")
            cap = self.limits.max_subscriptions
            if cap and s.topic_filter not in (sess.subscriptions or ()) and len(sess.subscriptions or ()) >= cap:
                log.info("%s: subscription to %r refused: it has %d (limits.max_subscriptions)",
                         client.client_id, s.topic_filter, cap)
                self.stats["subscriptions_refused"] += 1
                codes.append(reasons.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            sub = subscribed(s.qos, s.no_local, s.retain_as_published, s.retain_handling, sub_id)
            new, first = self._add(sess, s.topic_filter, sub)  # replaces the options of an existing one
            existed = not new
            if new:
                request = self._ref_route(s.topic_filter, first, sess.persistent, announce)
                if request is not None:
                    waits.add(request)
            codes.append(s.qos)
            if shared is None and (s.retain_handling == 0 or (s.retain_handling == 1 and not existed)):
                retained_for.append((s.topic_filter, sub))
        if announce:
            request = self._announce(announce)
            if request is not None:
                waits.add(request)
        if sess.persistent:
            self.sessions.persist(sess)
        suback = codec.encode(SubAck(pkt.packet_id, tuple(codes)), client.version)
        if not waits:
            self.output.send(client, suback)
            self._send_retained(sess, client, retained_for)
            return
        w = _WaitingSuback(client, sess, suback, retained_for, waits)
        for request in waits:
            self._waiting.setdefault(request, []).append(w)
        w.timer = self.scheduler.later(ROUTE_ACK_TIMEOUT, lambda _now: self._release(w))

    def on_unsubscribe(self, client: Client, sess: Session, pkt: Unsubscribe) -> None:
        codes = []
        withdrawn: list[str] = []
        for flt in pkt.topic_filters:
            removed = self.remove(sess, flt, withdrawn)
            codes.append(reasons.SUCCESS if removed else reasons.NO_SUBSCRIPTION_EXISTED)
        self.peers.withdraw_routes(withdrawn)
        if sess.persistent:
            self.sessions.persist(sess)
        self.output.send(client, codec.encode(UnsubAck(pkt.packet_id, tuple(codes)), client.version))

    def _send_retained(self, sess: Session, client: Client, subs: list[tuple[str, Subscribed]]) -> None:
        """The retained messages of a SUBSCRIBE's new subscriptions. The first page of each
        filter (``_PAGE_ROWS`` rows of the store, all in one read) goes now; a filter that
        matches more (``#`` on 50,000 retained topics) goes on ``REPLAY_ROWS`` rows per turn of
        the loop (``_replay``), so that its other clients are served in between, instead of
        waiting for all of it (150-320 ms for 50,000). A message published to a topic while its
        retained one waits (``Delivery.replaying``) has superseded it: that one is not sent."""
        if not subs:
            return
        heads: list[tuple[str, bool]] = []  # a filter's text up to its first wildcard; whether it has none
        for flt, _sub in subs:
            plus, hash_ = flt.find("+"), flt.find("#")
            if plus < 0 and hash_ < 0:
                heads.append((flt, True))
            else:
                heads.append((flt[:min(plus, hash_) if plus >= 0 and hash_ >= 0 else max(plus, hash_)], False))
        try:
            found_each = self.retained.find(heads)  # one read of the store for the whole SUBSCRIBE
        except StoreError as exc:
            log.error("retained store read failed: %s", exc)
            return
        waiting = self._replays.get(sess)
        if waiting is not None and waiting[0] is not client:  # owed to a connection that is gone
            self._end_replay(sess)
            waiting = None
        superseded = self.delivery.replaying.pop(sess, None)  # its own deliveries supersede nothing
        try:
            for (flt, sub), (text, _exact), (found, after) in zip(subs, heads, found_each, strict=True):
                self._deliver_retained(sess, flt, sub, found, None)
                if after is not None:
                    if waiting is None:
                        waiting = self._replays[sess] = (client, [])
                        superseded = set()
                    waiting[1].append(_Replay(text, flt, sub, after))
        finally:
            if superseded is not None:
                self.delivery.replaying[sess] = superseded
        if waiting is not None and not self._replay_due:
            self._replay_due = True
            self.scheduler.soon(self._replay)

    def _deliver_retained(self, sess: Session, flt: str, sub: Subscribed, found: list[tuple[str, StoredMessage]],
                          superseded: set[str] | None) -> None:
        now = self.time.wall
        sub_ids = (sub.subscription_id,) if sub.subscription_id else ()
        for topic, smsg in found:
            if not matches(flt, topic) or (superseded is not None and topic in superseded):
                continue
            if smsg.expires_at is not None and now >= smsg.expires_at:
                continue
            msg = Message(topic, smsg.payload, smsg.qos, True, smsg.properties, smsg.expires_at, None)
            self.delivery.deliver(sess, msg, min(smsg.qos, sub.qos), True, sub_ids)

    def _replay(self, now: Now) -> None:
        """A turn of the retained messages still owed: ``REPLAY_ROWS`` rows of the store over
        the sessions waiting, oldest SUBSCRIBE first. A subscriber that left, or unsubscribed
        from the filter, is owed no more."""
        self._replay_due = False
        self.time.set(now)
        budget = REPLAY_ROWS
        for sess, (client, replays) in list(self._replays.items()):
            if budget <= 0:
                break
            if sess.client is not client or client.closing:
                self._end_replay(sess)
                continue
            superseded = self.delivery.replaying.pop(sess, set())  # its own deliveries supersede nothing
            try:
                while replays and budget > 0:
                    r = replays[0]
                    if sess.subscriptions is None or sess.subscriptions.get(r.flt) is not r.sub:
                        replays.pop(0)
                        continue
                    try:
                        found, after = self.retained.page(r.text, r.after, budget)
                    except StoreError as exc:
                        log.error("retained store read failed: %s", exc)
                        replays.clear()
                        break
                    # a page that goes on read the whole budget (rows of other topics among them)
                    budget = 0 if after is not None else budget - max(len(found), 1)
                    self._deliver_retained(sess, r.flt, r.sub, found, superseded)
                    if after is None:
                        replays.pop(0)
                    else:
                        r.after = after
            finally:
                self.delivery.replaying[sess] = superseded
            if not replays:
                self._end_replay(sess)
        if self._replays and not self._replay_due:
            self._replay_due = True
            self.scheduler.soon(self._replay)

    def _end_replay(self, sess: Session) -> None:
        self._replays.pop(sess, None)
        self.delivery.replaying.pop(sess, None)

    # ---- fan-out of a publish on this shard

    def deliver_local(self, msg: Message, non_shared: bool, groups: Iterable[tuple[str, str]], hops: int) -> None:
        """Deliver ``msg`` to this shard's matching subscriptions: the plain ones when
        ``non_shared``, and one member of each shared group in ``groups``."""
        if msg.expires_at is not None and self.time.wall >= msg.expires_at:
            self.delivery.stats["expired"] += 1
            return
        if non_shared:
            matches_ = self.subs.match(msg.topic)
            sessions = self.sessions.sessions
            deliver = self.delivery.deliver
            if len(matches_) == 1:
                flt, held = matches_[0]
                if isinstance(held, dict):
                    for cid, sub in held.items():
                        if sub.no_local and cid == msg.origin:
                            continue
                        sess = sessions.get(cid)
                        if sess is not None:
                            deliver(sess, msg, min(msg.qos, sub.qos), msg.retain and sub.retain_as_published,
                                    (sub.subscription_id,) if sub.subscription_id else ())
                else:  # one subscriber: its options are in its session
                    sess = sessions.get(held)
                    subs = sess.subscriptions if sess is not None else None
                    one = subs.get(flt) if subs is not None else None
                    if sess is not None and one is not None and not (one.no_local and held == msg.origin):
                        deliver(sess, msg, min(msg.qos, one.qos), msg.retain and one.retain_as_published,
                                (one.subscription_id,) if one.subscription_id else ())
            elif matches_:
                # Overlapping subscriptions: one copy at the highest QoS with every identifier.
                agg: dict[str, list[Any]] = {}
                for flt, held in matches_:
                    for cid, opts in held.items() if isinstance(held, dict) else ((held, self._options(held, flt)),):
                        if opts is None or opts.no_local and cid == msg.origin:
                            continue
                        a = agg.get(cid)
                        if a is None:
                            a = agg[cid] = [0, False, []]
                        a[0] = max(a[0], opts.qos)
                        a[1] = a[1] or opts.retain_as_published
                        if opts.subscription_id:
                            a[2].append(opts.subscription_id)
                for cid, (qos, rap, ids) in agg.items():
                    sess = sessions.get(cid)
                    if sess is not None:
                        deliver(sess, msg, min(msg.qos, qos), msg.retain and rap, tuple(sorted(ids)))
        for group, flt in groups:
            self.deliver_shared(msg, group, flt, hops)

    def deliver_shared(self, msg: Message, group: str, flt: str, hops: int) -> None:
        """One member of ``group`` on ``flt`` gets ``msg``; with none here, another shard that
        has members is asked (at most ``MAX_HOPS`` times)."""
        entries = self.shared_subs.get(flt) or {}
        members = [(cid, sub) for (g, cid), sub in entries.items() if g == group]
        if not members:
            if hops < MAX_HOPS:
                self.peers.pass_shared(msg, group, flt, hops)
            return
        sessions = self.sessions.sessions
        online = [m for m in members if (s := sessions.get(m[0])) is not None and s.client is not None]
        cid, sub = self._members.pick((group, flt), online or members)
        sess = sessions.get(cid)
        if sess is not None:
            self.delivery.deliver(sess, msg, min(msg.qos, sub.qos), msg.retain and sub.retain_as_published,
                                  (sub.subscription_id,) if sub.subscription_id else (), (group, flt))

