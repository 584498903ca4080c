"""A virtual shard's persistent sessions moving between the workers of two nodes, on the bus.

When the shard map moves virtual shard ``v`` from node A to node B, A's worker closes v's
clients (``Broker.close_unserved``), commits, and then ``give``s v to B's worker (the grant's
``peer_of[v]``): it reads v's sessions from its store, each with its queue, inflight rows
and incoming QoS 2 ids (``storage.session_state``: the store's own record encodings), drops
them from memory (their routes withdrawn) and sends them as ``ShardState`` messages of at
most ``CHUNK_BYTES``, then a ``ShardStateEnd`` with the count, in order on the bus after
everything it sent B before. It keeps them in its store until B's ``ShardStateAck``, then
deletes them; unacknowledged after ``RESEND_AFTER`` seconds, it sends them again.

B's worker writes each session into the iteration's batch (new message ids and seqs), takes
it into memory (``Sessions.adopt``; its routes announced to every peer) and, once the commit
that holds the ``ShardStateEnd``'s sessions succeeded, acknowledges and tells its shell
(``on_done``), which then serves v. Which session wins when B already has one for the same
client ID: B's, when it is connected or its last disconnect is not older than the incoming
one's (a resend after a lost acknowledgement changes nothing); otherwise B's is ended and
the incoming one taken. The map version each shard last arrived under is kept in the store
(meta ``moves_in``), so a restarted worker does not wait for a shard it already has.

Not covered here: publishes that match a moved session while it is in neither worker's
route table (from A's drop to B's announcement, about one bus round trip and a commit) are
not delivered to it; nor are durable forwards that reach A for it after the drop (A's outbox
acknowledges them, nothing matches). No I/O: the shell reads the clock and calls in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from shardbroker.core.clock import EventTime
from shardbroker.core.commit import Commit
from shardbroker.core.peers import PeerLink
from shardbroker.core.session import Session, Subscribed
from shardbroker.core.sessions import Sessions, release_rows
from shardbroker.core.store import ShardStore
from shardbroker.peer.messages import ShardState, ShardStateAck, ShardStateEnd, ShardStateQuery
from shardbroker.storage.records import StoreError
from shardbroker.storage.session_state import pack_state, put_state, unpack_state

log = logging.getLogger("shardbroker.moves")

CHUNK_BYTES = 64 * 1024  # the sessions of one ShardState (one bigger session goes alone)
RESEND_AFTER = 5.0  # seconds without an acknowledgement before the state goes again
INCOMING_WAIT = 30.0  # seconds a worker refuses a shard moving in before it serves it anyway
ASK_AFTER = 1.0  # seconds a shard moving in waits before its previous owner is asked (and again)
MOVES_IN = "moves_in"  # meta: {vshard: map version it last arrived under}


@dataclass(slots=True)
class _Out:
    """A shard given to another node's worker, kept until it acknowledges."""

    peer: int
    version: int
    client_ids: list[str]
    packed: list[bytes]
    # as they were in memory, with their subscriptions: released at the end, or reinstated
    dropped: list[tuple[Session, dict[str, Subscribed]]]
    started: float  # monotonic: when the shard was given (its clients closed just before)
    sent_at: float


