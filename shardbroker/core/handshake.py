"""CONNECT to CONNACK: what the broker and a client agree on, and the client's session.

``negotiate`` is the pure part: from a CONNECT and the broker's limits it computes
the ``Terms`` of the connection (client id, session expiry, keepalive, windows, the
client's own limits) or a ``Refusal`` with the reason code the spec asks for. The
``Handshake`` then applies the terms to the ``Client``, attaches it to its session
(``Sessions.attach``: takeover, resume or a new session), answers CONNACK and, when
a session was present, resends what it had in flight.

Authentication (``shardbroker.security.auth``) comes between the two: the username and
password are decided by the ``Authenticator``; when a password has to be verified
against a slow hash, ``on_connect`` returns a ``PendingConnect`` and the broker has it
verified away from the loop (a ``Verifier``), holding the client's later packets until
``finish`` has the outcome. Once in, the client gets its view of the ACL file and its
will topic is checked against it. A CONNECT with an Authentication Method is refused
(0x8C): enhanced authentication is not implemented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from shardbroker.config import AuthConfig, LimitsConfig
from shardbroker.core.access import AccessRules
from shardbroker.core.client import PAUSED_BY_AUTH, Client
from shardbroker.core.clock import EventTime, Now, Scheduler
from shardbroker.core.delivery import Delivery
from shardbroker.core.inbound import is_utf8
from shardbroker.core.output import Output
from shardbroker.core.session import NEVER, Session
from shardbroker.core.sessions import Sessions
from shardbroker.core.topics import validate_topic_name
from shardbroker.protocol import codec, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import MQTT_5, NO_PROPERTIES, Auth, ConnAck, Connect, Properties
from shardbroker.security.auth import Authenticator, Failures, Identity, Refused
from shardbroker.security.passwords import PasswordHash

log = logging.getLogger("shardbroker.handshake")


@dataclass(frozen=True, slots=True)
class Terms:
    """What a CONNECT was accepted with."""

    client_id: str
    version: int
    expiry: int  # session expiry interval granted (capped by the broker)
    expiry_capped: bool  # the client asked for more: CONNACK says what it got
    keepalive: int
    server_keepalive: int | None  # set when the broker overrides the client's keepalive (5.0)
    send_window: int  # QoS 1/2 in flight toward the client
    max_packet_out: int | None
    alias_max_out: int
    problem_info: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: int  # 5.0 CONNACK reason code (mapped to a 3.1.1 return code where one exists)
    text: str


@dataclass(eq=False, slots=True)
class PendingConnect:
    """A CONNECT whose password is being verified, and the packets that came behind it."""

    packet: Connect
    terms: Terms
    against: PasswordHash
    stash: list[object] = field(default_factory=list)


class Verifier(Protocol):
    """Verifies a password against a slow hash away from the event loop, then calls ``done``
    on the loop with the outcome and the time."""

    def verify(self, against: PasswordHash, password: bytes, done: Callable[[bool, Now], None]) -> None: ...


class InlineVerifier:
    """Verifies on the event loop at its next turn: for tests and tools; a worker verifies in
    a thread pool instead, so that a slow hash stalls nobody."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def verify(self, against: PasswordHash, password: bytes, done: Callable[[bool, Now], None]) -> None:
        self._scheduler.soon(lambda now: done(against.verify(password), now))


