"""PUBLISH and PUBREL from a client: checks, acknowledgement, and the hand-off to routing.

A PUBLISH is checked (topic alias, topic name, receive maximum, payload format,
retain, access rules, a full store), turned into a ``Message`` (aliases resolved,
expiry capped and made absolute) and routed (``Peers.route``). Its acknowledgement
(PUBACK for QoS 1, PUBREC for QoS 2) is queued on the client's output, which the
flush writes only after the commit of everything the publish stored. Incoming QoS 2
packet ids are kept until PUBREL (durably for persistent sessions), so a resend is
acknowledged again and never routed twice. While the publisher is held back
(``backpressure.py``) its PUBACKs and PUBRECs wait, in order; PUBCOMP never does (its
PUBREC has been sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from shardbroker.config import LimitsConfig
from shardbroker.core.access import AccessRules
from shardbroker.core.backpressure import Backpressure
from shardbroker.core.client import PAUSED_BY_RATE, Client
from shardbroker.core.clock import EventTime, Scheduler
from shardbroker.core.commit import Commit
from shardbroker.core.output import Output
from shardbroker.core.peers import Peers
from shardbroker.core.replicas import RESEND_HAD, RESEND_NEW, RESEND_WAITS
from shardbroker.core.session import Message, Session
from shardbroker.core.topics import beyond_limits, validate_topic_name
from shardbroker.protocol import codec, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    MQTT_5,
    PacketType,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)

log = logging.getLogger("shardbroker.inbound")

VALID_TOPICS_KEPT = 10000  # topic names remembered as valid (forgotten all at once when full)
RECEIVED_BY_QOS = ("received_qos0", "received_qos1", "received_qos2")  # counter names in ``stats``
RATE_PATIENCE = 10.0  # seconds a client may keep publishing over its rate before it is disconnected


class Inbound:
    def __init__(self, limits: LimitsConfig, access: AccessRules, peers: Peers, commit: Commit, output: Output,
                 time: EventTime, stats: dict[str, int], scheduler: Scheduler) -> None:
        self.limits = limits
        self.scheduler = scheduler
        self._rated = bool(limits.max_publish_rate or limits.max_publish_bytes_rate)
        self._rates: dict[Client, list[float]] = {}  # client -> [second, packets, bytes, over since]
        self.access = access
        self.peers = peers
        self.commit = commit
        self.output = output
        self.time = time
        self.stats = stats
        self._valid_topics: set[str] = set()  # topic names already checked (bounded)
        self.backpressure: Backpressure  # set by the broker
        # a persistent session's incoming QoS 2 packet ids changed: copied to its shard's backup
        self.replicate: Callable[[str], None] = lambda client_id: None
        # a QoS 2 resend (DUP) under an id the session does not hold: new, waiting for a lost
        # node's session (unacknowledged), or taken by the other session of a merge
        # (``Replicas.resent``)
        self.resent: Callable[[Client, Session, Publish], int] = lambda client, sess, pkt: RESEND_NEW

    def on_publish(self, client: Client, sess: Session, pkt: Publish) -> None:
        if self._rated:
            self._meter(client, len(pkt.payload))
        v5 = client.version == MQTT_5
        topic = pkt.topic
        props = pkt.properties
        if v5 and props.topic_alias is not None:
            alias = props.topic_alias
            if alias == 0 or alias > self.limits.topic_alias_maximum:
                # [MQTT-3.3.2-8], [MQTT-3.2.2-17]; 3.3.4 "A Topic Alias value of 0 or greater than
                # the Maximum Topic Alias is a Protocol Error, the receiver uses DISCONNECT with
                # Reason Code of 0x94 (Topic Alias invalid)".
                raise ProtocolError(reasons.TOPIC_ALIAS_INVALID, f"topic alias {alias} out of range")
            aliases = client.aliases_in
            if topic:
                if aliases is None:
                    aliases = client.aliases_in = {}
                aliases[alias] = topic
            else:
                known = aliases.get(alias) if aliases is not None else None
                if known is None:  # 3.3.4 "... a zero length Topic Name field it is a Protocol Error"
                    raise ProtocolError(reasons.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
        elif v5 and not topic:
            # 3.3.2.1 "It is a Protocol Error if the Topic Name is zero length and there is no
            # Topic Alias" (3.1.1: an invalid topic name [MQTT-4.7.3-1], closed).
            raise ProtocolError(reasons.PROTOCOL_ERROR, "empty topic name without a topic alias")
        if props.subscription_identifiers:  # [MQTT-3.3.4-6]
            raise ProtocolError(reasons.PROTOCOL_ERROR, "Subscription Identifier in a PUBLISH from a client")
        response_topic = props.response_topic
        if response_topic is not None and ("+" in response_topic or "#" in response_topic):  # [MQTT-3.3.2-14]
            raise ProtocolError(reasons.PROTOCOL_ERROR, "wildcard in the Response Topic")
        if topic not in self._valid_topics:
            validate_topic_name(topic)
            beyond = beyond_limits(topic, self.limits.max_topic_levels, self.limits.max_topic_length)
            if beyond is not None:
                raise ProtocolError(reasons.TOPIC_NAME_INVALID, f"topic name {beyond}")
            if len(self._valid_topics) >= VALID_TOPICS_KEPT:
                self._valid_topics.clear()
            self._valid_topics.add(topic)
        qos = pkt.qos
        pid = pkt.packet_id
        if qos == 2 and pid is not None and sess.has_qos2_in(pid):  # a resend of one we have: acknowledge again only
            self._ack(client, codec.encode(PubRec(pid), client.version))
            return
        if qos == 2 and pkt.dup:
            resent = self.resent(client, sess, pkt)
            if resent == RESEND_WAITS:
                return
            if resent == RESEND_HAD:
                self._had(client, sess, pid)  # type: ignore[arg-type]
                return
        if qos and v5:  # 3.1.1 has no Receive Maximum: its clients are not held to one
            # Unacknowledged = QoS 1 not yet PUBACKed (acks leave at the next flush) + QoS 2 before PUBCOMP.
            if qos == 1:
                client.unacked_in += 1
            if client.unacked_in + len(sess.qos2_in or ()) + (qos == 2) > self.limits.receive_maximum:
                raise ProtocolError(reasons.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
        stats = self.stats
        stats["received"] += 1
        stats[RECEIVED_BY_QOS[qos]] += 1
        stats["received_bytes"] += len(pkt.payload)  # payload bytes, as Mosquitto's publish/bytes/received
        code = reasons.SUCCESS
        if props.payload_format_indicator == 1 and not is_utf8(pkt.payload):
            if qos == 0:
                raise ProtocolError(reasons.PAYLOAD_FORMAT_INVALID, "payload is not UTF-8")
            code = reasons.PAYLOAD_FORMAT_INVALID
        elif pkt.retain and not self.limits.retain_available:
            raise ProtocolError(reasons.RETAIN_NOT_SUPPORTED, "retain is not available")
        elif (denied := self.access.publish_denied(topic, client.acl)) is not None:
            log.info("dropping publish from %s to %s: %s", client.client_id, topic, denied)
            code = reasons.NOT_AUTHORIZED
        elif qos and self.commit.store_full:
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
                expires_at = self.time.wall + expiry
            msg = Message(topic, pkt.payload, qos, pkt.retain, props, expires_at, client.client_id)
            matched = self.peers.route(msg)
            if not matched and v5 and qos:
                code = reasons.NO_MATCHING_SUBSCRIBERS
        if qos == 1:
            self._ack(client, codec.encode_ack(PacketType.PUBACK, pid) if code == 0 or not v5  # type: ignore[arg-type]
                      else codec.encode(PubAck(pid, code), MQTT_5))  # type: ignore[arg-type]
        elif qos == 2:
            if code < 0x80:
                self._keep_qos2_id(sess, pid)  # type: ignore[arg-type]
            self._ack(client, codec.encode_ack(PacketType.PUBREC, pid) if code == 0 or not v5  # type: ignore[arg-type]
                      else codec.encode(PubRec(pid, code), MQTT_5))  # type: ignore[arg-type]
        elif client.withheld is not None:  # held, and QoS 0 has no acknowledgement to hold back
            self.backpressure.pause(client)

    def _keep_qos2_id(self, sess: Session, pid: int) -> None:
        """An incoming QoS 2 publish under ``pid`` is taken: its id is kept until PUBREL
        (stored and copied to the backup for a persistent session)."""
        sess.add_qos2_in(pid)
        if sess.persistent:
            self.commit.batch().add_qos2_incoming(sess.client_id, pid)
            self.replicate(sess.client_id)

    def _had(self, client: Client, sess: Session, pid: int) -> None:
        """A resend of a publish the other session of a merge (a lost node's) had taken, and
        routed, under ``pid`` (which ``sess`` does not hold): acknowledged only, as a resend of
        one held here."""
        self._keep_qos2_id(sess, pid)
        self._ack(client, codec.encode_ack(PacketType.PUBREC, pid))

    def _ack(self, client: Client, data: bytes) -> None:
        """PUBACK/PUBREC: after the commit, and later still while the client is held back."""
        if client.withheld is None:
            self.output.send(client, data)
        else:
            self.backpressure.withhold(client, data)

    def _meter(self, client: Client, size: int) -> None:
        """``limits.max_publish_rate`` / ``max_publish_bytes_rate``: a client over either is not
        read until the next second; one that stays over for ``RATE_PATIENCE`` seconds is
        disconnected (0x96). What it sent before the pause is still handled."""
        limits = self.limits
        mono = self.time.mono
        second = float(int(mono))
        st = self._rates.get(client)
        if st is None:
            st = self._rates[client] = [second, 0.0, 0.0, 0.0]
        elif st[0] != second:
            if second - st[0] > 1.0:  # a whole second without going over: no longer a persistent case
                st[3] = 0.0
            st[0], st[1], st[2] = second, 0.0, 0.0
        st[1] += 1
        st[2] += size
        over = ((limits.max_publish_rate and st[1] > limits.max_publish_rate)
                or (limits.max_publish_bytes_rate and st[2] > limits.max_publish_bytes_rate))
        if not over:
            return
        if not st[3]:
            st[3] = mono
        elif mono - st[3] > RATE_PATIENCE:
            raise ProtocolError(reasons.MESSAGE_RATE_TOO_HIGH,
                                f"over limits.max_publish_rate / max_publish_bytes_rate for {RATE_PATIENCE:.0f} s")
        if not client.paused & PAUSED_BY_RATE:
            self.stats["publish_rate_holds"] += 1
            client.pause_reading(PAUSED_BY_RATE)
            self.scheduler.later(second + 1.0 - mono, lambda _now: client.resume_reading(PAUSED_BY_RATE))

    def set_limits(self, limits: LimitsConfig) -> None:
        """New limits (a reload): topic names are checked against them again; rates are counted
        from scratch (a client paused for its rate is read again at the next second, as before)."""
        self.limits = limits
        self._rated = bool(limits.max_publish_rate or limits.max_publish_bytes_rate)
        self._rates.clear()
        self._valid_topics.clear()

    def forget(self, client: Client) -> None:
        """The client is gone."""
        self._rates.pop(client, None)

    def on_pubrel(self, client: Client, sess: Session, pkt: PubRel) -> None:
        code = reasons.SUCCESS
        if sess.has_qos2_in(pkt.packet_id):
            sess.remove_qos2_in(pkt.packet_id)
            if sess.persistent:
                self.commit.batch().remove_qos2_incoming(sess.client_id, pkt.packet_id)
                self.replicate(sess.client_id)
        else:
            code = reasons.PACKET_IDENTIFIER_NOT_FOUND
        self.output.send(client, codec.encode(PubComp(pkt.packet_id, code if client.version == MQTT_5 else 0),
                                              client.version))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
