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
will topic is checked against it. Every decision is the policy of the listener the client
came in on.

Enhanced authentication (MQTT 5, section 4.12) by SCRAM (``security/scram.py``): a CONNECT
with Authentication Method ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` and the client-first
message is answered AUTH 0x18 with the server-first message; the client's AUTH 0x18 with
the client-final message is answered CONNACK with the server-final message, or refused like
a bad password (0x86, counted and slowed down the same way). Until then the client may send
only AUTH or DISCONNECT [MQTT-3.1.2-30], and it has ``limits.connect_timeout`` to finish.
Another method is refused with 0x8C. A connected client that authenticated so may
re-authenticate (AUTH 0x19, same method [MQTT-4.12.1-1], as the same user): answered AUTH
0x18, then AUTH 0x00, or DISCONNECT 0x87 when it fails; its packets go on being handled
meanwhile. AUTH from a client that did not authenticate so is a protocol error [MQTT-4.12.0-7]
(the SCRAM exchanges in progress are ``exchanges``; nothing of them is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from shardbroker.config import AuthConfig, LimitsConfig
from shardbroker.core import clientlog
from shardbroker.core.access import AccessRules
from shardbroker.core.client import PAUSED_BY_AUTH, Client
from shardbroker.core.clock import EventTime, Now, Scheduler, Timer
from shardbroker.core.delivery import Delivery
from shardbroker.core.inbound import is_utf8
from shardbroker.core.output import Output
from shardbroker.core.session import NEVER, Session
from shardbroker.core.sessions import Sessions
from shardbroker.core.topics import validate_topic_name
from shardbroker.protocol import codec, reactions, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Properties,
)
from shardbroker.security import scram
from shardbroker.security.auth import Authenticator, Failures, Identity, Refused
from shardbroker.security.passwords import PasswordHash
from shardbroker.security.scram import ScramExchange, ScramFailed

log = logging.getLogger("shardbroker.handshake")


@dataclass(slots=True)
class Terms:
    """What a CONNECT was accepted with. A value, though not frozen: one is made per CONNECT,
    and a frozen dataclass's ``__init__`` costs an ``object.__setattr__`` per field."""

    client_id: str
    version: int
    expiry: int  # session expiry interval granted (capped by the broker)
    asked: int  # the one the CONNECT asked for
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


@dataclass(eq=False, slots=True)
class Exchange:
    """A SCRAM exchange under way: of a CONNECT (its ``packet`` and ``terms``), or a
    re-authentication of a connected client (both None)."""

    scram: ScramExchange
    packet: Connect | None
    terms: Terms | None
    timer: Timer


AuthReply = tuple[str, bytes]  # (method, data) for the CONNACK's Authentication Method and Data


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
    method = props.authentication_method
    if method is not None and method not in scram.METHODS:
        return Refusal(reasons.BAD_AUTHENTICATION_METHOD,
                       f"authentication method {method!r} is not supported (only {', '.join(scram.METHODS)})")
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
        return Terms(assigned_id or pkt.client_id, version, capped, expiry, capped != expiry, keepalive, server_keepalive,
                     min(props.receive_maximum or 65535, limits.max_inflight), props.maximum_packet_size,
                     props.topic_alias_maximum or 0, props.request_problem_information != 0)
    return Terms(assigned_id or pkt.client_id, version, capped, expiry, capped != expiry, keepalive, None,
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
        self.failures = Failures()
        self.limits = limits
        self.set_limits(limits, auth_limits)
        self.access = access
        self.auth = auth
        self.sessions = sessions
        self.delivery = delivery
        self.output = output
        self.stats = stats  # "auth_failures": CONNECTs refused for their credentials
        self.listener_names: tuple[str, ...] = ()  # for the log, by listener index (set by the broker)
        self.exchanges: dict[Client, Exchange] = {}
        # Disconnects a connected client with a reason code (set by the broker).
        self.disconnect: Callable[[Client, int, str], None] = lambda client, reason, text: None
        # Whether this shard may serve a client ID now (a cluster node: the fence; set by the
        # shell). The reason a refusal gives when it may not.
        self.admit: Callable[[str], str | None] = lambda client_id: None
        # Tells the other shards of a failed login from an address (set by the broker).
        self.tell_peers: Callable[[str], None] = lambda address: None

    def set_limits(self, limits: LimitsConfig, auth_limits: AuthConfig) -> None:
        """The limits of CONNECTs from now on (at start, and at a reload); the failures counted
        so far are kept."""
        self.limits = limits
        failures = self.failures
        failures.ban_after, failures.ban = auth_limits.max_failures, auth_limits.ban_time
        failures.slow_after = 3 if auth_limits.max_failures else 1 << 30

    def on_connect(self, client: Client, pkt: Connect) -> PendingConnect | None:
        """Answer the CONNECT, or return what must be verified before it can be answered."""
        version = pkt.protocol_version
        client.version = version
        client.reader.version = version  # packets pipelined behind the CONNECT are of its version
        client.client_id = client.assigned_id or pkt.client_id
        client.max_packet_out = pkt.properties.maximum_packet_size  # a refusal fits it too [MQTT-3.1.2-24]
        terms = negotiate(pkt, client.assigned_id, self.limits, self.access)
        if isinstance(terms, Refusal):
            self._refuse(client, terms)
            return None
        method = pkt.properties.authentication_method
        certified = client.transport.identity
        if certified is not None:  # the listener takes the certificate's identity as the username
            if method is not None:
                self._refuse(client, Refusal(reasons.BAD_AUTHENTICATION_METHOD,
                                             "the client certificate is the identity on this listener"))
                return None
            pkt = replace(pkt, username=certified, password=None)
            self._authenticated(client, pkt, terms, None, None)
            return None
        if (pkt.username is not None or method is not None) and self.failures.banned(_host(client.peer),
                                                                                     self.time.mono):
            self.stats["auth_failures"] += 1
            self._refuse(client, Refusal(reasons.NOT_AUTHORIZED, "too many failed attempts from this address"),
                         logging.WARNING)
            return None
        if method is not None:
            self._begin_exchange(client, pkt, terms, method)
            return None
        verdict = self.auth.check(pkt.username, pkt.password, client.transport.listener)
        if isinstance(verdict, PasswordHash):
            return PendingConnect(pkt, terms, verdict)
        self._authenticated(client, pkt, terms, verdict, None)
        return None

    def finish(self, client: Client, pending: PendingConnect, ok: bool) -> None:
        """The password of a pending CONNECT was verified (``ok``) or not."""
        pkt = pending.packet
        assert pkt.username is not None and pkt.password is not None
        verdict = self.auth.verified(pkt.username, pkt.password, pending.against, ok, client.transport.listener)
        self._authenticated(client, pkt, pending.terms, verdict, pending.against)

    # ------------------------------------------------------------------ SCRAM

    def _start_scram(self, client: Client, method: str, client_first: bytes | None) -> tuple[ScramExchange, bytes]:
        """A new exchange and its server-first message; ``ScramFailed`` when it cannot begin."""
        listener = client.transport.listener
        if self.auth.policy(listener).passwords is None:
            raise ScramFailed("no password file applies on this listener")
        if client_first is None:
            raise ScramFailed("no client-first message (Authentication Data)")
        exchange = ScramExchange(method, lambda user: self.auth.scram_keys(method, user, listener), self.auth.decoy)
        return exchange, exchange.first(client_first)

    def _continue(self, client: Client, exchange: ScramExchange, server_first: bytes, pkt: Connect | None,
                  terms: Terms | None) -> None:
        timer = self.scheduler.later(self.limits.connect_timeout, lambda _now: self._expired(client))
        self.exchanges[client] = Exchange(exchange, pkt, terms, timer)
        props = Properties(authentication_method=exchange.method, authentication_data=server_first)
        self.output.send(client, codec.encode(Auth(reasons.CONTINUE_AUTHENTICATION, props), MQTT_5))

    def _begin_exchange(self, client: Client, pkt: Connect, terms: Terms, method: str) -> None:
        if self.auth.policy(client.transport.listener).passwords is None:
            self._refuse(client, Refusal(reasons.BAD_AUTHENTICATION_METHOD,
                                         f"{method}: no password file applies on this listener"))
            return
        try:
            exchange, server_first = self._start_scram(client, method, pkt.properties.authentication_data)
        except ScramFailed as exc:
            self._authenticated(client, pkt, terms, Refused(reasons.BAD_USER_NAME_OR_PASSWORD,
                                                            f"{method}: {exc}"), None)
            return
        if pkt.username is not None and pkt.username != exchange.username:
            self._authenticated(client, pkt, terms, Refused(reasons.BAD_USER_NAME_OR_PASSWORD,
                                                            f"{method}: the user name is not SCRAM's"), None)
            return
        self._continue(client, exchange, server_first, pkt, terms)

    def in_exchange(self, client: Client) -> bool:
        """Whether the client's CONNECT waits for the end of a SCRAM exchange."""
        exchange = self.exchanges.get(client)
        return exchange is not None and exchange.packet is not None

    def exchange_packet(self, client: Client, packet: object) -> None:
        """A packet from a client whose CONNECT is in a SCRAM exchange: AUTH goes on with it,
        DISCONNECT ends it, anything else is a protocol error [MQTT-3.1.2-30]."""
        exchange = self.exchanges.pop(client)
        exchange.timer.cancel()
        pkt, terms = exchange.packet, exchange.terms
        assert pkt is not None and terms is not None
        if isinstance(packet, Disconnect):
            self.output.close(client, "client disconnected during authentication")
            return
        if not isinstance(packet, Auth) or packet.reason_code != reasons.CONTINUE_AUTHENTICATION \
                or packet.properties.authentication_method != exchange.scram.method:
            self._refuse(client, Refusal(reasons.PROTOCOL_ERROR, f"{type(packet).__name__} during authentication: "
                                         f"only AUTH 0x18 with method {exchange.scram.method} or DISCONNECT"))
            return
        method = exchange.scram.method
        username = exchange.scram.username
        pkt = replace(pkt, username=username, password=None)
        try:
            server_final = exchange.scram.final(packet.properties.authentication_data or b"")
        except ScramFailed as exc:
            self._authenticated(client, pkt, terms, Refused(reasons.BAD_USER_NAME_OR_PASSWORD, f"{method}: {exc}"),
                                None)
            return
        assert username is not None
        credential = self.auth.credential(username, client.transport.listener)
        self._authenticated(client, pkt, terms, None, credential, (method, server_final))

    def exchange_error(self, client: Client, exc: ProtocolError) -> None:
        """Bytes that are no valid packet (a malformed AUTH, say) from a client whose CONNECT is
        in a SCRAM exchange: the CONNECT is refused with the error's reason (2.2.2.2, 4.13)."""
        exchange = self.exchanges.pop(client)
        exchange.timer.cancel()
        self._refuse(client, Refusal(exc.reason, f"during authentication: {exc.message}"))

    def _expired(self, client: Client) -> None:
        exchange = self.exchanges.pop(client, None)
        if exchange is None or client.closing:
            return
        text = f"{exchange.scram.method} exchange not finished within limits.connect_timeout"
        if exchange.packet is not None:
            self._refuse(client, Refusal(reasons.NOT_AUTHORIZED, text), logging.WARNING)
        else:
            self.disconnect(client, reasons.NOT_AUTHORIZED, f"re-authentication: {text}")

    def forget(self, client: Client) -> None:
        """The connection is gone."""
        exchange = self.exchanges.pop(client, None)
        if exchange is not None:
            exchange.timer.cancel()

    def on_auth(self, client: Client, sess: Session, pkt: Auth) -> None:
        """AUTH from a connected client: a re-authentication [MQTT-4.12.1]."""
        identity = self.sessions.clients.get(client)
        method = identity.method if identity is not None else None
        if identity is None or method is None:  # no method was agreed in CONNECT [MQTT-4.12.0-7]
            raise ProtocolError(reasons.PROTOCOL_ERROR, "AUTH without an authentication method")
        if pkt.properties.authentication_method != method:  # [MQTT-4.12.1-1]
            raise ProtocolError(reasons.PROTOCOL_ERROR, f"AUTH with another authentication method than {method}")
        data = pkt.properties.authentication_data
        if pkt.reason_code == reasons.RE_AUTHENTICATE:
            if client in self.exchanges:
                raise ProtocolError(reasons.PROTOCOL_ERROR, "re-authentication while one is under way")
            try:
                exchange, server_first = self._start_scram(client, method, data)
            except ScramFailed as exc:
                return self._reauth_failed(client, identity, str(exc))
            return self._continue(client, exchange, server_first, None, None)
        under_way = self.exchanges.pop(client, None)
        if pkt.reason_code != reasons.CONTINUE_AUTHENTICATION or under_way is None:
            raise ProtocolError(reasons.PROTOCOL_ERROR, f"AUTH 0x{pkt.reason_code:02X} outside a re-authentication")
        under_way.timer.cancel()
        try:
            server_final = under_way.scram.final(data or b"")
        except ScramFailed as exc:
            return self._reauth_failed(client, identity, str(exc))
        if under_way.scram.username != identity.username:
            return self._reauth_failed(client, identity, f"re-authenticated as another user "
                                                         f"({under_way.scram.username!r})")
        assert identity.username is not None
        self.sessions.clients[client] = replace(
            identity, credential=self.auth.credential(identity.username, client.transport.listener))
        props = Properties(authentication_method=method, authentication_data=server_final)
        self.output.send(client, codec.encode(Auth(reasons.SUCCESS, props), MQTT_5))
        log.info("client %s (%s) re-authenticated as %r", client.client_id, client.peer, identity.username)

    def _reauth_failed(self, client: Client, identity: Identity, text: str) -> None:
        self.stats["auth_failures"] += 1
        self._failed(client)
        log.warning("re-authentication of %s (%s) as %r failed: %s", client.client_id, client.peer,
                    identity.username, text)
        self.disconnect(client, reasons.NOT_AUTHORIZED, f"re-authentication failed: {text}")

    # ------------------------------------------------------------------ failed logins

    def _failed(self, client: Client) -> float:
        """A login of ``client`` failed: count it against its address here and on every other
        shard; how long to wait before answering it."""
        host = _host(client.peer)
        self.tell_peers(host)
        return self.failures.failed(host, self.time.mono)

    def peer_failed(self, address: str) -> None:
        """Another shard saw a login from ``address`` fail."""
        self.failures.failed(address, self.time.mono)

    # ------------------------------------------------------------------ in or out

    def _authenticated(self, client: Client, pkt: Connect, terms: Terms, verdict: Refused | None,
                       credential: PasswordHash | None, reply: AuthReply | None = None) -> None:
        if verdict is not None:
            self.stats["auth_failures"] += 1
            refusal = Refusal(verdict.reason, f"user {pkt.username!r}: {verdict.text}")
            delay = self._failed(client) if pkt.username is not None else 0.0
            if delay:  # a guesser waits for its answer (the socket is not read meanwhile)
                client.pause_reading(PAUSED_BY_AUTH)
                self.scheduler.later(delay, lambda _now: None if client.closing else self._refuse(
                    client, refusal, logging.WARNING))
                return
            self._refuse(client, refusal, logging.WARNING)
            return
        if pkt.username is not None and self.failures.any():
            self.failures.succeeded(_host(client.peer))
        listener = client.transport.listener
        policy = self.auth.policy(listener)
        client.acl = policy.acl_for(pkt.username, terms.client_id)
        will = pkt.will
        if will is not None:
            denied = self.access.publish_denied(will.topic, client.acl)
            if denied is not None:
                self._refuse(client, Refusal(reasons.NOT_AUTHORIZED, f"will topic {will.topic!r}: {denied}"))
                return
        self._accept(client, pkt, terms, reply)
        if client.connected and (pkt.username is not None or policy.passwords is not None or policy.acl is not None):
            self.sessions.clients[client] = Identity(pkt.username, credential, listener,  # for a reload
                                                     reply[0] if reply is not None else None)

    def _accept(self, client: Client, pkt: Connect, terms: Terms, reply: AuthReply | None = None) -> None:
        client.keepalive = terms.keepalive
        client.expiry_asked = terms.asked
        client.send_window = terms.send_window
        client.max_packet_out = terms.max_packet_out
        client.alias_max_out = terms.alias_max_out
        client.problem_info = terms.problem_info
        unserved = self.admit(terms.client_id)
        if unserved is not None:  # checked last, at the attach: the fence may fall during a hash
            return self._refuse(client, Refusal(reasons.SERVER_UNAVAILABLE, unserved))
        attached = self.sessions.attach(client, terms.client_id, terms.version, terms.expiry, pkt.clean_start,
                                        pkt.will)
        if attached is None:
            return self._refuse(client, Refusal(reasons.QUOTA_EXCEEDED if terms.version == MQTT_5
                                                else reasons.SERVER_UNAVAILABLE, "session limit reached"))
        sess, present = attached
        connack = reactions.within(ConnAck(present, reasons.SUCCESS, self._connack_properties(client, terms, reply)),
                                   terms.version, terms.max_packet_out)
        if connack is None:  # what it must hold (an Assigned Client Identifier) exceeds the client's maximum
            self.sessions.detach(client, publish_will=False)
            self._refuse(client, Refusal(reasons.PACKET_TOO_LARGE, f"the CONNACK does not fit its Maximum Packet "
                                                                    f"Size of {terms.max_packet_out} bytes"))
            return
        self.output.send(client, connack)
        client.connected = True
        client.connected_at = self.time.wall
        client.username = pkt.username
        clientlog.connected(client, self.shard, present)
        if present:
            self.delivery.resume(sess, client)

    def _connack_properties(self, client: Client, terms: Terms, reply: AuthReply | None) -> Properties:
        if terms.version != MQTT_5:
            return NO_PROPERTIES
        limits = self.limits
        return Properties(
            authentication_method=reply[0] if reply is not None else None,
            authentication_data=reply[1] if reply is not None else None,
            receive_maximum=limits.receive_maximum,
            topic_alias_maximum=limits.topic_alias_maximum or None,
            maximum_packet_size=limits.max_packet_size,
            assigned_client_identifier=client.assigned_id,
            server_keep_alive=terms.server_keepalive,
            session_expiry_interval=terms.expiry if terms.expiry_capped else None,
            retain_available=0 if not limits.retain_available else None,
        )

    def _refuse(self, client: Client, refusal: Refusal, level: int = logging.INFO) -> None:
        index = client.transport.listener
        names = self.listener_names
        log.log(level, "refusing CONNECT from %s (%s, listener %s): %s [%s]", client.client_id, client.peer,
                names[index] if index < len(names) else index, refusal.text, reasons.name(refusal.reason))
        code = reactions.connack_for(refusal.reason, client.version)
        if code is not None:
            props = Properties(reason_string=refusal.text[:200]) if client.version == MQTT_5 else NO_PROPERTIES
            data = reactions.within(ConnAck(False, code, props), client.version, client.max_packet_out)
            if data is not None:
                self.output.send(client, data)
        self.output.close(client, f"CONNECT refused: {refusal.text}")