def negotiate(pkt: Connect, assigned_id: str | None, limits: LimitsConfig, access: AccessRules) -> Terms | Refusal:
    version = pkt.protocol_version
    props = pkt.properties
    v5 = version == MQTT_5
    if props.authentication_method is not None:
        return Refusal(reasons.BAD_AUTHENTICATION_METHOD,
                       f"authentication method {props.authentication_method!r} is not supported")
    will = pkt.will
    if will is not None:
        try:
            validate_topic_name(will.topic)
        except ProtocolError as exc:
            return Refusal(exc.reason, f"will topic: {exc.message}")
        if len(will.payload) > limits.max_will_size:
            return Refusal(reasons.PACKET_TOO_LARGE,
                           f"will payload of {len(will.payload)} bytes (limits.max_will_size {limits.max_will_size})")
        if will.properties.payload_format_indicator == 1 and not is_utf8(will.payload):
            return Refusal(reasons.PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8")
        if will.retain and not limits.retain_available:
            return Refusal(reasons.RETAIN_NOT_SUPPORTED, "retain is not available")
    if v5:
        expiry = props.session_expiry_interval or 0
    else:
        expiry = 0 if pkt.clean_start else NEVER
    capped = min(expiry, limits.max_session_expiry)
    keepalive = pkt.keepalive
    server_keepalive = None
    if v5 and (keepalive > limits.max_keepalive or keepalive == 0):
        keepalive = server_keepalive = limits.max_keepalive
    if v5:
        return Terms(assigned_id or pkt.client_id, version, capped, capped != expiry, keepalive, server_keepalive,
                     min(props.receive_maximum or 65535, limits.max_inflight), props.maximum_packet_size,
                     props.topic_alias_maximum or 0, props.request_problem_information != 0)
    return Terms(assigned_id or pkt.client_id, version, capped, capped != expiry, keepalive, None,
                 limits.max_inflight, None, 0, True)


def _host(peer: str) -> str:
    """The address part of ``host:port`` (``[v6]:port`` too)."""
    host = peer.rpartition(":")[0] or peer
    return host.strip("[]")


class Handshake:
    def __init__(self, shard: int, limits: LimitsConfig, access: AccessRules, auth: Authenticator,
                 sessions: Sessions, delivery: Delivery, output: Output, scheduler: Scheduler,
                 time: EventTime, auth_limits: AuthConfig, stats: dict[str, int]) -> None:
        self.shard = shard
        self.scheduler = scheduler
        self.time = time
        self.failures = Failures(ban_after=auth_limits.max_failures, ban=auth_limits.ban_time,
                                 slow_after=3 if auth_limits.max_failures else 1 << 30)
        self.limits = limits
        self.access = access
        self.auth = auth
        self.sessions = sessions
        self.delivery = delivery
        self.output = output
        self.stats = stats  # "auth_failures": CONNECTs refused for their credentials

    def on_connect(self, client: Client, pkt: Connect) -> PendingConnect | None:
        """Answer the CONNECT, or return what must be verified before it can be answered."""
        version = pkt.protocol_version
        client.version = version
        client.reader.version = version  # packets pipelined behind the CONNECT are of its version
        client.client_id = client.assigned_id or pkt.client_id
        terms = negotiate(pkt, client.assigned_id, self.limits, self.access)
        if isinstance(terms, Refusal):
            self._refuse(client, terms)
            return None
        certified = client.transport.identity
        if certified is not None:  # the listener takes the certificate's identity as the username
            pkt = replace(pkt, username=certified, password=None)
            self._authenticated(client, pkt, terms, None, None)
            return None
        if pkt.username is not None and self.failures.banned(_host(client.peer), self.time.mono):
            self.stats["auth_failures"] += 1
            self._refuse(client, Refusal(reasons.NOT_AUTHORIZED, "too many failed attempts from this address"),
                         logging.WARNING)
            return None
        verdict = self.auth.check(pkt.username, pkt.password)
        if isinstance(verdict, PasswordHash):
            return PendingConnect(pkt, terms, verdict)
        self._authenticated(client, pkt, terms, verdict, None)
        return None

    def finish(self, client: Client, pending: PendingConnect, ok: bool) -> None:
        """The password of a pending CONNECT was verified (``ok``) or not."""
        pkt = pending.packet
        assert pkt.username is not None and pkt.password is not None
        verdict = self.auth.verified(pkt.username, pkt.password, pending.against, ok)
        self._authenticated(client, pkt, pending.terms, verdict, pending.against)

    def _authenticated(self, client: Client, pkt: Connect, terms: Terms, verdict: Refused | None,
                       credential: PasswordHash | None) -> None:
        if verdict is not None:
            self.stats["auth_failures"] += 1
            refusal = Refusal(verdict.reason, f"user {pkt.username!r}: {verdict.text}")
            delay = self.failures.failed(_host(client.peer), self.time.mono) if pkt.username is not None else 0.0
            if delay:  # a guesser waits for its answer (the socket is not read meanwhile)
                client.pause_reading(PAUSED_BY_AUTH)
                self.scheduler.later(delay, lambda _now: None if client.closing else self._refuse(
                    client, refusal, logging.WARNING))
                return
            self._refuse(client, refusal, logging.WARNING)
            return
        if pkt.username is not None and self.failures.any():
            self.failures.succeeded(_host(client.peer))
        policy = self.auth.policy
        client.acl = policy.acl_for(pkt.username, terms.client_id)
        will = pkt.will
        if will is not None:
            denied = self.access.publish_denied(will.topic, client.acl)
            if denied is not None:
                self._refuse(client, Refusal(reasons.NOT_AUTHORIZED, f"will topic {will.topic!r}: {denied}"))
                return
        self._accept(client, pkt, terms)
        if client.connected and (pkt.username is not None or policy.passwords is not None or policy.acl is not None):
            self.sessions.clients[client] = Identity(pkt.username, credential)  # for a reload

    def _accept(self, client: Client, pkt: Connect, terms: Terms) -> None:
        client.keepalive = terms.keepalive
        client.send_window = terms.send_window
        client.max_packet_out = terms.max_packet_out
        client.alias_max_out = terms.alias_max_out
        client.problem_info = terms.problem_info
        attached = self.sessions.attach(client, terms.client_id, terms.version, terms.expiry, pkt.clean_start,
                                        pkt.will)
        if attached is None:
            return self._refuse(client, Refusal(reasons.QUOTA_EXCEEDED if terms.version == MQTT_5
                                                else reasons.SERVER_UNAVAILABLE, "session limit reached"))
        sess, present = attached
        self.output.send(client, codec.encode(ConnAck(present, reasons.SUCCESS, self._connack_properties(client, terms)),
                                              terms.version))
        client.connected = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected from %s (protocol %d, shard %d, present=%s)",
                      terms.client_id, client.peer, terms.version, self.shard, present)
        if present:
            self.delivery.resume(sess, client)

    def _connack_properties(self, client: Client, terms: Terms) -> Properties:
        if terms.version != MQTT_5:
            return NO_PROPERTIES
        limits = self.limits
        return Properties(
            receive_maximum=limits.receive_maximum,
            topic_alias_maximum=limits.topic_alias_maximum or None,
            maximum_packet_size=limits.max_packet_size,
            assigned_client_identifier=client.assigned_id,
            server_keep_alive=terms.server_keepalive,
            session_expiry_interval=terms.expiry if terms.expiry_capped else None,
            retain_available=0 if not limits.retain_available else None,
        )

    def _refuse(self, client: Client, refusal: Refusal, level: int = logging.INFO) -> None:
        log.log(level, "refusing CONNECT from %s (%s): %s [%s]", client.client_id, client.peer, refusal.text,
                reasons.name(refusal.reason))
        if client.version == MQTT_5:
            props = Properties(reason_string=refusal.text[:200])
            self.output.send(client, codec.encode(ConnAck(False, refusal.reason, props), MQTT_5))
        else:
            code = reasons.V5_TO_V3_CONNACK.get(refusal.reason)
            if code is not None:
                self.output.send(client, codec.encode(ConnAck(False, code), client.version))
        self.output.close(client, f"CONNECT refused: {refusal.text}")

    def on_auth(self, client: Client, sess: Session, pkt: Auth) -> None:
        # No authentication method was agreed in CONNECT, so AUTH is a protocol error [MQTT-4.12.0-1].
        raise ProtocolError(reasons.PROTOCOL_ERROR, "AUTH without an authentication method")
