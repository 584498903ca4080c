"""The session registry of one shard: who is connected, which sessions live, and their ends.

It owns the sessions (by client id), the set of client ids that have a session
record in the store, and the connected clients. It attaches a client to its
session at CONNECT (taking over from an older connection, resuming or starting
afresh), detaches it when the connection ends, fires wills (at once or after their
delay), ends sessions (expiry, Clean Start, the end of a clean one) and restores
them from the store at startup. What a session stores is written to the current
batch (``Commit``); when it is written is the flush's business.

Sessions are persistent when their expiry interval is above 0 (3.1.1 Clean Session
0 is ``NEVER``). Expiry and will delay are wall-clock times, so they count the
downtime of a restart; keepalive is the broker's (``Broker.tick``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from shardbroker.core.client import Client
from shardbroker.core.clock import EventTime
from shardbroker.core.commit import Commit
from shardbroker.core.session import (
    AWAIT_PUBCOMP,
    NO_INFLIGHT,
    Leaving,
    Message,
    Outgoing,
    Queued,
    Session,
    Subscribed,
    WillState,
    subscribed,
)
from shardbroker.core.store import ShardStore
from shardbroker.protocol.packets import NO_PROPERTIES, Will
from shardbroker.security.auth import Identity
from shardbroker.storage.records import (
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
    StoredWill,
)
from shardbroker.storage.session_state import ClientState

if TYPE_CHECKING:
    from shardbroker.core.subscriptions import Subscriptions

log = logging.getLogger("shardbroker.sessions")


class Sessions:
    def __init__(self, commit: Commit, time: EventTime, max_sessions: int) -> None:
        self.commit = commit
        self.time = time
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        self.stored_client_ids: set[str] = set()  # client ids with a session record in the store
        # connected clients (CONNECT accepted), with who they authenticated as when password or
        # ACL files are in use; a dict, which costs a third of a set per entry
        self.clients: dict[Client, Identity | None] = {}
        # Set by the broker once its parts exist (they need each other):
        self.subscriptions: Subscriptions
        self.route: Callable[[Message], bool]  # publish a will
        self.take_over: Callable[[Client, bool], None]  # close an older connection (publish its will?)
        self.offline: Callable[[Session], None]  # the session lost its connection (no backlog any more)
        # a session record written to the batch, or deleted: copied to the shard's backup
        self.replicate: Callable[[str], None] = lambda client_id: None

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, client_id: str) -> Session | None:
        return self.sessions.get(client_id)

    # ---- startup

    def restore(self, store: ShardStore) -> None:
        """Load this shard's sessions from the store."""
        now = self.time.wall
        # A session that was connected when the shard died lost its connection at the last
        # moment the shard is known to have been alive: downtime counts toward its expiry.
        alive_at = store.get_meta("alive_at")
        crashed_at = float(alive_at) if isinstance(alive_at, (int, float)) and alive_at <= now else now
        for rec in store.sessions():
            self._load(rec, store.inflight(rec.client_id), store.queue(rec.client_id),
                       store.qos2_incoming(rec.client_id), crashed_at)
            for sub in rec.subscriptions:
                self.subscriptions.restore(self.sessions[rec.client_id], sub.topic_filter, subscribed(
                    sub.qos, sub.no_local, sub.retain_as_published, sub.retain_handling, sub.subscription_id))
        self.commit.mark_alive()  # a crash right after start counts from here

    def adopt(self, state: ClientState) -> list[str]:
        """A session moved in from another node's worker, just written to the batch
        (``put_state``: ``state`` has this store's message ids and seqs): take it into memory.
        The filters whose routes the peers must now hear of (``Subscriptions.announce``)."""
        rec = state.session
        sess = self._load(rec, state.inflight, state.queue, state.qos2_incoming, self.time.wall)
        announce: list[str] = []
        for sub in rec.subscriptions:
            if self.subscriptions.adopt(sess, sub.topic_filter, subscribed(
                    sub.qos, sub.no_local, sub.retain_as_published, sub.retain_handling, sub.subscription_id)):
                announce.append(sub.topic_filter)
        if not self.stored_client_ids:
            self.commit.mark_alive()
        self.stored_client_ids.add(rec.client_id)
        self.replicate(rec.client_id)
        return announce

    def drop(self, client_id: str) -> tuple[Session, dict[str, Subscribed]] | None:
        """Forget a session that moves to another node (``core/moves.py``): out of memory, its
        routes withdrawn, its will not published; its stored rows stay (deleted once the
        other node has them). The session and the subscriptions it had (for ``reinstate``),
        or None when there was none in memory."""
        sess = self.sessions.pop(client_id, None)
        self.stored_client_ids.discard(client_id)
        if sess is None:
            return None
        subs = dict(sess.subscriptions or {})
        self.subscriptions.remove_all(sess)
        return sess, subs

    def reinstate(self, sess: Session, subs: dict[str, Subscribed]) -> list[str]:
        """A session ``drop`` took out comes back (its move did not complete); the filters whose
        routes the peers must hear of again."""
        self.sessions[sess.client_id] = sess
        self.stored_client_ids.add(sess.client_id)
        return [flt for flt, sub in subs.items() if self.subscriptions.adopt(sess, flt, sub)]

    def _load(self, rec: SessionRecord, inflight: Iterable[tuple[int, InflightRecord, StoredMessage | None]],
              queue: Iterable[tuple[int, int, int, StoredMessage]], qos2_incoming: Iterable[int],
              crashed_at: float) -> Session:
        """A stored session into memory (without its subscriptions)."""
        sess = Session(rec.client_id, rec.protocol_version, rec.expiry_interval)
        sess.disconnected_at = rec.disconnected_at if rec.disconnected_at is not None else crashed_at
        if rec.will is not None:
            w = rec.will
            sess.will = WillState(w.topic, w.payload, w.qos, w.retain, w.properties, w.delay)
            sess.will_due = sess.disconnected_at + min(w.delay, sess.expiry_interval)
        for pid, inf, smsg in inflight:
            msg = _message_from_stored(smsg, inf.msg_id) if smsg is not None else None
            sess.track(pid, Outgoing(msg, inf.qos, msg.retain if msg else False, (), inf.state))
            sess.next_pid = pid % 65535 + 1
        for seq, msg_id, qos, smsg in queue:
            msg = _message_from_stored(smsg, msg_id)
            sess.push(Queued(msg, qos, msg.retain, (), seq))
            sess.queued_bytes += len(msg.payload)
        for pid in qos2_incoming:
            sess.add_qos2_in(pid)
        self.sessions[rec.client_id] = sess
        self.stored_client_ids.add(rec.client_id)
        return sess

    # ---- CONNECT

    def attach(self, client: Client, client_id: str, version: int, expiry: int, clean_start: bool,
               will: Will | None) -> tuple[Session, bool] | None:
        """Give ``client`` its session: the existing one (session present) or a new one; an
        older connection of the same client id is taken over (closed). None when a new
        session would exceed the session limit."""
        sess = self.sessions.get(client_id)
        if sess is not None and sess.client is not None:
            log.debug("client %s taken over by a new connection from %s", client_id, client.peer)
            self.take_over(sess.client, clean_start or (sess.will is not None and sess.will.delay == 0))
        if sess is not None and sess.client is None and (end := sess.expires_at()) is not None \
                and self.time.wall >= end:  # expired, and the sweep has not got to it yet
            if sess.will is not None:
                self.publish_will(sess)
            self.end(sess)
            sess = None
        if sess is not None and (clean_start or not sess.persistent):
            if sess.will is not None and sess.will_due is not None:
                self.publish_will(sess)  # a will delay never outlives the session
            self.end(sess)
            sess = None
        present = sess is not None
        if sess is None:
            if len(self.sessions) >= self.max_sessions:
                return None
            sess = Session(client_id, version, expiry)
            self.sessions[client_id] = sess
        else:
            sess.version = version
            sess.expiry_interval = expiry
        sess.will = None
        sess.will_due = None
        if will is not None:
            sess.will = WillState(will.topic, will.payload, will.qos, will.retain, will.properties,
                                  will.properties.will_delay_interval or 0)
        sess.client = client
        sess.disconnected_at = None
        client.session = sess
        self.clients[client] = None
        if sess.persistent:
            self.persist(sess)
        elif client_id in self.stored_client_ids:
            self._forget_stored(sess)
        return sess, present

    # ---- the end of a connection, of a session

    def detach(self, client: Client, *, publish_will: bool) -> None:
        """The connection is gone (or going): the session carries on or ends."""
        self.clients.pop(client, None)
        sess = client.session
        client.session = None
        if sess is None or sess.client is not client:
            return
        sess.client = None
        sess.disconnected_at = self.time.wall
        self.offline(sess)
        if not publish_will:
            sess.will = None
        if not sess.persistent:
            if sess.will is not None:
                self.publish_will(sess)
            self.end(sess)
            return
        if sess.will is not None:
            delay = min(sess.will.delay, sess.expiry_interval)
            if delay <= 0:
                self.publish_will(sess)
            else:
                sess.will_due = sess.disconnected_at + delay
        self.persist(sess)

    def shut_down(self, client: Client) -> None:
        """The broker stops: the session stays as stored, its will fires after the restart as
        for a lost connection."""
        self.clients.pop(client, None)
        sess = client.session
        client.session = None
        if sess is not None and sess.persistent and sess.client is client:
            sess.client = None
            sess.disconnected_at = self.time.wall
            self.offline(sess)
            self.persist(sess)

    def publish_will(self, sess: Session) -> None:
        w = sess.will
        sess.will = None
        sess.will_due = None
        if w is None:
            return
        expiry = w.properties.message_expiry_interval
        props = replace(w.properties, will_delay_interval=None) if w.properties is not NO_PROPERTIES else w.properties
        msg = Message(w.topic, w.payload, w.qos, w.retain, props,
                      self.time.wall + expiry if expiry is not None else None, sess.client_id)
        log.debug("publishing will of %s to %s", sess.client_id, w.topic)
        self.route(msg)

    def end(self, sess: Session) -> None:
        """The session is over: its subscriptions go, its stored rows are deleted."""
        self.subscriptions.remove_all(sess)
        self.sessions.pop(sess.client_id, None)
        if sess.client_id in self.stored_client_ids:
            self._forget_stored(sess)
        # Shared-subscription messages this session had not acknowledged go to another member
        # of their group rather than being lost with it [MQTT-4.8.2, "SHOULD"].
        stranded = [(o.message, o.group) for o in sess.inflight.values()
                    if o.group is not None and o.message is not None and o.state != AWAIT_PUBCOMP]
        stranded += [(q.message, q.group) for q in sess.queue or () if q.group is not None]
        sess.inflight = NO_INFLIGHT
        sess.queue = None
        sess.queued_bytes = 0
        for msg, (group, flt) in stranded:
            self.subscriptions.deliver_shared(msg, group, flt, 0)

    def sweep(self) -> None:
        """Delayed wills that are due, sessions that expired (offline ones only)."""
        now = self.time.wall
        for sess in list(self.sessions.values()):
            if sess.client is not None or type(sess.moving) is Leaving:  # the new owner's now
                continue
            if sess.will_due is not None and now >= sess.will_due:
                self.publish_will(sess)
                if sess.persistent:
                    self.persist(sess)
            end = sess.expires_at()
            if end is not None and now >= end:
                log.debug("session %s expired", sess.client_id)
                if sess.will is not None:
                    self.publish_will(sess)
                self.end(sess)

    # ---- the store

    @staticmethod
    def record(sess: Session) -> SessionRecord:
        """The session's stored record: options, subscriptions, will."""
        will = None
        if sess.will is not None:
            w = sess.will
            will = StoredWill(w.topic, w.payload, w.qos, w.retain, w.properties, w.delay)
        subs = tuple(StoredSubscription(flt, s.qos, s.no_local, s.retain_as_published, s.retain_handling,
                                        s.subscription_id) for flt, s in (sess.subscriptions or {}).items())
        return SessionRecord(sess.client_id, sess.version, sess.expiry_interval, sess.disconnected_at, subs, will)

    def persist(self, sess: Session) -> None:
        """Write the session record (options, subscriptions, will) to the current batch."""
        self.commit.batch().put_session(self.record(sess))
        self.replicate(sess.client_id)
        if not self.stored_client_ids:  # alive marks resume with the first stored session
            self.commit.mark_alive()
        self.stored_client_ids.add(sess.client_id)

    def _forget_stored(self, sess: Session) -> None:
        """Delete the session's stored rows; its in-memory state no longer points at them."""
        self.commit.batch().delete_session(sess.client_id)
        self.stored_client_ids.discard(sess.client_id)
        self.replicate(sess.client_id)
        release_rows(sess)


def release_rows(sess: Session) -> None:
    """The session's stored rows are deleted (by the caller's batch): the messages it shares
    with other sessions count one row less each (``Message.unref``)."""
    for q in sess.queue or ():
        if q.seq is not None:
            q.seq = None
            q.message.unref()
    for out in sess.inflight.values():
        if out.message is not None:
            out.message.unref()


def _message_from_stored(smsg: StoredMessage, msg_id: int | None) -> Message:
    return Message(smsg.topic, smsg.payload, smsg.qos, smsg.retain, smsg.properties, smsg.expires_at,
                   None, msg_id, refs=1 if msg_id is not None else 0)
