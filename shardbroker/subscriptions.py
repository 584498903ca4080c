"""SUBSCRIBE and UNSUBSCRIBE: the local subscription tries, route references, retained delivery.

The first local subscriber of a filter adds it to every shard's route table and
SUBACK waits for all of them to acknowledge (so a publish accepted anywhere after
SUBACK reaches the subscription); the last one removes it. Retained messages are
sent after SUBACK, per Retain Handling.

A mixin of ``Shard``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from storage.lmdb_store import StoreError

from .protocol import codec, reasons
from .protocol.errors import ProtocolError
from .protocol.packets import (
    MQTT_5,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from .session import (
    Message,
    Session,
    StoredSubscription,
)
from .topics import matches, parse_shared, validate_topic_filter

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("shardbroker.shard")

ROUTE_ACK_TIMEOUT = 2.0


class Subscriptions:
    """SUBSCRIBE / UNSUBSCRIBE (mixin of ``Shard``)."""

    if TYPE_CHECKING:  # provided by Shard
        from itertools import count

        from storage.lmdb_store import RetainedStore

        from .bus import Bus
        from .config import Config
        from .routing import RouteTable
        from .topics import TopicTrie

        config: Config
        shard: int
        bus: Bus
        loop: asyncio.AbstractEventLoop
        routes: RouteTable
        retained: RetainedStore
        subs: TopicTrie[str, StoredSubscription]
        shared_subs: TopicTrie[tuple[str, str], StoredSubscription]
        filter_refs: dict[str, int]
        durable_refs: dict[str, int]
        _route_waits: dict[int, tuple[set[int], asyncio.Future[None]]]
        _route_pending: dict[str, asyncio.Future[None]]
        _req: count[int]

        def schedule_flush(self) -> None: ...
        def _persist_session(self, sess: Session) -> None: ...
        def deliver(self, sess: Session, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                    group: tuple[str, str] | None = None) -> None: ...

    def _add_subscription(self, sess: Session, sub: StoredSubscription) -> None:
        sess.subscriptions[sub.topic_filter] = sub
        shared = parse_shared(sub.topic_filter)
        if shared is None:
            self.subs.add(sub.topic_filter, sess.client_id, sub)
        else:
            self.shared_subs.add(shared[1], (shared[0], sess.client_id), sub)

    def _remove_subscription(self, sess: Session, flt: str) -> bool:
        if sess.subscriptions.pop(flt, None) is None:
            return False
        shared = parse_shared(flt)
        if shared is None:
            self.subs.remove(flt, sess.client_id)
        else:
            self.shared_subs.remove(shared[1], (shared[0], sess.client_id))
        n = self.filter_refs.get(flt, 0) - 1
        d = self.durable_refs.get(flt, 0) - (1 if sess.persistent else 0)
        if n <= 0:
            self.filter_refs.pop(flt, None)
            self.durable_refs.pop(flt, None)
            self.routes.remove(self.shard, flt)
            self.bus.broadcast(["r-", self.shard, flt])
            self.schedule_flush()
            return True
        self.filter_refs[flt] = n
        if d <= 0 and flt in self.durable_refs:  # no persistent subscriber left: plain hand-over
            del self.durable_refs[flt]
            self.routes.add(self.shard, flt, False)
            self.bus.broadcast(["r+", self.shard, flt, 0, False])
            self.schedule_flush()
        elif d > 0:
            self.durable_refs[flt] = d
        return True

    def _ref_route(self, flt: str, durable: bool) -> asyncio.Future[None] | None:
        """Count a subscription to ``flt``; tell every shard when it is the first one, or the
        first persistent one. The future completes when they all have acknowledged."""
        n = self.filter_refs.get(flt, 0)
        self.filter_refs[flt] = n + 1
        d = self.durable_refs.get(flt, 0)
        if durable:
            self.durable_refs[flt] = d + 1
        if n and not (durable and d == 0):
            pending = self._route_pending.get(flt)
            return pending if pending is not None and not pending.done() else None
        self.routes.add(self.shard, flt, flt in self.durable_refs)
        peers = set(self.bus.peers)
        if not peers:
            return None
        req = next(self._req)
        fut: asyncio.Future[None] = self.loop.create_future()
        self._route_waits[req] = (peers, fut)
        self._route_pending[flt] = fut
        fut.add_done_callback(lambda _f: self._route_pending.pop(flt, None))
        self.bus.broadcast(["r+", self.shard, flt, req, flt in self.durable_refs])
        self.schedule_flush()
        return fut

    def on_subscribe(self, conn: Connection, pkt: Subscribe) -> None:
        sess = conn.session
        assert sess is not None
        v5 = conn.version == MQTT_5
        sub_id = pkt.properties.subscription_identifiers[0] if pkt.properties.subscription_identifiers else None
        codes: list[int] = []
        waits: list[asyncio.Future[None]] = []
        retained_for: list[StoredSubscription] = []
        for s in pkt.subscriptions:
            try:
                validate_topic_filter(s.topic_filter)
            except ProtocolError as exc:
                log.info("%s: subscription to %r refused: %s", conn.client_id, s.topic_filter, exc.message)
                codes.append(reasons.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            shared = parse_shared(s.topic_filter)
            inner = shared[1] if shared is not None else s.topic_filter
            if any(matches(denied, inner) for denied in self.config.acl.deny_subscribe):
                log.info("%s: subscription to %r refused by acl.deny_subscribe", conn.client_id, s.topic_filter)
                codes.append(reasons.UNSPECIFIED_ERROR)  # 0x80 in 3.1.1 and 5.0
                continue
            if shared is not None and s.no_local:  # [MQTT-3.8.3-4]
                raise ProtocolError(reasons.PROTOCOL_ERROR, "No Local on a shared subscription")
            existed = s.topic_filter in sess.subscriptions
            sub = StoredSubscription(s.topic_filter, s.qos, s.no_local, s.retain_as_published,
                                     s.retain_handling, sub_id)
            self._add_subscription(sess, sub)  # replaces the options of an existing one
            if not existed:
                fut = self._ref_route(s.topic_filter, sess.persistent)
                if fut is not None:
                    waits.append(fut)
            codes.append(s.qos)
            if shared is None and (s.retain_handling == 0 or (s.retain_handling == 1 and not existed)):
                retained_for.append(sub)
        if sess.persistent:
            self._persist_session(sess)
        suback = codec.encode(SubAck(pkt.packet_id, tuple(codes)), conn.version)
        if not waits:
            conn.send(suback)
            self._send_retained(sess, conn, retained_for)
            return

        async def after_routes() -> None:
            await asyncio.wait(waits, timeout=ROUTE_ACK_TIMEOUT)
            if conn.session is sess and not conn.closing:
                conn.send(suback)
                self._send_retained(sess, conn, retained_for)

        self.loop.create_task(after_routes())

    def _send_retained(self, sess: Session, conn: Connection, subs: list[StoredSubscription]) -> None:
        if not subs:
            return
        now = time.time()
        for sub in subs:
            flt = sub.topic_filter
            cut = min((i for i in (flt.find("+"), flt.find("#")) if i >= 0), default=len(flt))
            prefix = flt[:cut]
            try:
                found = list(self.retained.scan(prefix)) if cut < len(flt) else (
                    [(flt, m)] if (m := self.retained.get(flt)) is not None else [])
            except StoreError as exc:
                log.error("retained store read failed: %s", exc)
                return
            for topic, smsg in found:
                if not matches(flt, topic):
                    continue
                if smsg.expires_at is not None and now >= smsg.expires_at:
                    continue
                msg = Message(topic, smsg.payload, smsg.qos, True, smsg.properties, smsg.expires_at, None)
                self.deliver(sess, msg, min(smsg.qos, sub.qos), True,
                             (sub.subscription_id,) if sub.subscription_id else ())

    def on_unsubscribe(self, conn: Connection, pkt: Unsubscribe) -> None:
        sess = conn.session
        assert sess is not None
        codes = []
        for flt in pkt.topic_filters:
            removed = self._remove_subscription(sess, flt)
            codes.append(reasons.SUCCESS if removed else reasons.NO_SUBSCRIPTION_EXISTED)
        if sess.persistent:
            self._persist_session(sess)
        conn.send(codec.encode(UnsubAck(pkt.packet_id, tuple(codes)), conn.version))

