"""One shard's broker semantics: sessions, subscriptions, delivery and acknowledgements.

One handler per packet type (``on_connect``, ``on_publish``, ...). Handlers mutate
in-memory state, queue store operations in the current batch, queue bytes on
connections and items on the bus; :meth:`Shard.flush`, run once per event-loop
iteration, commits the batch (group commit) and only then writes the queued bytes
and bus items. So every acknowledgement (PUBACK, PUBREC, SUBACK, the CONNACK of a
persistent session) leaves after the state it promises is committed.

What this module does not do: sockets and the event loop (``connection.py``,
``worker.py``), bytes (``protocol/``), LMDB (``storage/``), ZeroMQ (``bus.py``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import replace
from itertools import count
from typing import TYPE_CHECKING, Any

from storage.lmdb_store import RetainedStore, ShardStore, StoreError
from storage.records import SessionRecord, StoredMessage, StoredWill

from .config import Config
from .delivery import Delivery
from .flow import Flow
from .handover import APPLY, GAP, Handover
from .protocol import codec, reasons
from .protocol.errors import ProtocolError
from .protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
)
from .routing import RouteTable, Target
from .session import (
    AWAIT_PUBCOMP,
    NEVER,
    Message,
    Outgoing,
    Queued,
    Session,
    StoredSubscription,
    WillState,
    message_from_wire,
    message_to_wire,
)
from .subscriptions import Subscriptions
from .topics import TopicTrie, validate_topic_name

if TYPE_CHECKING:
    from .bus import Bus
    from .connection import Connection

log = logging.getLogger("shardbroker.shard")

_ACK = struct.Struct(">BBH").pack  # PUBACK/PUBREC/PUBREL/PUBCOMP with reason 0 and no properties
MAX_HOPS = 3
VALID_TOPICS_KEPT = 10000  # topic names remembered as valid (forgotten all at once when full)
STORE_FULL_AT = 0.9  # fraction of storage.max_map_size at which new QoS 1/2 work is refused
STORE_FULL_RETRY = 5.0
ALIVE_EVERY = 1.0  # seconds between "alive at" marks in the store  # seconds after a failed commit before writes are tried again


# One handler per packet type once connected (CONNECT goes to ``on_connect``).
HANDLERS: dict[type, str] = {
    Publish: "on_publish", PubAck: "on_puback", PubRec: "on_pubrec", PubRel: "on_pubrel",
    PubComp: "on_pubcomp", Subscribe: "on_subscribe", Unsubscribe: "on_unsubscribe",
    PingReq: "on_pingreq", Disconnect: "on_disconnect", Auth: "on_auth",
}


class Shard(Delivery, Subscriptions):
    def __init__(
        self, config: Config, shard: int, shards: int, store: ShardStore,
        retained: RetainedStore, bus: Bus, loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.shard = shard
        self.shards = shards
        self.store = store
        self.retained = retained
        self.bus = bus
        self.loop = loop
        self._handlers: dict[type, Any] = {t: getattr(self, name) for t, name in HANDLERS.items()}
        self.sessions: dict[str, Session] = {}
        self.stored: set[str] = set()  # client ids with a session record in the store
        self.connections: set[Connection] = set()
        self.subs: TopicTrie[str, StoredSubscription] = TopicTrie()
        self.shared_subs: TopicTrie[tuple[str, str], StoredSubscription] = TopicTrie()
        self.filter_refs: dict[str, int] = {}  # route key -> local subscriptions
        self.durable_refs: dict[str, int] = {}  # route key -> local persistent subscriptions
        self.routes = RouteTable()
        self.handover = Handover(shard)
        self._deny_publish: TopicTrie[int, None] = TopicTrie()
        for i, flt in enumerate(config.acl.deny_publish):
            self._deny_publish.add(flt, i, None)
        self._replay_asked: set[int] = set()
        self._route_waits: dict[int, tuple[set[int], asyncio.Future[None]]] = {}
        self._route_pending: dict[str, asyncio.Future[None]] = {}
        self._req = count(1)
        self._rr: dict[tuple[str, str], int] = {}
        self.synced: set[int] = set()
        self.batch: Any = None
        self.retained_ops: list[tuple[str, StoredMessage | None]] = []
        self.dirty: list[Connection] = []
        self._flush_scheduled = False
        self.flow = Flow()
        self._valid_topics: set[str] = set()  # topic names already checked (bounded)
        self._flow_recheck: asyncio.TimerHandle | None = None
        self.store_full = False
        self._hard_full_at = -1e9
        self._alive_written = 0.0
        self._sys_published = time.monotonic()
        self.max_sessions = max(1, self.limits.max_sessions // max(1, shards))
        self.stats = {
            "received": 0, "delivered": 0, "forwarded": 0, "dropped_queue_full": 0,
            "dropped_too_large": 0, "expired": 0, "protocol_errors": 0, "commits": 0, "commit_ops": 0,
        }

    # ------------------------------------------------------------------ startup

    def restore(self) -> None:
        """Load this shard's sessions from the store (startup)."""
        now = time.time()
        # A session that was connected when the shard died lost its connection at the last
        # moment the shard is known to have been alive: downtime counts toward its expiry.
        alive_at = self.store.get_meta("alive_at")
        crashed_at = float(alive_at) if isinstance(alive_at, (int, float)) and alive_at <= now else now
        for rec in self.store.sessions():
            sess = Session(rec.client_id, rec.protocol_version, rec.expiry_interval)
            sess.disconnected_at = rec.disconnected_at if rec.disconnected_at is not None else crashed_at
            if rec.will is not None:
                w = rec.will
                sess.will = WillState(w.topic, w.payload, w.qos, w.retain, w.properties, w.delay)
                sess.will_due = sess.disconnected_at + min(w.delay, sess.expiry_interval)
            for sub in rec.subscriptions:
                self._add_subscription(sess, sub)
            for pid, inf, smsg in self.store.inflight(rec.client_id):
                msg = _message_from_stored(smsg, inf.msg_id) if smsg is not None else None
                sess.inflight[pid] = Outgoing(msg, inf.qos, msg.retain if msg else False, (), inf.state)
                sess.next_pid = pid % 65535 + 1
            for seq, msg_id, qos, smsg in self.store.queue(rec.client_id):
                msg = _message_from_stored(smsg, msg_id)
                sess.queue.append(Queued(msg, qos, msg.retain, (), seq))
                sess.queued_bytes += len(msg.payload)
            sess.qos2_in.update(self.store.qos2_incoming(rec.client_id))
            self.sessions[rec.client_id] = sess
            self.stored.add(rec.client_id)
            for sub in rec.subscriptions:
                self.filter_refs[sub.topic_filter] = self.filter_refs.get(sub.topic_filter, 0) + 1
        self.durable_refs = dict(self.filter_refs)  # every restored session is persistent
        for key in self.filter_refs:
            self.routes.add(self.shard, key, True)
        self.handover.load(self.store.outbox(), self.store.meta_items())
        self._batch().set_meta("alive_at", now)  # a crash right after start counts from here
        self._alive_written = now
        log.info("shard %d restored %d sessions, %d filters", self.shard, len(self.sessions), len(self.filter_refs))

    def announce(self) -> None:
        """Ask every peer for its routes and tell them ours (startup and restart)."""
        self.bus.broadcast(["s?", self.shard])
        self.bus.broadcast(["s", self.shard, self._route_keys()])
        self.schedule_flush()

    # ------------------------------------------------------------------ flush

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def mark_dirty(self, conn: Connection) -> None:
        self.dirty.append(conn)
        self.schedule_flush()

    def _batch(self) -> Any:
        if self.batch is None:
            self.batch = self.store.batch()
        return self.batch

    def flush(self) -> None:
        """Commit what this iteration changed, then write what it promised."""
        self._flush_scheduled = False
        failed = False
        if self.retained_ops:
            ops, self.retained_ops = self.retained_ops, []
            try:
                self.retained.write(ops)
            except StoreError as exc:
                log.error("retained store write failed: %s", exc)
                failed = True
        if self.handover.has_dirty():
            self.handover.persist(self._batch())
        batch, self.batch = self.batch, None
        if batch is not None and len(batch):
            try:
                n_ops = len(batch)
                batch.commit()
                self.stats["commits"] += 1
                self.stats["commit_ops"] += n_ops
                if self.store.map_at_max():  # close to the limit: look after every commit
                    self._check_fill(time.monotonic())
            except StoreError as exc:
                log.error("shard %d: store commit failed: %s", self.shard, exc)
                failed = True
        dirty, self.dirty = self.dirty, []
        if failed:
            # Nothing promised in this batch may be acknowledged: drop the output of every
            # connection that had any and close it; the clients resend what was not acked.
            self.store_full = True
            self._hard_full_at = time.monotonic()
            for conn in dirty:
                conn.discard_output()
                conn.dirty = False
                self.close(conn, reasons.QUOTA_EXCEEDED, "the message store is full", will=False)
            dirty, self.dirty = self.dirty, []
            self.handover.acks_due.clear()  # not durable, so not acknowledged: the origin resends
        else:
            for origin, mark in self.handover.acks_due.items():
                self.bus.send(origin, ["PA", self.shard, mark])
            self.handover.acks_due.clear()
        self._replay_asked.clear()
        self.bus.flush()
        for conn in dirty:
            conn.write_out()
        self._update_flow()

    def _update_flow(self) -> None:
        """Hold or release the inputs (``flow.py``) now that this iteration's output is written."""
        now = time.monotonic()
        flow, bus = self.flow, self.bus
        recheck = flow.update(now, bus.congested(now))
        if flow.hold_bus:
            bus.hold()
        else:
            bus.release()
        if recheck is not None and self._flow_recheck is None:
            self._flow_recheck = self.loop.call_later(max(0.0, recheck - now), self._flow_recheck_due)

    def _flow_recheck_due(self) -> None:
        self._flow_recheck = None
        self._update_flow()

    # ------------------------------------------------------------------ dispatch

    def handle(self, conn: Connection, packet: object) -> None:
        """Handle one packet from a connected client (CONNECT is handled by on_connect)."""
        try:
            handler = self._handlers.get(type(packet))
            if handler is None:
                if isinstance(packet, Connect):  # [MQTT-3.1.0-2]
                    raise ProtocolError(reasons.PROTOCOL_ERROR, "second CONNECT")
                raise ProtocolError(reasons.PROTOCOL_ERROR, f"unexpected {type(packet).__name__} from a client")
            handler(conn, packet)
        except ProtocolError as exc:
            self.protocol_violation(conn, exc)
        except Exception:
            log.exception("shard %d: internal error handling %s from %s", self.shard,
                          type(packet).__name__, conn.client_id)
            self.close(conn, reasons.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    def protocol_violation(self, conn: Connection, exc: ProtocolError) -> None:
        self.stats["protocol_errors"] += 1
        self.close(conn, exc.reason, exc.message)

    def close(self, conn: Connection, reason: int | None, text: str, *, will: bool = True) -> None:
        """Server-side disconnect: DISCONNECT with ``reason`` to a 5.0 client, then close."""
        if conn.closing:
            return
        log.info("closing %s (%s): %s%s", conn.client_id or conn.peer, conn.peer, text,
                 f" [{reasons.name(reason)}]" if reason is not None else "")
        if reason is not None and conn.version == MQTT_5 and conn.session is not None:
            props = Properties(reason_string=text[:200]) if text else NO_PROPERTIES
            conn.send(codec.encode(Disconnect(reason, props), MQTT_5))
        self.detach(conn, publish_will=will)
        conn.close_after_write()

    # ------------------------------------------------------------------ CONNECT

    def on_connect(self, conn: Connection, pkt: Connect, assigned: str | None) -> None:
        version = pkt.protocol_version
        conn.version = version
        conn.reader.version = version
        client_id = assigned or pkt.client_id
        conn.client_id = client_id
        props = pkt.properties
        v5 = version == MQTT_5
        if props.authentication_method is not None:
            return self._refuse(conn, reasons.BAD_AUTHENTICATION_METHOD,
                                f"authentication method {props.authentication_method!r} is not supported")
        if pkt.will is not None:
            try:
                validate_topic_name(pkt.will.topic)
            except ProtocolError as exc:
                return self._refuse(conn, exc.reason, f"will topic: {exc.message}")
            if pkt.will.topic.startswith("$SYS/") or pkt.will.topic == "$SYS":
                return self._refuse(conn, reasons.NOT_AUTHORIZED, "$SYS is read-only for clients")
            if (pkt.will.properties.payload_format_indicator == 1 and not _utf8(pkt.will.payload)):
                return self._refuse(conn, reasons.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8")
            if pkt.will.retain and not self.limits.retain_available:
                return self._refuse(conn, reasons.RETAIN_NOT_SUPPORTED, "retain is not available")
        if v5:
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if pkt.clean_start else NEVER
        capped_expiry = min(expiry, self.limits.max_session_expiry)
        keepalive = pkt.keepalive
        server_keepalive = None
        if v5 and (keepalive > self.limits.max_keepalive or keepalive == 0):
            keepalive = self.limits.max_keepalive
            server_keepalive = keepalive
        conn.keepalive = keepalive
        if v5:
            conn.send_window = min(props.receive_maximum or 65535, self.limits.max_inflight)
            conn.max_packet_out = props.maximum_packet_size
            conn.alias_max_out = props.topic_alias_maximum or 0
            conn.problem_info = props.request_problem_information != 0
        else:
            conn.send_window = self.limits.max_inflight

        sess = self.sessions.get(client_id)
        if sess is not None and sess.conn is not None:
            old = sess.conn
            log.info("client %s taken over by a new connection from %s", client_id, conn.peer)
            publish_old_will = pkt.clean_start or (sess.will is not None and sess.will.delay == 0)
            self.close(old, reasons.SESSION_TAKEN_OVER, "session taken over", will=publish_old_will)
        session_present = False
        if sess is not None and sess.conn is None and (end := sess.expires_at()) is not None \
                and time.time() >= end:  # expired, and the sweep has not got to it yet
            if sess.will is not None:
                self._publish_will(sess)
            self._end_session(sess)
            sess = None
        if sess is not None and (pkt.clean_start or not sess.persistent):
            if sess.will is not None and sess.will_due is not None:
                self._publish_will(sess)  # a will delay never outlives the session
            self._end_session(sess)
            sess = None
        if sess is None:
            if len(self.sessions) >= self.max_sessions:
                return self._refuse(conn, reasons.QUOTA_EXCEEDED if v5 else reasons.SERVER_UNAVAILABLE,
                                    "session limit reached")
            sess = Session(client_id, version, capped_expiry)
            self.sessions[client_id] = sess
        else:
            session_present = True
            sess.version = version
            sess.expiry_interval = capped_expiry
        sess.will = None
        sess.will_due = None
        if pkt.will is not None:
            w = pkt.will
            sess.will = WillState(w.topic, w.payload, w.qos, w.retain, w.properties,
                                  w.properties.will_delay_interval or 0)
        sess.conn = conn
        sess.disconnected_at = None
        conn.session = sess
        self.connections.add(conn)
        if sess.persistent:
            self._persist_session(sess)
        elif client_id in self.stored:
            self._forget_stored(sess)
        cprops = NO_PROPERTIES
        if v5:
            cprops = Properties(
                receive_maximum=self.limits.receive_maximum,
                topic_alias_maximum=self.limits.topic_alias_maximum or None,
                maximum_packet_size=self.limits.max_packet_size,
                assigned_client_identifier=assigned,
                server_keep_alive=server_keepalive,
                session_expiry_interval=capped_expiry if capped_expiry != expiry else None,
                retain_available=0 if not self.limits.retain_available else None,
            )
        conn.send(codec.encode(ConnAck(session_present, reasons.SUCCESS, cprops), version))
        conn.connected = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected from %s (protocol %d, shard %d, present=%s)",
                      client_id, conn.peer, version, self.shard, session_present)
        if session_present:
            self._resume(sess, conn)

    def _refuse(self, conn: Connection, reason: int, text: str) -> None:
        log.info("refusing CONNECT from %s (%s): %s [%s]", conn.client_id, conn.peer, text, reasons.name(reason))
        if conn.version == MQTT_5:
            props = Properties(reason_string=text[:200])
            conn.send(codec.encode(ConnAck(False, reason, props), MQTT_5))
        else:
            code = reasons.V5_TO_V3_CONNACK.get(reason)
            if code is not None:
                conn.send(codec.encode(ConnAck(False, code), conn.version))
        conn.close_after_write()

    # ------------------------------------------------------------------ sessions

    def _persist_session(self, sess: Session) -> None:
        will = None
        if sess.will is not None:
            w = sess.will
            will = StoredWill(w.topic, w.payload, w.qos, w.retain, w.properties, w.delay)
        rec = SessionRecord(sess.client_id, sess.version, sess.expiry_interval,
                            sess.disconnected_at, tuple(sess.subscriptions.values()), will)
        batch = self._batch()
        batch.put_session(rec)
        if not self.stored:  # alive marks resume with the first stored session (see tick)
            now = time.time()
            batch.set_meta("alive_at", now)
            self._alive_written = now
        self.stored.add(sess.client_id)

    def detach(self, conn: Connection, *, publish_will: bool) -> None:
        """The connection is gone (or going): the session carries on or ends."""
        self.connections.discard(conn)
        sess = conn.session
        conn.session = None
        if sess is None or sess.conn is not conn:
            return
        sess.conn = None
        sess.disconnected_at = time.time()
        if not publish_will:
            sess.will = None
        if not sess.persistent:
            if sess.will is not None:
                self._publish_will(sess)
            self._end_session(sess)
            return
        if sess.will is not None:
            delay = min(sess.will.delay, sess.expiry_interval)
            if delay <= 0:
                self._publish_will(sess)
            else:
                sess.will_due = sess.disconnected_at + delay
        self._persist_session(sess)

    def _publish_will(self, sess: Session) -> None:
        w = sess.will
        sess.will = None
        sess.will_due = None
        if w is None:
            return
        expiry = w.properties.message_expiry_interval
        props = replace(w.properties, will_delay_interval=None) if w.properties is not NO_PROPERTIES else w.properties
        msg = Message(w.topic, w.payload, w.qos, w.retain, props,
                      time.time() + expiry if expiry is not None else None, sess.client_id)
        log.debug("publishing will of %s to %s", sess.client_id, w.topic)
        self.route(msg)

    def _end_session(self, sess: Session) -> None:
        for flt in list(sess.subscriptions):
            self._remove_subscription(sess, flt)
        self.sessions.pop(sess.client_id, None)
        if sess.client_id in self.stored:
            self._forget_stored(sess)
        # Shared-subscription messages this session had not acknowledged go to another member
        # of their group rather than being lost with it [MQTT-4.8.2, "SHOULD"].
        stranded = [(o.message, o.group) for o in sess.inflight.values()
                    if o.group is not None and o.message is not None and o.state != AWAIT_PUBCOMP]
        stranded += [(q.message, q.group) for q in sess.queue if q.group is not None]
        sess.inflight.clear()
        sess.queue.clear()
        for msg, (group, flt) in stranded:
            self._deliver_shared(msg, group, flt, 0)

    def publish_stats(self) -> None:
        """This shard's counters as ``$SYS/shardbroker/shard/N/<name>`` (QoS 0, not retained)."""
        values = dict(self.stats)
        values.update(
            connections=len(self.connections), sessions=len(self.sessions),
            filters=len(self.filter_refs), store_full=int(self.store_full),
            bus_sent=self.bus.sent, bus_received=self.bus.received,
            handover_pending=sum(len(v) for v in self.handover.pending.values()),
        )
        for name, value in values.items():
            self.route(Message(f"$SYS/shardbroker/shard/{self.shard}/{name}", str(value).encode(), 0, False))

    def _check_fill(self, mono: float) -> None:
        """Refuse new QoS 1/2 work while the store is nearly full: the headroom left is what
        draining queues needs (LMDB writes even to delete). A failed commit also sets it."""
        try:
            fill = self.store.fill()
        except StoreError as exc:
            log.error("shard %d: cannot read store fill: %s", self.shard, exc)
            return
        full = fill >= STORE_FULL_AT or mono - self._hard_full_at < STORE_FULL_RETRY
        if full != self.store_full:
            if full:
                log.warning("shard %d: message store %.0f%% full: refusing new QoS 1/2 publishes",
                            self.shard, 100 * fill)
            else:
                log.warning("shard %d: message store %.0f%% full: accepting QoS 1/2 again",
                            self.shard, 100 * fill)
            self.store_full = full

    def _forget_stored(self, sess: Session) -> None:
        """Delete the session's stored rows; its in-memory state no longer points at them."""
        self._batch().delete_session(sess.client_id)
        self.stored.discard(sess.client_id)
        for q in sess.queue:
            if q.seq is not None:
                q.seq = None
                q.message.unref()
        for out in sess.inflight.values():
            if out.message is not None:
                out.message.unref()

    def tick(self, now: float, mono: float) -> None:
        """Periodic sweep: store fill, keepalive, delayed wills, session expiry."""
        self._check_fill(mono)
        interval = self.config.server.sys_interval
        if interval and mono - self._sys_published >= interval:
            self._sys_published = mono
            self.publish_stats()
        if self.stored and now - self._alive_written >= ALIVE_EVERY:
            # How long a crash lasted, for the expiry of stored sessions; a shard without any
            # writes nothing (an fsync a second would stall its loop for nothing).
            self._batch().set_meta("alive_at", now)
            self._alive_written = now
        held = self.flow.held
        for conn in list(self.connections):
            if (conn.keepalive and conn.connected and mono - conn.last_rx > conn.keepalive * 1.5
                    and conn not in held):  # a client we stopped reading may have sent a PINGREQ
                self.close(conn, reasons.KEEP_ALIVE_TIMEOUT, f"keepalive {conn.keepalive}s expired")
        for sess in list(self.sessions.values()):
            if sess.conn is not None:
                continue
            if sess.will_due is not None and now >= sess.will_due:
                self._publish_will(sess)
                if sess.persistent:
                    self._persist_session(sess)
            end = sess.expires_at()
            if end is not None and now >= end:
                log.debug("session %s expired", sess.client_id)
                if sess.will is not None:
                    self._publish_will(sess)
                self._end_session(sess)
        for peer in self.handover.overdue(mono):
            for again in self.handover.resend(peer, mono):
                self.bus.send(peer, again)
        if self.batch is not None or self.retained_ops or self.bus.has_pending():
            self.schedule_flush()

    # ------------------------------------------------------------------ PUBLISH in

    def on_publish(self, conn: Connection, pkt: Publish) -> None:
        sess = conn.session
        assert sess is not None
        v5 = conn.version == MQTT_5
        topic = pkt.topic
        props = pkt.properties
        if v5 and props.topic_alias is not None:
            alias = props.topic_alias
            if alias == 0 or alias > self.limits.topic_alias_maximum:  # [MQTT-3.3.2-9/10]
                raise ProtocolError(reasons.TOPIC_ALIAS_INVALID, f"topic alias {alias} out of range")
            if topic:
                conn.aliases_in[alias] = topic
            else:
                known = conn.aliases_in.get(alias)
                if known is None:
                    raise ProtocolError(reasons.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
        if props.subscription_identifiers:  # [MQTT-3.3.4-6]
            raise ProtocolError(reasons.PROTOCOL_ERROR, "Subscription Identifier in a PUBLISH from a client")
        if topic not in self._valid_topics:
            validate_topic_name(topic)
            if len(self._valid_topics) >= VALID_TOPICS_KEPT:
                self._valid_topics.clear()
            self._valid_topics.add(topic)
        qos = pkt.qos
        pid = pkt.packet_id
        if qos == 2 and pid in sess.qos2_in:  # a resend of one we have: acknowledge again only
            conn.send(codec.encode(PubRec(pid), conn.version))
            return
        if qos and v5:  # 3.1.1 has no Receive Maximum: its clients are not held to one
            # Unacknowledged = QoS 1 not yet PUBACKed (acks leave at the next flush) + QoS 2 before PUBCOMP.
            if qos == 1:
                conn.unacked_in += 1
            if conn.unacked_in + len(sess.qos2_in) + (qos == 2) > self.limits.receive_maximum:
                raise ProtocolError(reasons.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
        self.stats["received"] += 1
        code = reasons.SUCCESS
        if props.payload_format_indicator == 1 and not _utf8(pkt.payload):
            if qos == 0:
                raise ProtocolError(reasons.PAYLOAD_FORMAT_INVALID, "payload is not UTF-8")
            code = reasons.PAYLOAD_FORMAT_INVALID
        elif pkt.retain and not self.limits.retain_available:
            raise ProtocolError(reasons.RETAIN_NOT_SUPPORTED, "retain is not available")
        elif topic.startswith("$SYS/") or topic == "$SYS":
            log.info("dropping publish from %s to read-only %s", conn.client_id, topic)
            code = reasons.NOT_AUTHORIZED
        elif self._deny_publish and self._deny_publish.match(topic):
            log.info("dropping publish from %s to %s (acl.deny_publish)", conn.client_id, topic)
            code = reasons.NOT_AUTHORIZED
        elif qos and self.store_full:
            if not v5:  # 3.1.1 cannot refuse a PUBLISH, and must not acknowledge what it cannot keep
                raise ProtocolError(reasons.QUOTA_EXCEEDED, "message store full: QoS 1/2 refused")
            code = reasons.QUOTA_EXCEEDED
        else:
            if props.topic_alias is not None:
                props = replace(props, topic_alias=None)
            expires_at = None
            expiry = props.message_expiry_interval
            cap = self.limits.max_message_expiry
            if cap and (expiry is None or expiry > cap):
                expiry = cap
            if expiry is not None:
                expires_at = time.time() + expiry
            msg = Message(topic, pkt.payload, qos, pkt.retain, props, expires_at, conn.client_id)
            matched = self.route(msg)
            if not matched and v5 and qos:
                code = reasons.NO_MATCHING_SUBSCRIBERS
        if qos == 1:
            conn.send(_ACK(0x40, 2, pid) if code == 0 or not v5
                      else codec.encode(PubAck(pid, code), MQTT_5))  # type: ignore[arg-type]
        elif qos == 2:
            if code < 0x80:
                sess.qos2_in.add(pid)  # type: ignore[arg-type]
                if sess.persistent:
                    self._batch().add_qos2_incoming(sess.client_id, pid)
            conn.send(_ACK(0x50, 2, pid) if code == 0 or not v5
                      else codec.encode(PubRec(pid, code), MQTT_5))  # type: ignore[arg-type]

    def on_pubrel(self, conn: Connection, pkt: PubRel) -> None:
        sess = conn.session
        assert sess is not None
        code = reasons.SUCCESS
        if pkt.packet_id in sess.qos2_in:
            sess.qos2_in.discard(pkt.packet_id)
            if sess.persistent:
                self._batch().remove_qos2_incoming(sess.client_id, pkt.packet_id)
        else:
            code = reasons.PACKET_IDENTIFIER_NOT_FOUND
        conn.send(codec.encode(PubComp(pkt.packet_id, code if conn.version == MQTT_5 else 0), conn.version))

    # ------------------------------------------------------------------ routing

    def route(self, msg: Message) -> bool:
        """Send a publish to every shard that wants it (this one included). True if any does."""
        if msg.retain:
            self._retain(msg)
        targets = self.routes.targets(msg.topic)
        if len(self.synced) < self.shards - 1 and msg.qos:
            # A peer whose routes we do not know yet (it is starting) may have persistent
            # subscribers: send it QoS 1/2 durably and let it match; it drops what it has no use for.
            targets = dict(targets)
            for peer in self.bus.peers:
                if peer not in self.synced:
                    known = targets.get(peer)
                    targets[peer] = Target(True, list(known.groups) if known else [], True)
        if not targets:
            return False
        wire = None
        for shard, target in targets.items():
            if shard == self.shard:
                self.deliver_local(msg, target.plain, target.groups, 0)
            else:
                if wire is None:
                    wire = message_to_wire(msg)
                self._forward(shard, msg, [wire, target.plain, target.groups, 0], target.durable)
        return True

    def _forward(self, peer: int, msg: Message, body: list[Any], durable: bool) -> None:
        """Hand a publish to another shard: QoS 1/2 for a persistent session there through the
        durable outbox (``handover``), everything else straight over the bus."""
        size = len(msg.payload) + len(msg.topic)
        if msg.qos and durable:
            self.bus.send(peer, self.handover.send(peer, body, self._batch(), time.monotonic()), size)
        else:
            self.bus.send(peer, ["p", *body], size)
        self.stats["forwarded"] += 1
        self.schedule_flush()

    def _route_keys(self) -> dict[str, bool]:
        return {key: key in self.durable_refs for key in self.filter_refs}

    def _retain(self, msg: Message) -> None:
        if not msg.payload:  # [MQTT-3.3.1-6/7]: an empty payload deletes
            self.retained_ops.append((msg.topic, None))
        else:
            self.retained_ops.append((msg.topic, StoredMessage(
                msg.topic, msg.payload, msg.qos, True, msg.properties, msg.expires_at)))
        self.schedule_flush()

    def deliver_local(self, msg: Message, plain: bool, groups: Iterable[tuple[str, str]], hops: int) -> None:
        if msg.expires_at is not None and time.time() >= msg.expires_at:
            self.stats["expired"] += 1
            return
        if plain:
            matches = self.subs.match(msg.topic)
            if len(matches) == 1:
                for cid, sub in matches[0][1].items():
                    if sub.no_local and cid == msg.origin:
                        continue
                    sess = self.sessions.get(cid)
                    if sess is not None:
                        self.deliver(sess, msg, min(msg.qos, sub.qos), msg.retain and sub.retain_as_published,
                                     (sub.subscription_id,) if sub.subscription_id else ())
            elif matches:
                # Overlapping subscriptions: one copy at the highest QoS with every identifier.
                agg: dict[str, list[Any]] = {}
                for _flt, entries in matches:
                    for cid, sub in entries.items():
                        if sub.no_local and cid == msg.origin:
                            continue
                        a = agg.get(cid)
                        if a is None:
                            a = agg[cid] = [0, False, []]
                        a[0] = max(a[0], sub.qos)
                        a[1] = a[1] or sub.retain_as_published
                        if sub.subscription_id:
                            a[2].append(sub.subscription_id)
                for cid, (qos, rap, ids) in agg.items():
                    sess = self.sessions.get(cid)
                    if sess is not None:
                        self.deliver(sess, msg, min(msg.qos, qos), msg.retain and rap, tuple(sorted(ids)))
        for group, flt in groups:
            self._deliver_shared(msg, group, flt, hops)

    def _deliver_shared(self, msg: Message, group: str, flt: str, hops: int) -> None:
        entries = self.shared_subs.get(flt) or {}
        members = [(cid, sub) for (g, cid), sub in entries.items() if g == group]
        if not members:
            others = [s for s in self.routes.shards_for_group(group, flt) if s != self.shard]
            if others and hops < MAX_HOPS:
                self._forward(others[hops % len(others)], msg,
                              [message_to_wire(msg), False, [(group, flt)], hops + 1], True)
            return
        online = [m for m in members if (s := self.sessions.get(m[0])) is not None and s.conn is not None]
        pool = online or members
        k = (group, flt)
        n = self._rr.get(k, 0)
        self._rr[k] = n + 1
        cid, sub = pool[n % len(pool)]
        sess = self.sessions.get(cid)
        if sess is not None:
            self.deliver(sess, msg, min(msg.qos, sub.qos), msg.retain and sub.retain_as_published,
                         (sub.subscription_id,) if sub.subscription_id else (), (group, flt))

    def on_bus(self, items: list[list[Any]]) -> None:
        for item in items:
            try:
                kind = item[0]
                if kind == "p":
                    groups = item[3]
                    self.deliver_local(message_from_wire(item[1]), item[2],
                                       [tuple(g) for g in groups] if groups else (), item[4])
                elif kind == "P":
                    origin = item[1]
                    verdict = self.handover.accept(origin, item[2])
                    if verdict == APPLY:
                        self.deliver_local(message_from_wire(item[3]), item[4], [tuple(g) for g in item[5]], item[6])
                    elif verdict == GAP and origin not in self._replay_asked:
                        log.info("shard %d: hand-over gap from shard %d (got %d, mark %d): asking for a resend",
                                 self.shard, origin, item[2], self.handover.mark(origin))
                        self._replay_asked.add(origin)
                        self.bus.send(origin, ["PR", self.shard, self.handover.mark(origin)])
                elif kind == "PA":
                    self.handover.acknowledged(item[1], item[2], self._batch(), time.monotonic())
                elif kind == "PR":
                    for again in self.handover.resend(item[1], time.monotonic()):
                        self.bus.send(item[1], again)
                elif kind == "r+":
                    self.routes.add(item[1], item[2], bool(item[4]))
                    if item[3]:
                        self.bus.send(item[1], ["ra", self.shard, item[3]])
                elif kind == "r-":
                    self.routes.remove(item[1], item[2])
                elif kind == "ra":
                    wait = self._route_waits.get(item[2])
                    if wait is not None:
                        wait[0].discard(item[1])
                        if not wait[0]:
                            del self._route_waits[item[2]]
                            if not wait[1].done():
                                wait[1].set_result(None)
                elif kind == "s?":
                    self.bus.send(item[1], ["s", self.shard, self._route_keys()])
                elif kind == "s":
                    log.debug("shard %d: routes of shard %d: %d filters", self.shard, item[1], len(item[2]))
                    self.routes.replace(item[1], {str(k): bool(v) for k, v in item[2].items()})
                    self.synced.add(item[1])
                    for again in self.handover.resend(item[1], time.monotonic()):  # it (re)started
                        self.bus.send(item[1], again)
                else:
                    log.warning("bus: unknown item kind %r", kind)
            except Exception:
                log.exception("bus: bad item %r", item[:1])
        self.schedule_flush()

    # ------------------------------------------------------------------ the rest

    def on_pingreq(self, conn: Connection, pkt: PingReq) -> None:
        conn.send(codec.encode(PingResp(), conn.version))

    def on_disconnect(self, conn: Connection, pkt: Disconnect) -> None:
        sess = conn.session
        assert sess is not None
        new_expiry = pkt.properties.session_expiry_interval
        if conn.version == MQTT_5 and new_expiry is not None:
            if sess.expiry_interval == 0 and new_expiry != 0:  # [MQTT-3.14.2-2]
                raise ProtocolError(reasons.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT")
            sess.expiry_interval = min(new_expiry, self.limits.max_session_expiry)
        publish_will = conn.version == MQTT_5 and pkt.reason_code == reasons.DISCONNECT_WITH_WILL
        log.debug("client %s disconnected (reason 0x%02X)", conn.client_id, pkt.reason_code)
        self.detach(conn, publish_will=publish_will)
        conn.close_after_write()

    def on_auth(self, conn: Connection, pkt: Auth) -> None:
        # No authentication method was agreed in CONNECT, so AUTH is a protocol error [MQTT-4.12.0-1].
        raise ProtocolError(reasons.PROTOCOL_ERROR, "AUTH without an authentication method")

    def shutdown(self) -> None:
        """Server shutting down: 5.0 clients are told 0x8B; sessions stay as they are stored."""
        for conn in list(self.connections):
            if conn.version == MQTT_5 and conn.session is not None:
                conn.send(codec.encode(Disconnect(reasons.SERVER_SHUTTING_DOWN), MQTT_5))
            sess = conn.session
            if sess is not None and sess.persistent:
                sess.conn = None
                sess.disconnected_at = time.time()
                self._persist_session(sess)  # the will stays: it fires after restart as for a lost link
            conn.session = None
            conn.close_after_write()
        self.flush()



def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _message_from_stored(smsg: StoredMessage, msg_id: int | None) -> Message:
    return Message(smsg.topic, smsg.payload, smsg.qos, smsg.retain, smsg.properties, smsg.expires_at,
                   None, msg_id, refs=1 if msg_id is not None else 0)
