"""One shard's broker: its parts put together, and the entry points its shell drives.

The parts, each owning its own state (see each module):

    ``Sessions``       the session registry: attach at CONNECT, takeover, detach, wills, expiry
    ``Handshake``      CONNECT to CONNACK (and, later, an AUTH exchange)
    ``Inbound``        PUBLISH and PUBREL from clients
    ``Delivery``       messages to sessions: window, queue, store rows; PUBACK/PUBREC/PUBCOMP
    ``Subscriptions``  SUBSCRIBE/UNSUBSCRIBE, the local tries, local fan-out, retained
    ``Peers``          the route table, publishes to other shards, the peer protocol, the outbox
    ``Commit``         the store batch of each iteration (group commit), store-full state
    ``Output``         bytes for clients, held until the commit
    ``Backpressure``   backlogs hold back the publishers that feed them (``backpressure.py``)
    ``Flow``           slow consumers by bytes; the hold while the bus is full (``flow.py``)
    ``AccessRules``    what clients may publish and subscribe to

Entry points (the shell calls them; each takes the time as a ``Now``):
``open_client`` / ``received`` / ``lost`` / ``backed_up`` / ``drained`` for
transports, ``peer_messages`` for the bus, ``tick`` for the sweep, ``flush`` when
the scheduler runs it, and ``restore`` / ``announce`` / ``shutdown``.

The flush's invariant, kept in :meth:`Broker.flush`: commit the batch, then send
peer messages, then write client bytes. So every acknowledgement (PUBACK, PUBREC,
SUBACK, the CONNACK of a persistent session) and every durable forward leaves after
the state it promises is committed.

No sockets, event loop, clock, ZeroMQ or LMDB here (an import contract checks it):
the shell passes the time, a ``Scheduler``, the store and the peer link.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from shardbroker.config import Config
from shardbroker.core import clientlog
from shardbroker.core.access import AccessRules
from shardbroker.core.backpressure import WRITE, Backpressure
from shardbroker.core.client import PAUSED_BY_AUTH, Client, Transport
from shardbroker.core.clock import EventTime, Now, Scheduler, Timer
from shardbroker.core.commit import Commit
from shardbroker.core.delivery import Delivery
from shardbroker.core.flow import SLOW_CONSUMER_RATE, Flow
from shardbroker.core.handshake import Handshake, InlineVerifier, PendingConnect, Verifier
from shardbroker.core.inbound import Inbound
from shardbroker.core.moves import Moves
from shardbroker.core.output import Output
from shardbroker.core.peers import PeerLink, Peers
from shardbroker.core.replicas import Replicas
from shardbroker.core.retained import RetainedSync
from shardbroker.core.session import Leaving, Message, Session
from shardbroker.core.sessions import Sessions
from shardbroker.core.store import RetainedStore, ShardStore
from shardbroker.core.subscriptions import Subscriptions
from shardbroker.peer.messages import LoginFailed, PeerMessage
from shardbroker.protocol import codec, reactions, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Auth,
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
from shardbroker.security.auth import Authenticator, Policy

log = logging.getLogger("shardbroker.broker")

INITIAL_SEND_WINDOW = 20  # QoS 1/2 in flight toward a client before its CONNECT says otherwise
_PINGRESP = codec.encode(PingResp(), MQTT_5)  # the same two bytes in every version


class BrokerLink(PeerLink, Protocol):
    """The peer link as flow control also uses it (``shardbroker.peer.bus.Bus``)."""

    def congested(self, now: float) -> bool: ...
    def waiting(self, peer: int) -> int: ...


Handler = Callable[[Client, Session, Any], None]


class Broker:
    def __init__(self, config: Config, shard: int, shards: int, store: ShardStore, retained: RetainedStore,
                 link: BrokerLink, scheduler: Scheduler, now: Now, *,
                 policy: Policy | Sequence[Policy] | None = None, verifier: Verifier | None = None) -> None:
        """``policy``: the loaded password and ACL files, one policy per listener (required when
        the configuration names any); ``verifier``: where slow password hashes are verified (default: on the loop, for
        tests; a worker passes a thread pool)."""
        self.config = config
        self.limits = limits = config.limits
        self.shard = shard
        self.shards = shards
        self.store = store
        self.link = link
        self.scheduler = scheduler
        self.time = EventTime(now)
        self.stats = {
            "received": 0, "delivered": 0, "forwarded": 0, "dropped_queue_full": 0,
            "dropped_too_large": 0, "expired": 0, "protocol_errors": 0, "commits": 0, "commit_ops": 0,
            "backlogs": 0, "holds": 0, "slow_subscribers": 0, "dropped_not_authorized": 0,
            "subscriptions_refused": 0, "publish_rate_holds": 0, "auth_failures": 0,
            "received_qos0": 0, "received_qos1": 0, "received_qos2": 0, "received_bytes": 0,
            "delivered_qos0": 0, "delivered_qos1": 0, "delivered_qos2": 0, "delivered_bytes": 0,
        }
        if policy is None:
            settings = config.listeners_auth()
            if any(a.password_file or a.acl_file for a in settings):
                raise ValueError("the configuration names a password or ACL file: pass the loaded Policy")
            policy = tuple(Policy(allow_anonymous=a.allow_anonymous) for a in settings)
        self.auth = Authenticator(policy)
        self._pending: dict[Client, PendingConnect] = {}  # CONNECTs whose password is being verified
        self.verifier: Verifier = verifier or InlineVerifier(scheduler)
        self._flush_scheduled = False
        self._flow_recheck: Timer | None = None
        self._sys_published = now.mono
        # a cluster node: the monotonic time after which nothing may be served (its grant's
        # deadline), and what closes the clients then. Checked before any client's bytes are
        # handled, so a node that was stopped past its lease (SIGSTOP, a stalled host) takes
        # no publish it read on waking before its timer closes the clients
        self.serve_until = math.inf
        self.deadline_passed: Callable[[], None] = lambda: None
        self.flow: Flow[Client] = Flow()
        self.access = AccessRules(config.acl.deny_publish, config.acl.deny_subscribe)
        self.output = Output(self.wake)
        self.commit = Commit(shard, store, retained, self.time, self.stats)
        self.delivery = Delivery(limits, self.stats, self.time, self.output, self.commit.batch)
        self.sessions = Sessions(self.commit, self.time, max(1, limits.max_sessions // max(1, shards)))
        self.subscriptions = Subscriptions(shard, self.sessions, self.delivery, self.output, self.access,
                                           retained, scheduler, self.time, limits, self.stats)
        self.peers = Peers(shard, shards, link, self.commit, self.time, self.stats, self.wake)
        self.retained_sync = RetainedSync(shard, config.cluster.node_id, link, self.commit, retained,
                                          scheduler, self.time, self.wake)
        self.inbound = Inbound(limits, self.access, self.peers, self.commit, self.output, self.time, self.stats,
                               scheduler)
        self.handshake = Handshake(shard, limits, self.access, self.auth, self.sessions, self.delivery,
                                   self.output, scheduler, self.time, config.auth, self.stats)
        self.backpressure = Backpressure(shard, shards, limits, self.sessions, self.output, link, self.time,
                                         self.stats, self.wake)
        # The parts that need each other:
        self.sessions.subscriptions = self.subscriptions
        self.sessions.route = self.peers.route
        self.sessions.take_over = self._take_over
        self.handshake.disconnect = self.close
        self.handshake.tell_peers = lambda address: link.broadcast(LoginFailed(shard, address))
        self.peers.login_failed = self.handshake.peer_failed
        self.handshake.listener_names = tuple(lst.name for lst in config.effective_listeners)
        self.sessions.offline = self.backpressure.end
        self.delivery.backpressure = self.inbound.backpressure = self.peers.backpressure = self.backpressure
        self.subscriptions.peers = self.peers
        self.peers.retained_sync = self.retained_sync
        self.commit.on_retained = self.retained_sync.written
        self.peers.subscriptions = self.subscriptions
        self.moves = Moves(shard, store, self.commit, self.sessions, link, self.time, self.stats, self.wake)
        self.peers.moves = self.moves
        moves = self.moves
        moves.seen_marks = self.peers.seen_marks
        moves.relay = self.peers.relay
        moves.barrier = self.subscriptions.barrier
        moves.global_id = self.peers.global_id
        moves.delivery = self.delivery
        moves.inbox_mark = self.peers.outbox.mark
        moves.last_sent = self.peers.outbox.last
        self.delivery.moving = moves.check
        self.replicas = Replicas(shard, self.sessions, self.commit, link, self.time, self.stats, self.wake)
        self.peers.replicas = self.replicas
        self.sessions.replicate = self.delivery.replicate = self.inbound.replicate = self.replicas.changed
        moves.partial = self.replicas.restored.__contains__
        moves.holding = self.replicas.hold
        moves.lost_merged = self.replicas.merged
        moves.on_kept = self.replicas.kept
        self.inbound.resent = self.replicas.resent
        self.replicas.release = self._take_resends
        self.replicas.delivery = self.delivery
        self.replicas.taken = self.peers.shards_taken
        # One handler per packet type once connected (CONNECT goes to the handshake).
        self._handlers: dict[type, Handler] = {
            Publish: self.inbound.on_publish, PubAck: self.delivery.on_puback, PubRec: self.delivery.on_pubrec,
            PubRel: self.inbound.on_pubrel, PubComp: self.delivery.on_pubcomp,
            Subscribe: self.subscriptions.on_subscribe, Unsubscribe: self.subscriptions.on_unsubscribe,
            PingReq: self._on_pingreq, Disconnect: self._on_disconnect, Auth: self.handshake.on_auth,
        }

    # ------------------------------------------------------------------ startup and shutdown

    def restore(self, now: Now) -> None:
        """Load this shard's sessions and outbox from the store."""
        self.time.set(now)
        self.sessions.restore(self.store)
        self.moves.restore()
        self.peers.outbox.load(self.store.outbox(), self.store.meta_items())
        log.info("shard %d restored %d sessions, %d filters", self.shard, len(self.sessions),
                 self.subscriptions.route_count())

    def announce(self) -> None:
        """Ask every peer for its routes and tell them ours (startup and restart)."""
        self.peers.announce()

    @property
    def synced(self) -> set[int]:
        """Peers whose routes this shard knows."""
        return self.peers.synced

    def shutdown(self, now: Now) -> None:
        """The broker stops: 5.0 clients are told 0x8B; sessions stay as they are stored."""
        self.time.set(now)
        for client in list(self.sessions.clients):
            if client.connected and not client.closing:
                clientlog.disconnected(client, "server shutting down")
            if client.version == MQTT_5 and client.session is not None:
                self.output.send(client, codec.encode(Disconnect(reasons.SERVER_SHUTTING_DOWN), MQTT_5))
            self.sessions.shut_down(client)
            self.output.close(client, "server shutting down")
        self.flush(now)

    # ------------------------------------------------------------------ transports

    def open_client(self, transport: Transport, assigned_id: str | None, now: Now) -> Client:
        """A new connection (its CONNECT is among the first bytes ``received`` gets)."""
        return Client(transport, assigned_id, self.limits.max_packet_size, now.mono, INITIAL_SEND_WINDOW,
                      self.limits.strict_utf8)

    def received(self, client: Client, data: bytes, now: Now) -> None:
        """Bytes from a client: frame them and handle each packet in order."""
        if client.closing:
            return
        self.time.set(now)
        if now.mono >= self.serve_until:
            self.serve_until = math.inf  # until the next grant
            self.deadline_passed()
            if client.closing:
                return
        client.last_rx = now.mono
        try:
            packets = client.reader.feed(data)
        except ProtocolError as exc:
            if not client.connected:
                self._error_before_connack(client, exc)
                return
            self.protocol_violation(client, exc)
            return
        if self._pending and client in self._pending:  # read before the pause took effect
            self._pending[client].stash.extend(packets)
            return
        self._packets(client, packets)

    def _packets(self, client: Client, packets: list[Any]) -> None:
        for i, packet in enumerate(packets):
            if client.closing:
                break
            if not client.connected:
                if self.handshake.exchanges and self.handshake.in_exchange(client):  # SCRAM before CONNACK
                    self.handshake.exchange_packet(client, packet)
                    if client.session is not None:
                        self.backpressure.attached(client)
                    continue
                if not isinstance(packet, Connect):
                    log.info("%s: first packet is not CONNECT: closing", client.peer)
                    self._abort(client, "first packet is not CONNECT")
                    return
                try:
                    pending = self.handshake.on_connect(client, packet)
                except Exception:
                    log.exception("%s: internal error in CONNECT", client.peer)
                    self._abort(client, "internal error in CONNECT")
                    return
                if pending is not None:  # its password is verified away from the loop
                    pending.stash.extend(packets[i + 1:])
                    self._pending[client] = pending
                    client.pause_reading(PAUSED_BY_AUTH)
                    assert packet.password is not None
                    self.verifier.verify(pending.against, packet.password,
                                         lambda ok, now: self.verified(client, ok, now))
                    return
                if client.session is not None:
                    self.backpressure.attached(client)
                continue
            self.handle(client, packet)
        error = client.reader.error
        if error is not None and not client.closing:  # bad bytes after good packets in one read
            if client.connected:
                self.protocol_violation(client, error)
            else:
                self._error_before_connack(client, error)
        if self.flow.holding:
            self.flow.received(client)

    def verified(self, client: Client, ok: bool, now: Now) -> None:
        """The password of a client's pending CONNECT was verified: answer it, then handle
        what came behind it and read the client again."""
        pending = self._pending.pop(client, None)
        if pending is None or client.closing:
            return
        self.time.set(now)
        try:
            self.handshake.finish(client, pending, ok)
        except Exception:
            log.exception("%s: internal error in CONNECT", client.peer)
            self._abort(client, "internal error in CONNECT")
            return
        if client.session is not None:
            self.backpressure.attached(client)
        if client.connected and not client.closing:  # (a refusal may be on its way, late)
            client.resume_reading(PAUSED_BY_AUTH)
            self._packets(client, pending.stash)
        self.wake()

    def security_changed(self, policy: Policy | Sequence[Policy], now: Now) -> None:
        """New password or ACL files (a reload): connected clients that would no longer get in
        are disconnected; the others get their new view of the ACL file at once."""
        self.time.set(now)
        self.auth.reload(policy)
        for client, identity in list(self.sessions.clients.items()):
            if client.closing:
                continue
            refused = self.auth.still_valid(identity, client.transport.listener)
            if refused is not None:
                log.warning("disconnecting %s after a reload: %s", client.client_id, refused.text)
                self.close(client, reasons.NOT_AUTHORIZED, refused.text)
                continue
            username = identity.username if identity is not None else None
            client.acl = self.auth.policy(client.transport.listener).acl_for(username, client.client_id)
        self.wake()

    def reconfigure(self, config: Config) -> None:
        """A reload: the live settings (``process/reload.py``) take their new values. What is read
        per event applies at once; what a client agreed at CONNECT (its packet size, window,
        keep-alive) stays for its connection. The password and ACL files are
        ``security_changed``'s."""
        limits = config.limits
        self.config = config
        self.limits = limits
        self.delivery.limits = self.subscriptions.limits = self.backpressure.limits = limits
        self.inbound.set_limits(limits)
        self.handshake.set_limits(limits, config.auth)
        self.sessions.max_sessions = max(1, limits.max_sessions // max(1, self.shards))
        self.access.set_rules(config.acl.deny_publish, config.acl.deny_subscribe)

    def lost(self, client: Client, now: Now) -> None:
        """The transport is closed (by the client, an error, or after we closed it)."""
        if client.gone:
            return
        self.time.set(now)
        if client.connected and not client.closing:
            clientlog.disconnected(client, "connection lost (closed without DISCONNECT)")
        client.gone = True
        client.closing = True
        client.out = None
        self.output.forget(client)
        self.flow.forget(client)
        self.backpressure.forget(client)
        self._pending.pop(client, None)
        self.handshake.forget(client)
        self.inbound.forget(client)
        if client.session is not None:
            log.debug("connection of %s lost", client.client_id)
            self.sessions.detach(client, publish_will=True)
            self.wake()
        self.sessions.clients.pop(client, None)

    def backed_up(self, client: Client, now: Now) -> None:
        """The client's transport holds more than its high-water mark: a backlog, unless the
        client is a slow consumer (``flow.py``)."""
        self.time.set(now)
        if self.flow.backed_up_at(client, now.mono) and client.session is not None and not client.closing:
            self.backpressure.start(client.session, WRITE)
            self.wake()  # the flush judges it (``_update_flow``)

    def drained(self, client: Client) -> None:
        """The client's transport is below its low-water mark again."""
        self.flow.drained(client)
        if client.session is not None:
            self.backpressure.stop(client.session, WRITE)
        self.wake()

    def _error_before_connack(self, client: Client, exc: ProtocolError) -> None:
        """Bytes that are no valid packet before the CONNACK. In a SCRAM exchange the CONNECT is
        known, so it is refused with the reason (a 5.0 client gets a CONNACK with it, see
        ``reactions``); otherwise the CONNECT itself is bad, and the connection is closed."""
        if self.handshake.exchanges and self.handshake.in_exchange(client):
            self.handshake.exchange_error(client, exc)
            return
        log.info("%s: bad CONNECT: %s", client.peer, exc.message)
        self._abort(client, f"bad CONNECT: {exc.message}")

    def _abort(self, client: Client, reason: str) -> None:
        client.closing = True
        client.transport.abort(reason)

    # ------------------------------------------------------------------ packets

    def handle(self, client: Client, packet: object) -> None:
        """Handle one packet from a connected client."""
        try:
            handler = self._handlers.get(type(packet))
            sess = client.session
            if handler is None or sess is None:
                if isinstance(packet, Connect):  # [MQTT-3.1.0-2]
                    raise ProtocolError(reasons.PROTOCOL_ERROR, "second CONNECT")
                raise ProtocolError(reasons.PROTOCOL_ERROR, f"unexpected {type(packet).__name__} from a client")
            handler(client, sess, packet)
        except ProtocolError as exc:
            self.protocol_violation(client, exc)
        except Exception:
            log.exception("shard %d: internal error handling %s from %s", self.shard,
                          type(packet).__name__, client.client_id)
            self.close(client, reasons.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    def _take_resends(self, client: Client, sess: Session, pkts: list[Publish]) -> None:
        """QoS 2 resends that waited for a lost node's session (``Replicas.resent``): handled
        now, as they came (acknowledged only if that session had taken them)."""
        for pkt in pkts:
            if client.closing:
                return
            self.handle(client, pkt)

    def protocol_violation(self, client: Client, exc: ProtocolError) -> None:
        self.stats["protocol_errors"] += 1
        self.close(client, exc.reason, exc.message)

    def close(self, client: Client, reason: int | None, text: str, *, will: bool = True) -> None:
        """Server-side disconnect: DISCONNECT with ``reason`` to a 5.0 client, then close."""
        if client.closing:
            return
        why = f"{text} [{reasons.name(reason)}]" if reason is not None else text
        if client.connected:
            clientlog.disconnected(client, why)
        else:
            log.info("closing %s (%s): %s", client.name, client.peer, why)
        code = reactions.disconnect_for(reason, client.version) if reason is not None else None
        if code is not None and client.session is not None:
            props = Properties(reason_string=text[:200]) if text else NO_PROPERTIES
            data = reactions.within(Disconnect(code, props), MQTT_5, client.max_packet_out)
            if data is not None:
                self.output.send(client, data)
        self.sessions.detach(client, publish_will=will)
        self.output.close(client, text)

    def kick(self, client_id: str, now: Now) -> Client | None:
        """An administrator ends a client's connection (``shardbroker ctl kick``): a server-side
        disconnect (5.0: DISCONNECT 0x98 Administrative action), so its will is published as
        the spec says for one (after its Will Delay Interval). The client, or None when no
        connection of that client ID is up."""
        self.time.set(now)
        sess = self.sessions.get(client_id)
        client = sess.client if sess is not None else None
        if client is None or client.closing:
            return None
        self.close(client, reasons.ADMINISTRATIVE_ACTION, "disconnected by an administrator")
        return client

    def close_unserved(self, serves: Callable[[str], bool], text: str, now: Now) -> int:
        """A cluster node's fence fell for some client IDs: close every client this shard may no
        longer serve (``serves`` says no), a server-side disconnect whose 5.0 DISCONNECT is 0x9C
        Use another server (MQTT 5.0 3.14.2.1: "the Client should temporarily use another
        server"; the virtual shard goes to the node the map names next, or back to this one
        once it holds a lease again; no Server Reference, as the node does not know the next
        owner). Their sessions stay stored. How many were closed."""
        self.time.set(now)
        closed = 0
        for client in list(self.sessions.clients):
            if client.closing or client.session is None or serves(client.client_id):
                continue
            self.close(client, reasons.USE_ANOTHER_SERVER, text)
            closed += 1
        return closed

    def give_shards(self, shards: Sequence[tuple[int, int]], version: int, now: Now) -> int:
        """A cluster node's grant (map ``version``) gave these virtual shards (their clients
        closed) to workers of other nodes, as (vshard, peer) pairs: commit what closing them
        wrote, then send each peer its shards' persistent sessions (``core/moves.py``). How
        many sessions."""
        self.flush(now)
        return sum(self.moves.give(vshard, peer, version) for vshard, peer in shards)

    def park_unserved(self, serves: Callable[[str], bool], now: Now) -> int:
        """A cluster node's grant changed: the sessions of client IDs ``serves`` says no to
        (their virtual shard is another worker's in the map) are parked
        (``Subscriptions.park``: still matched here, their routes withdrawn), except those
        moving to another node (their routes carry the relay); the others are unparked (routes
        announced again). How many are parked."""
        self.time.set(now)
        subscriptions = self.subscriptions
        withdrawn: list[str] = []
        announce: list[str] = []
        parked = 0
        for cid, sess in self.sessions.sessions.items():
            if type(sess.moving) is Leaving or serves(cid):
                announce += subscriptions.unpark(sess)
            else:
                withdrawn += subscriptions.park(sess)
                parked += 1
        if withdrawn:
            self.peers.withdraw_routes(list(dict.fromkeys(withdrawn)))
        if announce:
            subscriptions.announce(announce)
        return parked

    def place_replicas(self, restore: list[int], backup: tuple[int, ...], keep: Callable[[int], bool],
                       now: Now, previous: dict[int, int] | None = None) -> int:
        """A cluster node's grant changed (``core/replicas.py``): the shards of ``restore`` are
        served here now with no live previous owner to send their sessions, so the copies held
        of them become sessions; ``backup`` is each served shard's backup peer id (-1
        elsewhere); copies of shards ``keep`` says no are forgotten (after a while). With
        ``previous`` (the lost worker that served each, where known), the shards restored are
        announced as taken and those without copies here are asked of the other workers
        (``Replicas.take``). How many restored."""
        self.time.set(now)
        restored = (self.replicas.restore(restore) if previous is None
                    else self.replicas.take(restore, previous))
        self.replicas.set_backups(backup)
        self.replicas.keep_only(keep)
        return restored

    def awaiting_copies(self, vshard: int) -> bool:
        """Whether ``vshard``, taken here without copies, waits for another worker's."""
        return vshard in self.replicas.copies_awaited

    def shards_taken(self, previous: int, vshards: list[int], now: Now) -> None:
        """This shard serves ``vshards`` now, taken from ``previous`` (a worker of a node that is
        gone), and has announced the routes of the sessions restored for them: every shard may
        drop the routes it kept for ``previous`` once all its shards are taken."""
        self.time.set(now)
        self.peers.shards_taken(previous, vshards)

    def give_shard(self, vshard: int, peer: int, version: int, now: Now) -> int:
        """``give_shards`` for one shard."""
        return self.give_shards([(vshard, peer)], version, now)

    def _take_over(self, old: Client, publish_will: bool) -> None:
        self.close(old, reasons.SESSION_TAKEN_OVER, "session taken over", will=publish_will)

    def _on_pingreq(self, client: Client, sess: Session, pkt: PingReq) -> None:
        self.output.send(client, _PINGRESP)

    def _on_disconnect(self, client: Client, sess: Session, pkt: Disconnect) -> None:
        new_expiry = pkt.properties.session_expiry_interval
        if client.version == MQTT_5 and new_expiry is not None:
            if client.expiry_asked == 0 and new_expiry != 0:
                # 3.14.2.2.2 "If the Session Expiry Interval in the CONNECT packet was zero, then it
                # is a Protocol Error to set a non-zero Session Expiry Interval in the DISCONNECT"
                # (not a valid DISCONNECT: the will is published).
                raise ProtocolError(reasons.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT")
            sess.expiry_interval = min(new_expiry, self.limits.max_session_expiry)
        publish_will = client.version == MQTT_5 and pkt.reason_code == reasons.DISCONNECT_WITH_WILL
        clientlog.sent_disconnect(client, pkt.reason_code)
        self.sessions.detach(client, publish_will=publish_will)
        self.output.close(client, "client disconnected", ended=True)

    # ------------------------------------------------------------------ peers

    def peer_messages(self, messages: Iterable[PeerMessage], now: Now) -> None:
        self.time.set(now)
        self.peers.on_messages(messages)

    # ------------------------------------------------------------------ the flush

    def wake(self) -> None:
        """Something is due at the next flush: have the scheduler run it (once per iteration)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.scheduler.soon(self.flush)

    def flush(self, now: Now) -> None:
        """Commit what this iteration changed, then send what it promised: peers, then clients."""
        self._flush_scheduled = False
        self.time.set(now)
        outbox = self.peers.outbox
        if outbox.has_dirty():
            outbox.persist(self.commit.batch())
        self.moves.persist()
        ok = self.commit.run()
        due = self.output.take()
        if not ok:
            # Nothing promised in this batch may be acknowledged: drop the output of every
            # client that had any and close it; the clients resend what was not acked.
            for client in due:
                client.out = None
                client.output_due = False
                self.close(client, reasons.QUOTA_EXCEEDED, "the message store is full", will=False)
            due = self.output.take()
        self.replicas.committed(ok)
        self.peers.committed(ok)
        for client in due:
            self.output.write(client)
        self._update_flow()

    def _update_flow(self) -> None:
        """Hold or release the inputs (``flow.py``) now that this iteration's output is written."""
        mono = self.time.mono
        flow, link = self.flow, self.link
        recheck, slow = flow.update(mono, link.congested(mono))
        for client in slow:
            log.info("%s reads too slowly (under %d bytes/s while backed up): its publishers are no longer held, "
                     "QoS 0 beyond its write buffer is dropped", client.name, SLOW_CONSUMER_RATE)
            if client.session is not None:
                self.backpressure.stop(client.session, WRITE)
        if recheck is not None and self._flow_recheck is None:
            self._flow_recheck = self.scheduler.later(max(0.0, recheck - mono), self._flow_recheck_due)

    def _flow_recheck_due(self, now: Now) -> None:
        self._flow_recheck = None
        self.time.set(now)
        self._update_flow()

    # ------------------------------------------------------------------ the sweep

    def tick(self, now: Now) -> None:
        """Periodic sweep: store fill, ``$SYS``, alive marks, keepalive, wills, expiry, resends."""
        self.time.set(now)
        self.commit.check_fill()
        interval = self.config.server.sys_interval
        if interval and now.mono - self._sys_published >= interval:
            self._sys_published = now.mono
            self.publish_stats()
        self.commit.sweep(bool(self.sessions.stored_client_ids))
        pressure = self.backpressure
        pressure.check_slow()
        pressure.renew()
        pressure.resume_subscribers()
        held, paused = self.flow.held, pressure.paused
        for client in list(self.sessions.clients):
            if (client.keepalive and client.connected and now.mono - client.last_rx > client.keepalive * 1.5
                    and client not in held and client not in paused):  # we stopped reading: it may have pinged
                self.close(client, reasons.KEEP_ALIVE_TIMEOUT, f"keepalive {client.keepalive}s expired")
        self.sessions.sweep()
        self.peers.sweep()
        self.replicas.sweep()
        if self.commit.pending() or self.link.has_pending():
            self.wake()

    def counters(self) -> dict[str, int]:
        """This shard's counters (since it started) and gauges (now), by name.

        The queue, in-flight and subscription gauges are summed over the sessions at each call
        (about 16 ms for 100,000 idle sessions on 2 cores, once per ``$SYS`` round and per
        scrape), so that no handler pays to keep them."""
        values = dict(self.stats)
        queued = queued_bytes = inflight = inflight_bytes = subscriptions = offline = 0
        for sess in self.sessions.sessions.values():
            if sess.queue:
                queued += len(sess.queue)
                queued_bytes += sess.queued_bytes
            if sess.inflight:
                inflight += len(sess.inflight)
                inflight_bytes += sum(len(out.message.payload) for out in sess.inflight.values()
                                      if out.message is not None)
            if sess.subscriptions:
                subscriptions += len(sess.subscriptions)
            if sess.client is None:
                offline += 1
        values.update(
            connections=len(self.sessions.clients), sessions=len(self.sessions), sessions_offline=offline,
            subscriptions=subscriptions, queued=queued, queued_bytes=queued_bytes, inflight=inflight,
            inflight_bytes=inflight_bytes, filters=self.subscriptions.route_count(),
            routes=self.peers.routes.size(), store_full=int(self.commit.store_full),
            bus_sent=self.link.sent, bus_received=self.link.received,
            handover_pending=self.peers.outbox.pending_count(), synced_peers=len(self.peers.synced),
        )
        return values

    def publish_sys(self, values: dict[str, str], retain: bool, now: Now) -> None:
        """Publish broker-wide ``$SYS`` values (``topic -> payload``) from this shard, QoS 0,
        retained or not: the supervisor gathers them over the shards and picks one to publish."""
        self.time.set(now)
        for topic, payload in values.items():
            if not topic.startswith("$SYS/"):
                raise ValueError(f"not a $SYS topic: {topic!r}")
            self.peers.route(Message(topic, payload.encode(), 0, retain))
        self.wake()

    def publish_stats(self) -> None:
        """This shard's counters as ``$SYS/shardbroker/shard/N/<name>`` (QoS 0, not retained)."""
        for name, value in self.counters().items():
            self.peers.route(Message(f"$SYS/shardbroker/shard/{self.shard}/{name}", str(value).encode(), 0, False))
