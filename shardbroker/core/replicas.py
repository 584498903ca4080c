"""Copies of a virtual shard's session records on its backup, for its successor.

The shard map names for each virtual shard a *backup*: the best slot on another node
(``cluster.placement.place_with_backups``), which is exactly where the shard goes if its
owner's node leaves. The owning worker sends that worker a copy of each persistent session
record of the shard (client ID, protocol version, expiry interval, subscriptions, will; not
its messages, but the packet ids of its QoS 2 exchanges in flight, and whether the client
acknowledged each one sent) as it commits it, and the whole set when the backup changes,
when the shard becomes this worker's, or when the backup's worker (re)starts
(``SessionReplicas``, peer kind 21: ``vshard`` -1 for changes, a virtual shard for its
whole set).

The backup keeps them in memory. When the map gives it the shard and no live previous owner
is to send the sessions (the owner's node lost its lease: killed, cut off), it takes them as
sessions of its own (``restore``), stored, their routes announced, disconnected at that moment
(so their wills follow): a client of that node that connects again finds its session, with its
subscriptions, and the publishes made since reach it. The messages the lost node held are not
copied; they are still in its store, and come back with the shard when that node serves again
(``core/moves.py`` merges the two sessions). A backup that restarts has no copies until its
owners send them again (at once: its routes announce it).

No I/O: the shell tells it the backups (``set_backups``) and which shards to restore.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from shardbroker.core.client import Client
from shardbroker.core.commit import Commit
from shardbroker.core.peers import PeerLink
from shardbroker.core.session import AWAIT_PUBCOMP, AWAIT_PUBREC, Leaving, Restored, Session
from shardbroker.core.sessions import Sessions
from shardbroker.peer.messages import REMOTE_BASE, ReplicasQuery, SessionReplicas
from shardbroker.protocol.packets import Publish
from shardbroker.storage.batch import vshard_of
from shardbroker.storage.records import InflightRecord, SessionRecord, StoredMessage, StoreError
from shardbroker.storage.session_state import ClientState, pack_state, put_state, unpack_state

if TYPE_CHECKING:
    from shardbroker.core.clock import EventTime
    from shardbroker.core.delivery import Delivery

log = logging.getLogger("shardbroker.replicas")

CHUNK_BYTES = 64 * 1024  # the records of one SessionReplicas (one bigger record goes alone)


# A QoS 2 message in flight to the client, as its copy has it (no message: it is in the lost
# node's store). PUBREC seen: the successor sends PUBREL (the client answers PUBCOMP). Not
# seen: the client may or may not have it, so the successor holds the packet id for it
# (``Delivery.refill``) until the message comes back with the lost node's session, or for
# ``HOLD_FOR_LOST`` seconds, then sends PUBREL (``Delivery.release``)
_PUBREL_DUE = InflightRecord(None, 2, AWAIT_PUBCOMP)
_HELD = InflightRecord(None, 2, AWAIT_PUBREC)
HOLD_FOR_LOST = 120.0
# A client whose session was taken from a copy sends again (DUP) the QoS 2 publishes it had no
# PUBREC for. One under a packet id the copy did not name may be one the lost node took, and
# routed, after its last copy left (its bus stopped with that copy, and the forwards leave
# when it is back): routed here too it would arrive twice. So it waits, unacknowledged (the
# client keeps it), until the lost node's own session merges with this one and says whether
# it had that id (``Replicas.merged``), or ``RESENDS_WAIT`` seconds (the node is lost for
# good): then it is taken as new. A client that goes meanwhile sends it again. After a merge,
# for ``RESENDS_WAIT`` too, a resend (DUP) under an id only the session not kept held is
# acknowledged only: that session had taken it (a new publish under that id has no DUP).
RESENDS_WAIT = 30.0
RESEND_NEW, RESEND_WAITS, RESEND_HAD = 0, 1, 2  # what ``Replicas.resent`` says of a resend
# seconds a worker keeps its copies of a virtual shard after it stopped being its backup, for
# a successor that became the backup a moment before the owner was lost and has none yet
# (``ReplicasQuery``)
KEEP_AFTER = 10.0
# seconds a shard taken with no copies here waits for another worker's (its clients are
# refused meanwhile) before it is served with none
COPIES_WAIT = 1.5
# packet ids a session taken from a copy skips past the next one its copy named: the lost
# node gave the ids after that one to messages its last copies did not reach the backup with
# (its bus stopped with them), which the client may hold awaiting PUBREL; the merge sends
# those messages again under the same ids (``Delivery.refill``)
PID_SKIP = 4096
# seconds a session taken from a copy notes the publish numbers it gets (``session.Restored``):
# longer than the other nodes take to drop the lost node's routes once its shards are taken
RESTORED_MARKS = 10.0


class Replicas:
    def __init__(self, shard: int, sessions: Sessions, commit: Commit, link: PeerLink,
                 time: EventTime, stats: dict[str, int], wake: Callable[[], None]) -> None:
        self.shard = shard
        self.sessions = sessions
        self.commit = commit
        self.link = link
        self.time = time
        self.stats = stats
        self.wake = wake
        self.backup: tuple[int, ...] = ()  # per virtual shard served here: its backup's peer id, or -1
        self._pending: set[str] = set()  # sessions changed in this iteration
        self.held: dict[int, dict[str, bytes]] = {}  # as a backup: vshard -> client id -> record
        # sessions taken from copies here: they lack the publishes the lost node got before
        self.restored: set[str] = set()
        # sessions holding packet ids for a lost node's QoS 2 messages -> since when (monotonic)
        self.holding: dict[str, float] = {}
        # sessions taken from copies here that the lost node's own has not merged with yet ->
        # since when (monotonic); the resends waiting for that merge (``RESENDS_WAIT``)
        self.awaiting: dict[str, float] = {}
        self.resends: dict[str, tuple[Client, dict[int, Publish]]] = {}
        # after a merge: the incoming QoS 2 ids only the session not kept held, and since when
        self.other_had: dict[str, tuple[set[int], float]] = {}
        # handles waiting resends again, as they came (``resent`` decides then)
        self.release: Callable[[Client, Session, list[Publish]], None] = lambda client, sess, pkts: None
        self.delivery: Delivery | None = None  # set by the broker
        # virtual shard -> when its copies go (monotonic): this worker no longer backs it up
        self._unkept: dict[int, float] = {}
        # shards taken here with no copies: vshard -> (the lost worker that served it, until
        # when their copies are waited for, monotonic)
        self.copies_awaited: dict[int, tuple[int, float]] = {}
        self._answered: dict[int, float] = {}  # vshard -> until when further answers are ignored
        # the shards taken from a lost worker, announced (``Peers.shards_taken``; by the broker)
        self.taken: Callable[[int, list[int]], None] = lambda previous, vshards: None
        for key in ("replicas_sent", "replicas_held", "sessions_restored", "resends_waited", "resends_had",
                    "replicas_asked", "replicas_not_found"):
            stats.setdefault(key, 0)

    # ---- as the owner

    def changed(self, client_id: str) -> None:
        """The iteration's batch writes or deletes the session of ``client_id``, or changes the
        QoS 2 packet ids it uses: its copy goes to the backup once the commit succeeded."""
        if self.backup:
            self._pending.add(client_id)

    def committed(self, ok: bool) -> None:
        """The iteration's commit is done: its session changes go to their backups (not when it
        failed: nothing was written, and the next change sends the session again)."""
        pending, self._pending = self._pending, set()
        if not ok or not pending or not self.backup:
            return
        out: dict[int, list[tuple[str, bytes]]] = {}
        backup = self.backup
        for cid in pending:
            peer = backup[vshard_of(cid)]
            if peer >= REMOTE_BASE:
                out.setdefault(peer, []).append((cid, self._copy(cid)))
        for peer, items in out.items():
            self._send(peer, -1, items)

    def _copy(self, client_id: str) -> bytes:
        """What the backup keeps of a session: its record, the packet ids of its QoS 2
        messages in flight either way (a successor that did not know them would reuse one the
        client still holds, or take a resent publish for a new one), or empty: no session."""
        sess = self.sessions.get(client_id)
        if sess is None or client_id not in self.sessions.stored_client_ids:
            return b""
        out: list[tuple[int, InflightRecord, StoredMessage | None]] = [
            (pid, _PUBREL_DUE if o.state == AWAIT_PUBCOMP else _HELD, None)
            for pid, o in sess.inflight.items() if o.qos == 2]
        return pack_state(ClientState(self.sessions.record(sess), out, [], sorted(sess.qos2_in or ()),
                                      sess.next_pid))

    def set_backups(self, backup: tuple[int, ...]) -> None:
        """The backup of each virtual shard served here (-1 elsewhere; empty: none at all).
        A shard with a new backup, or new here, sends that backup its whole set."""
        old, self.backup = self.backup, backup
        if not backup:
            self._pending.clear()
            return
        self.send_full([v for v, peer in enumerate(backup)
                        if peer >= REMOTE_BASE and (not old or old[v] != peer)])

    def peer_synced(self, peer: int) -> None:
        """``peer`` (re)started or has just come to hear this worker: the sets it backs up go
        again (a backup keeps them in memory only)."""
        if peer >= REMOTE_BASE and self.backup:
            self.send_full([v for v, p in enumerate(self.backup) if p == peer])

    def send_full(self, vshards: list[int]) -> None:
        """Each of ``vshards``' whole set of persistent session records to its backup."""
        if not vshards:
            return
        wanted = set(vshards)
        sets: dict[int, list[tuple[str, bytes]]] = {v: [] for v in vshards}
        stored = self.sessions.stored_client_ids
        for cid, sess in self.sessions.sessions.items():
            v = vshard_of(cid)
            if v in wanted and cid in stored and type(sess.moving) is not Leaving:
                sets[v].append((cid, self._copy(cid)))
        for v, items in sets.items():
            self._send(self.backup[v], v, items)

    def _send(self, peer: int, vshard: int, items: list[tuple[str, bytes]]) -> None:
        """``items`` to ``peer`` in messages of at most ``CHUNK_BYTES``: the first names
        ``vshard`` (a whole set: it replaces the one held), the rest are changes."""
        chunk: list[tuple[str, bytes]] = []
        size = 0
        first = vshard
        for item in items:
            if chunk and size + len(item[1]) > CHUNK_BYTES:
                self.link.send(peer, SessionReplicas(self.shard, first, tuple(chunk)), size)
                first, chunk, size = -1, [], 0
            chunk.append(item)
            size += len(item[0]) + len(item[1])
        if chunk or first >= 0:
            self.link.send(peer, SessionReplicas(self.shard, first, tuple(chunk)), size)
        self.stats["replicas_sent"] += len(items)
        self.wake()

    # ---- as the backup

    def on_replicas(self, m: SessionReplicas) -> None:
        held = self.held
        if m.vshard >= 0:
            if self.time.mono < self._answered.get(m.vshard, 0.0):
                return  # another answer to a query already answered: the shard is served here
            self._unkept.pop(m.vshard, None)  # its owner names this worker its backup (again)
            before = len(held.pop(m.vshard, ()))
            held[m.vshard] = {cid: blob for cid, blob in m.items if blob}
            self.stats["replicas_held"] += len(held[m.vshard]) - before
            waited = self.copies_awaited.pop(m.vshard, None)
            if waited is not None:  # asked for: the shard's sessions, at last
                self._answered[m.vshard] = self.time.mono + COPIES_WAIT
                log.warning("shard %d: virtual shard %d: its session copies came from peer %d",
                            self.shard, m.vshard, m.shard)
                self.restore([m.vshard])
                if waited[0] >= 0:
                    self.taken(waited[0], [m.vshard])
            return
        for cid, blob in m.items:
            records = held.setdefault(vshard_of(cid), {})
            if blob:
                self.stats["replicas_held"] += cid not in records
                records[cid] = blob
            elif records.pop(cid, None) is not None:
                self.stats["replicas_held"] -= 1

    def hold(self, client_id: str) -> None:
        """``client_id``'s session (taken from a copy, or moved in with such ids) may hold
        packet ids for a lost node's messages: they are released after ``HOLD_FOR_LOST``."""
        sess = self.sessions.get(client_id)
        if sess is not None and any(o.message is None and o.state != AWAIT_PUBCOMP
                                    for o in sess.inflight.values()):
            self.holding.setdefault(client_id, self.time.mono)

    # ---- publishes sent again by the client of a session taken from a copy

    def resent(self, client: Client, sess: Session, pkt: Publish) -> int:
        """``pkt``, a QoS 2 publish sent again (DUP) under a packet id ``sess`` does not hold:
        ``RESEND_HAD`` if the other session of a merge had taken it (acknowledged only),
        ``RESEND_WAITS`` if it waits for a lost node's session, unacknowledged, else
        ``RESEND_NEW``."""
        cid = sess.client_id
        pid = pkt.packet_id
        if pid is None:
            return RESEND_NEW
        had = self.other_had.get(cid)
        if had is not None and pid in had[0]:
            had[0].discard(pid)
            self.stats["resends_had"] += 1
            return RESEND_HAD
        if cid not in self.awaiting:
            return RESEND_NEW
        held = self.resends.get(cid)
        if held is None or held[0] is not client:  # waiting ones of an earlier connection: resent
            held = self.resends[cid] = (client, {})
        held[1][pid] = pkt
        self.stats["resends_waited"] += 1
        return RESEND_WAITS

    def merged(self, client_id: str, other_had: Collection[int]) -> None:
        """Two sessions of ``client_id`` merged here (one a lost node's, or taken from a
        copy); ``other_had``: the incoming QoS 2 packet ids only the one not kept held, each
        a publish it had taken (and routed). Resends under those are acknowledged only, for
        ``RESENDS_WAIT``; the resends that waited are handled now."""
        if other_had:
            self.other_had[client_id] = (set(other_had), self.time.mono)
        else:
            self.other_had.pop(client_id, None)
        if self.awaiting.pop(client_id, None) is not None:
            self._release(client_id)

    def _release(self, client_id: str) -> None:
        held = self.resends.pop(client_id, None)
        sess = self.sessions.get(client_id)
        if held is None or sess is None or sess.client is not held[0]:
            return
        client = held[0]
        if client.closing or client.gone:
            return
        self.release(client, sess, list(held[1].values()))
        self.wake()

    def sweep(self) -> None:
        """Release the packet ids held longer than ``HOLD_FOR_LOST`` for messages that did not
        come back (their node is lost for ever, or its session went elsewhere), and take the
        resends that waited ``RESENDS_WAIT`` for a lost node's session."""
        mono = self.time.mono
        if self._unkept:
            for v, until in list(self._unkept.items()):
                if mono >= until:
                    del self._unkept[v]
                    self.stats["replicas_held"] -= len(self.held.pop(v, {}))
        if self._answered:
            for v in [v for v, until in self._answered.items() if mono >= until]:
                del self._answered[v]
        if self.copies_awaited:
            self._give_up_waiting()
        if self.awaiting:
            for cid in [cid for cid, since in self.awaiting.items() if mono - since >= RESENDS_WAIT]:
                del self.awaiting[cid]
                self._release(cid)
        if self.other_had:
            for cid in [cid for cid, (_ids, since) in self.other_had.items() if mono - since >= RESENDS_WAIT]:
                del self.other_had[cid]
        if not self.holding or self.delivery is None:
            return
        for cid, since in list(self.holding.items()):
            if mono - since < HOLD_FOR_LOST:
                continue
            del self.holding[cid]
            sess = self.sessions.get(cid)
            if sess is None:
                continue
            for pid, out in list(sess.inflight.items()):
                if out.message is None and out.state != AWAIT_PUBCOMP:
                    self.delivery.release(sess, pid)

    def keep_only(self, keep: Callable[[int], bool]) -> None:
        """Forget the copies of the shards ``keep`` says this worker no longer backs up, after
        ``KEEP_AFTER`` seconds (``sweep``): a successor without them may ask for them."""
        mono = self.time.mono
        for v in self.held:
            if keep(v):
                self._unkept.pop(v, None)
            else:
                self._unkept.setdefault(v, mono + KEEP_AFTER)

    def take(self, vshards: list[int], previous: dict[int, int]) -> int:
        """``vshards`` are served here now, with no live previous owner to send their
        sessions (``previous``: the lost worker that served each, where known): those this
        worker has copies of become sessions (``restore``) and are announced as taken; the
        others a lost worker served are asked of every worker (``ReplicasQuery``) and wait for
        ``COPIES_WAIT``. How many sessions restored."""
        have = [v for v in vshards if v in self.held]
        # only a shard a lost worker served is asked for (not one the map gives out first)
        missing = [v for v in vshards if v not in self.held and previous.get(v, -1) >= 0]
        restored = self.restore(have)
        by_previous: dict[int, list[int]] = {}
        for v in have:
            if previous.get(v, -1) >= 0:
                by_previous.setdefault(previous[v], []).append(v)
        for peer, vs in by_previous.items():
            self.taken(peer, vs)
        if missing:
            until = self.time.mono + COPIES_WAIT
            for v in missing:
                self.copies_awaited[v] = (previous[v], until)
            self.stats["replicas_asked"] += len(missing)
            self.link.broadcast(ReplicasQuery(self.shard, tuple(missing)))
            log.warning("shard %d: no session copies of virtual shards %s here: asked the other"
                        " workers", self.shard, ",".join(str(v) for v in missing))
            self.wake()
        return restored

    def on_query(self, m: ReplicasQuery) -> None:
        """A successor without copies asks: those kept here go to it."""
        for v in m.vshards:
            records = self.held.get(v)
            if records is not None:
                self._send(m.shard, v, list(records.items()))

    def _give_up_waiting(self) -> None:
        """Shards whose copies did not come in time are served with none."""
        mono = self.time.mono
        for v, (previous, until) in list(self.copies_awaited.items()):
            if mono < until:
                continue
            del self.copies_awaited[v]
            self.stats["replicas_not_found"] += 1
            log.error("shard %d: virtual shard %d: no worker had its session copies; serving it"
                      " without them (its clients get new sessions)", self.shard, v)
            if previous >= 0:
                self.taken(previous, [v])

    def _as_restored(self, sess: Session, next_pid: int) -> None:
        """``sess`` stands for the session a lost node held (taken from its copy, or kept
        from the moment it was given to it): its publish numbers are noted for the merge,
        QoS 2 resends wait for it, and the packet ids the lost node may have given since
        ``next_pid`` are skipped (``PID_SKIP``)."""
        mono = self.time.mono
        sess.moving = Restored(mono + RESTORED_MARKS, mono + RESTORED_MARKS + HOLD_FOR_LOST)
        if next_pid:
            sess.next_pid = (next_pid - 1 + PID_SKIP) % 65535 + 1
        cid = sess.client_id
        self.restored.add(cid)
        self.awaiting[cid] = mono
        self.hold(cid)

    def kept(self, sessions: list[Session]) -> None:
        """The sessions of a shard given to a worker that acknowledged them and was lost
        before it passed them on (``Moves.keep_given``): served here again, as if taken from
        a copy of that moment."""
        for sess in sessions:
            self._as_restored(sess, sess.next_pid)
        if sessions:
            self.stats["sessions_restored"] += len(sessions)
            self.wake()

    def restore(self, vshards: list[int]) -> int:
        """``vshards`` are served here now and no previous owner is to send their sessions:
        the copies held of them become sessions here (not those of a client that has one
        here already). How many."""
        batch = None
        announce: list[str] = []
        restored = 0
        wall = self.time.wall
        found: list[int] = []
        for v in vshards:
            records = self.held.pop(v, None)
            if not records:
                continue
            found.append(v)
            self.stats["replicas_held"] -= len(records)
            for cid, blob in records.items():
                if self.sessions.get(cid) is not None or cid in self.sessions.stored_client_ids:
                    continue
                try:
                    state = unpack_state(blob)
                except StoreError as exc:
                    log.error("shard %d: a session copy of %s: %s", self.shard, cid, exc)
                    continue
                rec = state.session
                if rec.disconnected_at is None:  # connected on the lost node: the connection ended now
                    state = ClientState(SessionRecord(rec.client_id, rec.protocol_version,
                                                      rec.expiry_interval, wall, rec.subscriptions,
                                                      rec.will), state.inflight, [], state.qos2_incoming,
                                        state.next_pid)
                if batch is None:
                    batch = self.commit.batch()
                announce += self.sessions.adopt(put_state(batch, state))
                sess = self.sessions.get(cid)
                if sess is not None:
                    self._as_restored(sess, state.next_pid)
                restored += 1
        if announce:
            self.sessions.subscriptions.announce(announce)
        if restored:
            self.stats["sessions_restored"] += restored
            log.warning("shard %d: %d sessions of virtual shards %s taken from their copies here"
                        " (their owner's node is gone; the messages it held come back with it)",
                        self.shard, restored, ",".join(str(v) for v in found))
            self.wake()
        return restored