class Moves:
    def __init__(self, shard: int, store: ShardStore, commit: Commit, sessions: Sessions,
                 link: PeerLink, time: EventTime, stats: dict[str, int],
                 wake: Callable[[], None]) -> None:
        self.shard = shard
        self.store = store
        self.commit = commit
        self.sessions = sessions
        self.link = link
        self.time = time
        self.stats = stats
        self.wake = wake
        self.outgoing: dict[int, _Out] = {}
        self.received: dict[int, int] = {}  # vshard -> the map version it last arrived under
        # (peer, vshard, version) -> sessions handled, and of those taken (not kept from here)
        self._handled: dict[tuple[int, int, int], int] = {}
        self._taken: dict[tuple[int, int, int], int] = {}
        self._ends: list[tuple[ShardStateEnd, int]] = []  # acknowledged after the next good commit
        self._adopted: list[str] = []  # sessions taken in this iteration (its commit holds them)
        self.on_done: Callable[[int, int, int], None] = lambda vshard, peer, count: None
        # a peer asks for a shard (vshard, peer, its epoch there): the shell gives it when the
        # grant says the shard is not this worker's any more
        self.asked: Callable[[int, int, int], None] = lambda vshard, peer, epoch: None
        # how many shards served here wait for their sessions (the shell knows its grant)
        self.moving_in: Callable[[], int] = lambda: 0
        for key in ("shards_moved_out", "shards_moved_in", "sessions_moved_out", "sessions_moved_in"):
            stats.setdefault(key, 0)

    def restore(self) -> None:
        """What arrived before a restart (meta ``moves_in``)."""
        value = self.store.get_meta(MOVES_IN)
        if isinstance(value, dict):
            self.received = {int(v): int(version) for v, version in value.items()}

    # ---- giving a shard away

    def give(self, vshard: int, peer: int, version: int) -> int:
        """Send ``vshard``'s stored sessions to ``peer`` (another node's worker), under map
        ``version``. The caller has closed the shard's clients and committed. How many."""
        out = self.outgoing.get(vshard)
        if out is not None and out.peer == peer:
            return len(out.client_ids)  # already on its way
        mono, wall = self.time.mono, self.time.wall
        client_ids: list[str] = []
        packed: list[bytes] = []
        # on its way to another peer, which has not acknowledged: those sessions go here now
        dropped: list[tuple[Session, dict[str, Subscribed]]] = out.dropped if out is not None else []
        for cid in list(self.store.client_ids([vshard])):
            state = self.store.client_state(cid)
            if state is None:
                continue
            was = self.sessions.drop(cid)
            if was is not None:
                dropped.append(was)
            if state.session.disconnected_at is None:  # stored while connected (a crash since)
                at = was[0].disconnected_at if was is not None and was[0].disconnected_at else wall
                state = dataclasses.replace(state, session=dataclasses.replace(state.session,
                                                                               disconnected_at=at))
            client_ids.append(cid)
            packed.append(pack_state(state))
        out = self.outgoing[vshard] = _Out(peer, version, client_ids, packed, dropped, mono, mono)
        self._send(vshard, out)
        if packed:
            log.info("shard %d: virtual shard %d goes to peer %d: %d sessions sent", self.shard,
                     vshard, peer, len(packed))
        return len(packed)

    def _send(self, vshard: int, out: _Out) -> None:
        chunk: list[bytes] = []
        size = 0
        for blob in out.packed:
            if chunk and size + len(blob) > CHUNK_BYTES:
                self.link.send(out.peer, ShardState(self.shard, vshard, out.version, tuple(chunk)), size)
                chunk, size = [], 0
            chunk.append(blob)
            size += len(blob)
        if chunk:
            self.link.send(out.peer, ShardState(self.shard, vshard, out.version, tuple(chunk)), size)
        self.link.send(out.peer, ShardStateEnd(self.shard, vshard, out.version, len(out.packed)))
        out.sent_at = self.time.mono
        self.wake()

    def on_ack(self, m: ShardStateAck) -> None:
        out = self.outgoing.get(m.vshard)
        if out is None or out.peer != m.shard or out.version != m.version:
            return
        del self.outgoing[m.vshard]
        batch = self.commit.batch()
        for cid in out.client_ids:
            if self.sessions.get(cid) is None:  # not back here meanwhile
                batch.delete_session(cid)
        for sess, _subs in out.dropped:
            release_rows(sess)
        if out.client_ids:  # a shard without sessions moved nothing
            self.stats["shards_moved_out"] += 1
            self.stats["sessions_moved_out"] += len(out.client_ids)
        log.log(logging.INFO if out.client_ids else logging.DEBUG,
                "shard %d: virtual shard %d moved out to peer %d: %d sessions, %.3f s from"
                " closing its clients to the acknowledgement", self.shard, m.vshard, m.shard,
                len(out.client_ids), self.time.mono - out.started)
        self.wake()

    def sweep(self) -> None:
        """Send again what has not been acknowledged in ``RESEND_AFTER`` seconds."""
        for vshard, out in self.outgoing.items():
            if self.time.mono - out.sent_at >= RESEND_AFTER and out.peer in self.link.peers:
                log.warning("shard %d: virtual shard %d: no acknowledgement from peer %d;"
                            " sending its %d sessions again", self.shard, vshard, out.peer,
                            len(out.packed))
                self._send(vshard, out)

    def peer_synced(self, peer: int) -> None:
        """``peer`` sent its routes: it (re)started, or has just come to hear this worker (a
        worker refuses the batches of a node its grant does not name yet): what is on its way
        there goes again."""
        for vshard, out in self.outgoing.items():
            if out.peer == peer:
                self._send(vshard, out)

    def forget_peer(self, peer: int) -> None:
        """``peer``'s node left before acknowledging: what was on its way there is taken back
        (it is still in the store), to be given to the shard's next owner, or served here."""
        for vshard in [v for v, out in self.outgoing.items() if out.peer == peer]:
            self.take_back(vshard)

    def take_back(self, vshard: int) -> int:
        """Stop giving ``vshard`` away (it is this worker's again, or its taker left): the
        sessions taken out of memory come back (their rows never left the store), their routes
        announced. How many."""
        out = self.outgoing.pop(vshard, None)
        if out is None:
            return 0
        announce: list[str] = []
        back = 0
        for sess, subs in out.dropped:
            if self.sessions.get(sess.client_id) is None:
                announce += self.sessions.reinstate(sess, subs)
                back += 1
        if announce:
            self.sessions.subscriptions.announce(announce)
        if back:
            log.warning("shard %d: virtual shard %d: %d sessions taken back (peer %d did not"
                        " acknowledge them)", self.shard, vshard, back, out.peer)
        return back

    # ---- taking a shard in

    def ask(self, vshard: int, peer: int, epoch: int) -> None:
        """Ask ``peer``, ``vshard``'s previous owner, for its sessions (a worker that restarted,
        or lost its lease, since it served the shard does not know it is waited for)."""
        self.link.send(peer, ShardStateQuery(self.shard, vshard, epoch))
        self.wake()

    def on_state(self, m: ShardState) -> None:
        batch = self.commit.batch()
        announce: list[str] = []
        key = (m.shard, m.vshard, m.version)
        for blob in m.sessions:
            try:
                state = unpack_state(blob)
            except StoreError as exc:
                log.error("shard %d: virtual shard %d from peer %d: %s", self.shard, m.vshard,
                          m.shard, exc)
                continue
            self._handled[key] = self._handled.get(key, 0) + 1
            rec = state.session
            have = self.sessions.get(rec.client_id)
            if have is not None:
                if have.client is not None or (have.disconnected_at or 0.0) >= (rec.disconnected_at or 0.0):
                    log.info("shard %d: kept the session of %s held here (newer than the one"
                             " from peer %d)", self.shard, rec.client_id, m.shard)
                    continue
                self.sessions.end(have)
            announce += self.sessions.adopt(put_state(batch, state))
            self._adopted.append(rec.client_id)
            self._taken[key] = self._taken.get(key, 0) + 1
        if announce:
            self.sessions.subscriptions.announce(announce)
        self.wake()

    def on_end(self, m: ShardStateEnd) -> None:
        key = (m.shard, m.vshard, m.version)
        handled = self._handled.pop(key, 0)
        taken = self._taken.pop(key, 0)
        if handled < m.count:  # a batch was lost on the way: the sender sends it all again
            log.warning("shard %d: virtual shard %d from peer %d: %d of %d sessions arrived;"
                        " waiting for them again", self.shard, m.vshard, m.shard, handled, m.count)
            return
        self._ends.append((m, taken))
        self.wake()

    def persist(self) -> None:
        """Before the iteration's commit: the versions the shards completed in it arrived
        under join ``moves_in`` (one write however many shards)."""
        if not self._ends:
            return
        received = dict(self.received)
        for m, _taken in self._ends:
            received[m.vshard] = max(m.version, received.get(m.vshard, 0))
        self.commit.batch().set_meta(MOVES_IN, received)

    def committed(self, ok: bool) -> None:
        """The iteration's commit is done: acknowledge the shards it completed."""
        ends, self._ends = self._ends, []
        adopted, self._adopted = self._adopted, []
        if not ok:  # not acknowledged: the sender sends them again, and they are taken then
            for cid in adopted:
                self.sessions.drop(cid)
            return
        for m, taken in ends:
            self.received[m.vshard] = max(m.version, self.received.get(m.vshard, 0))
            self.link.send(m.shard, ShardStateAck(self.shard, m.vshard, m.version, m.count))
            if taken:
                self.stats["shards_moved_in"] += 1
                self.stats["sessions_moved_in"] += taken
            self.on_done(m.vshard, m.shard, taken)
