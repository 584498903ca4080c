"""Outbound delivery: a message to one session, through the window, the queue and the store.

QoS is already the lower of message and subscription; this decides whether a copy
goes out now (QoS 0, or QoS 1/2 with room in the window), waits in the session
queue (offline, or window full), or is dropped (too large for the client, queue full
by policy, expired). Persistent sessions get their queue and inflight rows written to
the current store batch; ``Message.ref``/``unref`` keep the stored message id valid.
Also the acknowledgements of outbound QoS 1/2 (PUBACK, PUBREC, PUBCOMP) and the resend
of unacknowledged messages on session resume. A copy that lands in a subscriber's
backlog holds its publisher back (``backpressure.py``); an online subscriber's queue
is limited only once it is slow.

It owns no state of its own beyond the sessions it is handed; it writes to the store
batch and to the clients' output, and counts in the shard's statistics.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from shardbroker.config import LimitsConfig
from shardbroker.core.backpressure import QUEUE, QUEUE_HIGH_WATER, QUEUE_LOW_WATER, Backpressure
from shardbroker.core.client import Client
from shardbroker.core.clock import EventTime
from shardbroker.core.output import Output
from shardbroker.core.session import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    Message,
    Outgoing,
    Queued,
    Session,
)
from shardbroker.core.store import Batch
from shardbroker.protocol import codec, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import MQTT_5, PacketType, PubAck, PubComp, PubRec, PubRel
from shardbroker.security.acl import READ
from shardbroker.storage.records import InflightRecord, StoredMessage

log = logging.getLogger("shardbroker.delivery")

DELIVERED_BY_QOS = ("delivered_qos0", "delivered_qos1", "delivered_qos2")  # counter names in ``stats``


class Delivery:
    """Outbound delivery to the sessions of one shard."""

    def __init__(self, limits: LimitsConfig, stats: dict[str, int], time: EventTime, output: Output,
                 batch: Callable[[], Batch]) -> None:
        self.limits = limits
        self.stats = stats
        self.time = time
        self.output = output
        self._batch = batch  # the store batch of this event (``Commit.batch``)
        self.backpressure: Backpressure  # set by the broker (it needs the sessions)
        # a session on its way between nodes (``Session.moving``): whether ``core/moves.py``
        # took the copy (relayed, or already had), so it is not placed here
        self.moving: Callable[[Session, Message, int, bool, tuple[int, ...], tuple[str, str] | None], bool] = (
            lambda sess, msg, qos, retain, sub_ids, group: False)
        # a persistent session's QoS 2 packet ids in use changed: copied to its shard's backup
        self.replicate: Callable[[str], None] = lambda client_id: None
        # sessions still owed retained messages (``Subscriptions._replay``) -> the topics sent to
        # them meanwhile, whose waiting retained message is older and is then not sent
        self.replaying: dict[Session, set[str]] = {}

    def resume(self, sess: Session, client: Client) -> None:
        """Resend unacknowledged messages with DUP (and PUBRELs), then drain the queue."""
        for pid, out in sess.inflight.items():
            if out.message is None and out.state != AWAIT_PUBCOMP:
                continue  # held for a message sent by a node that was lost (``refill``)
            if out.state == AWAIT_PUBCOMP or out.message is None:
                self.output.send(client, codec.encode_ack(PacketType.PUBREL, pid))
            else:
                data = self._publish_bytes(client, out.message, out.qos, out.retain, pid, True, out.sub_ids)
                if data is not None:
                    self.output.send(client, data)
        self.pump(sess)

    def refill(self, sess: Session, pid: int, msg: Message, retain: bool, sub_ids: tuple[int, ...]) -> bool:
        """A QoS 2 message another node's session for this client sent under ``pid`` and saw no
        PUBREC for is here (the two sessions merge, ``core/moves.py``): ``pid`` of ``sess`` is
        held for it (a session taken from a copy, ``core/replicas.py``), or free. It goes
        under that packet id with DUP, so a client that had it takes it as the same one (MQTT
        4.3.3). False when the id is in use here, or ``sess`` has a full window in flight
        (place it as a new message)."""
        out = sess.inflight.get(pid)
        if out is None and len(sess.inflight) < self.limits.max_inflight:
            out = Outgoing(None, 2, False, (), AWAIT_PUBREC)
            sess.track(pid, out)
        if out is None or out.message is not None or out.state == AWAIT_PUBCOMP or out.qos != 2:
            return False
        out.message, out.retain, out.sub_ids = msg, retain, sub_ids
        if sess.persistent:
            b = self._batch()
            if msg.store_id is None:
                msg.store_id = b.add_message(_stored(msg))
            b.put_inflight(sess.client_id, pid, InflightRecord(msg.store_id, 2, AWAIT_PUBREC))
            msg.ref()
        client = sess.client
        if client is not None and not client.closing:
            data = self._publish_bytes(client, msg, 2, retain, pid, True, sub_ids)
            if data is not None:
                self.output.send(client, data)
        return True

    def owe_pubrel(self, sess: Session, pid: int) -> None:
        """Another node's session for this client owed it PUBREL for ``pid`` (the two merge,
        ``core/moves.py``): this one owes it now. An id this one holds for the lost node's
        message (``refill``) is released at once: the client acknowledged that message. One it
        uses itself is left alone (the client holds it for this one's message, and that
        exchange completes it)."""
        out = sess.inflight.get(pid)
        if out is not None:
            if out.message is None and out.state != AWAIT_PUBCOMP:
                self.release(sess, pid)
            return
        sess.track(pid, Outgoing(None, 2, False, (), AWAIT_PUBCOMP))
        self._pubrel_due(sess, pid)

    def release(self, sess: Session, pid: int) -> None:
        """Stop holding ``pid`` for a lost node's message that did not come back: PUBREL (the
        client answers PUBCOMP, whether it had the message or not)."""
        out = sess.inflight.get(pid)
        if out is None or out.message is not None or out.state == AWAIT_PUBCOMP:
            return
        out.state = AWAIT_PUBCOMP
        self._pubrel_due(sess, pid)

    def _pubrel_due(self, sess: Session, pid: int) -> None:
        """``pid`` of ``sess`` now awaits PUBCOMP with no message: stored, copied, and PUBREL
        sent to the client if it is connected."""
        if sess.persistent:
            self._batch().put_inflight(sess.client_id, pid, InflightRecord(None, 2, AWAIT_PUBCOMP))
            self.replicate(sess.client_id)
        client = sess.client
        if client is not None and not client.closing:
            self.output.send(client, codec.encode_ack(PacketType.PUBREL, pid))

    def deliver(self, sess: Session, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                group: tuple[str, str] | None = None) -> None:
        if self.replaying:
            superseding = self.replaying.get(sess)
            if superseding is not None:
                superseding.add(msg.topic)
        if sess.moving is not None and self.moving(sess, msg, qos, retain, sub_ids, group):
            return
        self.place(sess, msg, qos, retain, sub_ids, group)

    def place(self, sess: Session, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
              group: tuple[str, str] | None = None) -> None:
        """Send, queue or drop one copy (``deliver`` without the moving session's check)."""
        client = sess.client
        if client is None or client.closing:
            if not sess.persistent or (qos == 0 and not self.limits.queue_qos0):
                return
            self._enqueue(sess, msg, qos, retain, sub_ids, group, True)
            return
        acl = client.acl
        if acl is not None and not acl.allows(msg.topic, READ):  # the ACL file: not for this client
            self.stats["dropped_not_authorized"] += 1
            return
        if qos == 0:
            if client.transport.write_buffer_full():  # a slow consumer: dropped before any encoding
                self._dropped(sess, queue=False)
            else:
                data = self._publish_bytes(client, msg, 0, retain, None, False, sub_ids)
                if data is not None:
                    self.output.send(client, data)
                    self._sent(0, msg)
        elif sess.queue or len(sess.inflight) >= client.send_window:
            self._enqueue(sess, msg, qos, retain, sub_ids, group, sess.slow)
        else:
            self._send_inflight(sess, client, msg, qos, retain, sub_ids, None, group)
        if sess.backlog:
            self.backpressure.fed(sess, msg.origin)

    def _send_inflight(self, sess: Session, client: Client, msg: Message, qos: int, retain: bool,
                       sub_ids: tuple[int, ...], seq: int | None, group: tuple[str, str] | None) -> None:
        if client.max_packet_out is not None and not self._fits(client, msg, qos, sub_ids):
            # larger than the client accepts: dropped as if delivered [MQTT-3.1.2-25]
            self.stats["dropped_too_large"] += 1
            if seq is not None:
                self._batch().dequeue(sess.client_id, seq)
                msg.unref()
            return
        pid = sess.alloc_pid()
        sess.track(pid, Outgoing(msg, qos, retain, sub_ids, AWAIT_PUBACK if qos == 1 else AWAIT_PUBREC, group))
        if sess.persistent:
            b = self._batch()
            if seq is not None:  # first, so that the store can move a message its queue row holds
                b.dequeue(sess.client_id, seq)
            if msg.store_id is None:
                msg.store_id = b.add_message(_stored(msg))
            b.put_inflight(sess.client_id, pid, InflightRecord(msg.store_id, qos,
                                                                AWAIT_PUBACK if qos == 1 else AWAIT_PUBREC))
            if qos == 2:
                self.replicate(sess.client_id)
            msg.ref()
            if seq is not None:
                msg.unref()
        data = self._publish_bytes(client, msg, qos, retain, pid, False, sub_ids)
        if data is not None:
            self.output.send(client, data)
            self._sent(qos, msg)

    def _sent(self, qos: int, msg: Message) -> None:
        """A copy of ``msg`` goes to a subscriber (resends are not counted again)."""
        stats = self.stats
        stats["delivered"] += 1
        stats[DELIVERED_BY_QOS[qos]] += 1
        stats["delivered_bytes"] += len(msg.payload)  # payload bytes, as Mosquitto's publish/bytes/sent

    def _fits(self, client: Client, msg: Message, qos: int, sub_ids: tuple[int, ...]) -> bool:
        """Whether the PUBLISH (without a topic alias, so an upper bound) fits the client's maximum."""
        props = msg.properties
        if sub_ids or msg.expires_at is not None:
            props = replace(props, subscription_identifiers=sub_ids,
                            message_expiry_interval=msg.remaining_expiry(self.time.wall))
        size = len(codec.encode_publish(msg.topic.encode(), msg.payload, qos, False, False, 1,
                                        codec.encode_properties(props, PacketType.PUBLISH)))
        return client.max_packet_out is None or size <= client.max_packet_out

    def _enqueue(self, sess: Session, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                 group: tuple[str, str] | None, limited: bool) -> None:
        """Queue a copy; ``limited``: the session is offline or slow, so its queue limits apply
        (an online one that keeps acknowledging holds its publishers back instead)."""
        limits = self.limits
        size = len(msg.payload)
        queue = sess.queue
        if queue is None:
            queue = sess.queue = deque()
        while limited and queue and (len(queue) >= limits.max_queued_messages
                                     or sess.queued_bytes + size > limits.max_queued_bytes):
            if limits.queue_full_policy != "drop_oldest":
                self._dropped(sess, queue=True)
                return
            old = queue.popleft()
            sess.queued_bytes -= len(old.message.payload)
            if old.seq is not None:
                self._batch().dequeue(sess.client_id, old.seq)
                old.message.unref()
            self._dropped(sess, queue=True)
        if not limited and len(queue) >= QUEUE_HIGH_WATER and not sess.backlog & QUEUE:
            self.backpressure.start(sess, QUEUE)
        seq = None
        if sess.persistent and (qos > 0 or limits.queue_qos0):
            b = self._batch()
            if msg.store_id is None:
                msg.store_id = b.add_message(_stored(msg))
            seq = b.enqueue(sess.client_id, msg.store_id, qos)
            msg.ref()
        queue.append(Queued(msg, qos, retain, sub_ids, seq, group))
        sess.queued_bytes += size

    def _dropped(self, sess: Session, *, queue: bool) -> None:
        """A message for ``sess`` is dropped, by its queue limits or (QoS 0) a full write buffer:
        counted, and logged once per session."""
        self.stats["dropped_queue_full"] += 1
        sess.dropped += 1
        if sess.dropped == 1:
            if queue:
                why = (f"its queue is full at {sess.queued()} messages / {sess.queued_bytes} bytes "
                       f"({'slow subscriber' if sess.client else 'offline'}, {self.limits.queue_full_policy})")
            else:
                why = "QoS 0 beyond its full write buffer (it reads too slowly)"
            log.warning("session %s: a message dropped: %s; further drops for it are counted, not logged",
                        sess.client_id, why)

    def pump(self, sess: Session) -> None:
        """Move queued messages into the window while there is room."""
        client = sess.client
        if client is None:
            return
        now = self.time.wall
        queue = sess.queue
        if queue is None:
            if sess.slow:
                self._caught_up(sess, 0)
            return
        while queue and len(sess.inflight) < client.send_window:
            q = queue.popleft()
            sess.queued_bytes -= len(q.message.payload)
            expired = q.message.expired(now)
            if expired or (client.acl is not None and not client.acl.allows(q.message.topic, READ)):
                self.stats["expired" if expired else "dropped_not_authorized"] += 1
                if q.seq is not None:
                    self._batch().dequeue(sess.client_id, q.seq)
                    q.message.unref()
                continue
            if q.qos == 0:
                data = self._publish_bytes(client, q.message, 0, q.retain, None, False, q.sub_ids)
                if data is not None:
                    self.output.send(client, data)
                    self._sent(0, q.message)
                if q.seq is not None:
                    self._batch().dequeue(sess.client_id, q.seq)
                    q.message.unref()
                continue
            self._send_inflight(sess, client, q.message, q.qos, q.retain, q.sub_ids, q.seq, q.group)
        if not queue:
            sess.queue = None  # an idle session keeps no empty deque
        if sess.backlog & QUEUE and len(queue) <= QUEUE_LOW_WATER:
            self.backpressure.stop(sess, QUEUE)
        elif sess.slow:
            self._caught_up(sess, len(queue))

    def _publish_bytes(self, client: Client, msg: Message, qos: int, retain: bool, pid: int | None,
                       dup: bool, sub_ids: tuple[int, ...]) -> bytes | None:
        """The PUBLISH for one subscriber, or None when it exceeds the client's Maximum Packet Size.

        QoS 0 copies that differ in nothing per subscriber are encoded once per message.
        """
        version = client.version
        tb = msg.topic_bytes
        if tb is None:
            tb = msg.topic_bytes = msg.topic.encode()
        if version != MQTT_5:
            if qos:
                return codec.encode_publish(tb, msg.payload, qos, retain, dup, pid)
            cache = msg.cache
            if cache is None:
                cache = msg.cache = {}
            key = (version, retain)
            data = cache.get(key)
            if data is None:
                data = cache[key] = codec.encode_publish(tb, msg.payload, 0, retain)
            return data
        expiry = msg.remaining_expiry(self.time.wall) if msg.expires_at is not None else None
        plain = not sub_ids and expiry is None
        if plain and not client.alias_max_out:
            pb = msg.props_bytes
            if pb is None:
                pb = msg.props_bytes = codec.encode_properties(msg.properties, PacketType.PUBLISH)
            if qos:
                data = codec.encode_publish(tb, msg.payload, qos, retain, dup, pid, pb)
            else:
                cache = msg.cache
                if cache is None:
                    cache = msg.cache = {}
                data = cache.get((MQTT_5, retain))
                if data is None:
                    data = cache[(MQTT_5, retain)] = codec.encode_publish(tb, msg.payload, 0, retain, False, None, pb)
        else:
            props = msg.properties
            if not plain:
                props = replace(props, subscription_identifiers=sub_ids, message_expiry_interval=expiry)
            if client.alias_max_out:
                aliases = client.aliases_out
                if aliases is None:
                    aliases = client.aliases_out = {}
                alias = aliases.get(msg.topic)
                if alias is not None:
                    props = replace(props, topic_alias=alias)
                    tb = b""
                elif len(aliases) < client.alias_max_out:
                    alias = len(aliases) + 1
                    aliases[msg.topic] = alias
                    props = replace(props, topic_alias=alias)
            data = codec.encode_publish(tb, msg.payload, qos, retain, dup, pid,
                                        codec.encode_properties(props, PacketType.PUBLISH))
        if client.max_packet_out is not None and len(data) > client.max_packet_out:
            self.stats["dropped_too_large"] += 1
            return None
        return data

    def on_puback(self, client: Client, sess: Session, pkt: PubAck) -> None:
        out = sess.inflight.get(pkt.packet_id)
        if out is None:
            log.debug("%s: PUBACK for unknown packet id %d", client.client_id, pkt.packet_id)
            return
        if out.qos != 1:  # a QoS 2 PUBLISH is answered with PUBREC (4.3.3): a Protocol Error (4.13; 3.1.1: 4.8)
            raise ProtocolError(reasons.PROTOCOL_ERROR, f"PUBACK for QoS 2 packet id {pkt.packet_id}")
        self._acknowledged(sess, pkt.packet_id, out)

    def _acknowledged(self, sess: Session, pid: int, out: Outgoing) -> None:
        """An outgoing QoS 1/2 exchange is over: free its packet id and window slot."""
        sess.untrack(pid)
        self._progress(sess)
        if sess.persistent:
            self._batch().delete_inflight(sess.client_id, pid)
            if out.qos == 2:
                self.replicate(sess.client_id)
            if out.message is not None:
                out.message.unref()
        self.pump(sess)

    def _progress(self, sess: Session) -> None:
        """The subscriber acknowledged something (counted for ``Backpressure.check_slow``)."""
        client = sess.client
        if client is not None:
            client.last_ack = self.time.mono
        if sess.backlog & QUEUE:
            self.backpressure.acked(sess)

    def _caught_up(self, sess: Session, queued: int) -> None:
        """A slow subscriber whose queue is down to the low-water mark is slow no longer: it
        holds its publishers again when it next falls behind (``backpressure.py``)."""
        if queued <= QUEUE_LOW_WATER:
            sess.slow = False
            log.info("subscriber %s has caught up (%d queued): it is no longer slow", sess.client_id, queued)

    def on_pubrec(self, client: Client, sess: Session, pkt: PubRec) -> None:
        out = sess.inflight.get(pkt.packet_id)
        if out is not None and out.qos != 2:  # a QoS 1 PUBLISH is answered with PUBACK (4.3.2): Protocol Error
            raise ProtocolError(reasons.PROTOCOL_ERROR, f"PUBREC for QoS 1 packet id {pkt.packet_id}")
        if out is None:
            if client.version == MQTT_5:
                self.output.send(client, codec.encode(PubRel(pkt.packet_id, reasons.PACKET_IDENTIFIER_NOT_FOUND),
                                                      MQTT_5))
            return
        if pkt.reason_code >= 0x80:  # the client refused it: the exchange ends here
            self._acknowledged(sess, pkt.packet_id, out)
            return
        if out.state != AWAIT_PUBCOMP:
            self._progress(sess)
            out.state = AWAIT_PUBCOMP
            if sess.persistent:
                self._batch().put_inflight(sess.client_id, pkt.packet_id, InflightRecord(None, 2, AWAIT_PUBCOMP))
                self.replicate(sess.client_id)  # its copy says the client has it now
                if out.message is not None:
                    out.message.unref()
            out.message = None
        self.output.send(client, codec.encode_ack(PacketType.PUBREL, pkt.packet_id))

    def on_pubcomp(self, client: Client, sess: Session, pkt: PubComp) -> None:
        out = sess.inflight.get(pkt.packet_id)
        if out is None:
            return
        if out.state != AWAIT_PUBCOMP:  # PUBCOMP answers our PUBREL, which a PUBREC comes before (4.3.3)
            raise ProtocolError(reasons.PROTOCOL_ERROR, f"PUBCOMP for packet id {pkt.packet_id} before PUBREC")
        self._acknowledged(sess, pkt.packet_id, out)


def _stored(msg: Message) -> StoredMessage:
    return StoredMessage(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties, msg.expires_at)
