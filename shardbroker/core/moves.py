"""A virtual shard's persistent sessions moving between the workers of two nodes, on the bus.

When the shard map moves virtual shard ``v`` from node A to node B, A's worker closes v's
clients (``Broker.close_unserved``), commits, and then ``give``s v to B's worker (the grant's
``peer_of[v]``): it reads v's sessions from its store, each with its queue, inflight rows
and incoming QoS 2 ids (``storage.session_state``: the store's own record encodings), and
sends them as ``ShardState`` messages of at most ``CHUNK_BYTES``, then a ``ShardStateEnd``
with the count, in order on the bus after everything it sent B before. With them go the
publish numbers A had applied from each source (``Peers.seen_marks``): what the sessions
already hold.

No publish is missed meanwhile. A keeps the sessions in memory, their routes announced,
marked ``Leaving``: every copy a publish makes for one of them is relayed to B through A's
durable outbox (a ``DurableForward`` with a ``target``), as long as any shard may still send
A such publishes. B writes each session into the iteration's batch (new message ids and
seqs), takes it into memory (``Sessions.adopt``; its routes announced to every peer, marked
``Arrived``) and, once the commit that holds the ``ShardStateEnd``'s sessions succeeded,
serves the shard (``on_done``) and waits for every peer to acknowledge an empty
announcement (``Subscriptions.barrier``): each then sends B those sessions' publishes. Then
it acknowledges (``ShardStateAck``). A, acknowledged, waits for a barrier of its own: every
publish a peer sent it before learning of B's routes is then here (and relayed). Only then
does it drop the sessions (their routes withdrawn) and delete them from its store.

Between B's routes reaching a publisher and A's barrier, a publish reaches B both ways.
Publishes of QoS 1/2 are numbered per source (``DurableForward.mid``), so B keeps per moved
session and source (``Arrived``) the highest number A had applied when it gave the session up
(those are in the state) and the numbers taken each way since, and lets each copy through
once. A tells B when it has relayed the last copy (``ShardRelayEnd``, with the number of
its last durable forward to B); once B has applied that one, the marks go (at the latest
after ``MARKS_KEEP``). Across the two ways the order is not kept; copies of QoS 0 (which
are not numbered) are not relayed, and a copy for a shared subscription goes one way only.
Unacknowledged after ``RESEND_AFTER`` seconds, A sends the state again.

Which session wins when B already has one for the same client ID (a node that lost its lease
or was killed kept its own while the client got a new one elsewhere): B's, when it is
connected or its last disconnect is not older than the incoming one's (a resend after a lost
acknowledgement changes nothing); otherwise B's is ended and the incoming one taken. Either
way the one that stays gets the other's undelivered messages too (queued after its own; one
in flight on the other is sent again as a new message), so no acknowledged message is lost,
and the other's subscriptions it lacks (a client given a new session elsewhere may not have
subscribed again). The
map version each shard last arrived under is kept in the store (meta ``moves_in``), so a
restarted worker does not wait for a shard it already has. No I/O: the shell reads the
clock and calls in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from shardbroker.core.clock import EventTime
from shardbroker.core.commit import Commit
from shardbroker.core.peers import PeerLink
from shardbroker.core.session import (
    AWAIT_PUBCOMP,
    Arrived,
    Leaving,
    Message,
    Restored,
    Session,
    Subscribed,
    subscribed,
)
from shardbroker.core.sessions import Sessions, release_rows
from shardbroker.core.store import ShardStore
from shardbroker.peer.messages import (
    ShardRelayEnd,
    ShardState,
    ShardStateAck,
    ShardStateEnd,
    ShardStateQuery,
)
from shardbroker.storage.records import StoredMessage, StoreError
from shardbroker.storage.session_state import ClientState, pack_state, put_state, unpack_state

if TYPE_CHECKING:
    from shardbroker.core.delivery import Delivery

log = logging.getLogger("shardbroker.moves")

CHUNK_BYTES = 64 * 1024  # the sessions of one ShardState (one bigger session goes alone)
RESEND_AFTER = 5.0  # seconds without an acknowledgement before the state goes again
INCOMING_WAIT = 30.0  # seconds a worker refuses a shard moving in before it serves it anyway
ASK_AFTER = 1.0  # seconds a shard moving in waits before its previous owner is asked (and again)
BARRIER_WAIT = 4.0  # seconds a barrier may take before its worker goes on without it (a peer lost)
MARKS_KEEP = 120.0  # seconds a moved-in session keeps its marks at most (a relay end frees them)
MOVES_IN = "moves_in"  # meta: {vshard: map version it last arrived under}

# a message for a session: qos, retain, subscription ids, and the packet id it was in flight
# under (0: queued)
_Copy = tuple[Message, int, bool, tuple[int, ...], int]


def _held_copies(sess: Session) -> list[_Copy]:
    """The messages a session in memory has not delivered: in flight (but not those only
    awaiting PUBCOMP: delivered), then queued. Taken from it: a shared subscription's copies
    are not passed to another member of the group when it ends."""
    copies: list[_Copy] = []
    for pid, out in sess.inflight.items():
        if out.message is not None and out.state != AWAIT_PUBCOMP:
            copies.append((out.message, out.qos, out.retain, out.sub_ids, pid))
            out.group = None
    for q in sess.queue or ():
        copies.append((q.message, q.qos, q.retain, q.sub_ids, 0))
        q.group = None
    return copies


def _stored_copies(state: ClientState) -> list[_Copy]:
    """The messages a session moving in had not delivered, as ``_held_copies``."""
    copies: list[_Copy] = []
    for pid, row, smsg in state.inflight:
        if smsg is not None and row.state != AWAIT_PUBCOMP:
            copies.append((_message(smsg), row.qos, smsg.retain, (), pid))
    for _seq, _msg_id, qos, smsg in state.queue:
        copies.append((_message(smsg), qos, smsg.retain, (), 0))
    return copies


def _held_pubrels(sess: Session) -> list[int]:
    """The packet ids of a session in memory whose QoS 2 message the client has (PUBREC seen)
    and which owe it PUBREL."""
    return [pid for pid, out in sess.inflight.items() if out.qos == 2 and out.state == AWAIT_PUBCOMP]


def _stored_pubrels(state: ClientState) -> list[int]:
    """``_held_pubrels`` of a session moving in."""
    return [pid for pid, row, _smsg in state.inflight if row.qos == 2 and row.state == AWAIT_PUBCOMP]


def _numbers(got: tuple[tuple[int, tuple[int, ...]], ...], mark: object) -> dict[int, set[int]]:
    """The publish numbers a merge must not deliver twice: those a shipped state's session
    got after being taken from a copy (``got``), and those a session held here did
    (``mark``: its ``Restored`` or ``Arrived`` mark)."""
    numbers = {src: set(mids) for src, mids in got}
    if type(mark) is Restored or type(mark) is Arrived:
        for src, mids in mark.got.items():
            numbers.setdefault(src, set()).update(mids)
    return {src: mids for src, mids in numbers.items() if mids}


def _packed(numbers: dict[int, set[int]]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Publish numbers per source as a shipped state carries them (``ClientState.got``)."""
    return tuple(sorted((src, tuple(sorted(mids))) for src, mids in numbers.items() if mids))


def _message(smsg: StoredMessage) -> Message:
    return Message(smsg.topic, smsg.payload, smsg.qos, smsg.retain, smsg.properties, smsg.expires_at)


Relay = Callable[[int, str, Message, int, bool, tuple[int, ...], tuple[str, str] | None], None]


@dataclass(slots=True)
class _Out:
    """A shard given to another node's worker: its sessions relayed there until the end."""

    peer: int
    version: int
    client_ids: list[str]
    packed: list[bytes]
    seen: tuple[tuple[int, int], ...]  # the publish numbers applied here when it was given
    partial: list[bytes]  # sessions that do not hold every publish ``seen`` counts (sent without it)
    held: list[Session]  # in memory here, marked ``mark`` (those still marked are dropped at the end)
    mark: Leaving
    started: float  # monotonic: when the shard was given (its clients closed just before)
    sent_at: float
    ending: float = 0.0  # monotonic: when acknowledged (its barrier sent)


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
        self.ending: dict[int, _Out] = {}  # acknowledged, waiting for the barrier
        self.received: dict[int, int] = {}  # vshard -> the map version it last arrived under
        # (peer, vshard, version) -> sessions handled, and of those taken (not kept from here)
        self._handled: dict[tuple[int, int, int], int] = {}
        self._taken: dict[tuple[int, int, int], int] = {}
        self._ends: list[tuple[ShardStateEnd, int]] = []  # acknowledged after the next good commit
        # (peer, vshard, version) -> the end to acknowledge once the barrier is done, since when
        self._acking: dict[tuple[int, int, int], tuple[ShardStateEnd, float]] = {}
        self._adopted: list[str] = []  # sessions taken in this iteration (its commit holds them)
        self.on_done: Callable[[int, int, int], None] = lambda vshard, peer, count: None
        # a peer asks for a shard (vshard, peer, its epoch there): the shell gives it when the
        # grant says the shard is not this worker's any more
        self.asked: Callable[[int, int, int], None] = lambda vshard, peer, epoch: None
        # how many shards served here wait for their sessions (the shell knows its grant)
        self.moving_in: Callable[[], int] = lambda: 0
        # set by the broker: the peers' publish numbers, a copy relayed through the outbox,
        # a barrier (``Subscriptions.barrier``), peer ids as every node knows them, and delivery
        self.seen_marks: Callable[[], tuple[tuple[int, int], ...]] = lambda: ()
        self.relay: Relay = lambda peer, cid, msg, qos, retain, sub_ids, group: None
        self.barrier: Callable[[Callable[[], None]], None] = lambda done: done()
        self.global_id: Callable[[int], int] = lambda peer: peer
        # a session that lacks publishes the numbers applied here count (taken from a copy when
        # its node was lost: those went there): sent without them, so none is taken for had
        self.partial: Callable[[str], bool] = lambda client_id: False
        # a session moved in may hold packet ids for a lost node's messages (``Replicas.hold``)
        self.holding: Callable[[str], None] = lambda client_id: None
        # a session met the other of its client ID here, which held these incoming QoS 2 ids
        # (``Replicas.merged``: resends waiting for a lost node's session)
        self.lost_merged: Callable[[str, Collection[int]], None] = lambda client_id, had: None
        # sessions given away and kept after all (``keep_given``): they stand for the lost taker's
        self.on_kept: Callable[[list[Session]], None] = lambda sessions: None
        self.delivery: Delivery | None = None
        # the durable forwards: the last applied from a peer, the last sent to one
        self.inbox_mark: Callable[[int], int] = lambda peer: 0
        self.last_sent: Callable[[int], int] = lambda peer: 0
        # sessions that arrived with marks, by (previous worker, vshard), until its relays end
        self._arrived: dict[tuple[int, int], list[str]] = {}
        self._closing: list[tuple[int, int, int]] = []  # (peer, vshard, upto) of relay ends
        # (peer, vshard, version, client id) of the sessions arrived here, taken or merged: a
        # state sent again (its acknowledgement lost) adds nothing
        self._merged: set[tuple[int, int, int, str]] = set()
        self._merged_now: list[tuple[int, int, int, str]] = []  # of this iteration (its commit)
        for key in ("shards_moved_out", "shards_moved_in", "sessions_moved_out", "sessions_moved_in",
                    "moves_relayed", "moves_not_relayed", "moves_duplicates", "moves_unmatched",
                    "moves_merged", "moves_refilled"):
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
        if vshard in self.ending:  # given before and acknowledged: those sessions are gone
            self._finish(vshard, self.ending[vshard])
        mono, wall = self.time.mono, self.time.wall
        client_ids: list[str] = []
        packed: list[bytes] = []
        partial: list[bytes] = []
        mark = Leaving(peer)
        held: list[Session] = []
        if out is not None:  # on its way to another peer, which has not acknowledged: here now
            for sess in out.held:
                if sess.moving is out.mark:
                    sess.moving = mark
                    held.append(sess)
        for cid in list(self.store.client_ids([vshard])):
            state = self.store.client_state(cid)
            if state is None:
                continue
            here = self.sessions.get(cid)
            # the numbers a session taken from a copy is to drop go on with it (also once it
            # moved on again: an ``Arrived`` mark holds them then)
            mark_here = here.moving if here is not None else None
            if (type(mark_here) is Restored or type(mark_here) is Arrived) and mark_here.got:
                state = dataclasses.replace(state, got=_packed(mark_here.got))
            if here is not None and here.moving is not mark:
                here.moving = mark
                held.append(here)
            if state.session.disconnected_at is None:  # stored while connected (a crash since)
                at = here.disconnected_at if here is not None and here.disconnected_at else wall
                state = dataclasses.replace(state, session=dataclasses.replace(state.session,
                                                                               disconnected_at=at))
            client_ids.append(cid)
            (partial if self.partial(cid) else packed).append(pack_state(state))
        out = self.outgoing[vshard] = _Out(peer, version, client_ids, packed, self.seen_marks(), partial,
                                           held, mark, mono, mono)
        self._send(vshard, out)
        if client_ids:
            log.info("shard %d: virtual shard %d goes to peer %d: %d sessions sent", self.shard,
                     vshard, peer, len(client_ids))
        return len(client_ids)

    def _send(self, vshard: int, out: _Out) -> None:
        for blobs, seen in ((out.packed, out.seen), (out.partial, ())):
            chunk: list[bytes] = []
            size = 0
            for blob in blobs:
                if chunk and size + len(blob) > CHUNK_BYTES:
                    self.link.send(out.peer, ShardState(self.shard, vshard, out.version, tuple(chunk), seen), size)
                    chunk, size = [], 0
                chunk.append(blob)
                size += len(blob)
            if chunk:
                self.link.send(out.peer, ShardState(self.shard, vshard, out.version, tuple(chunk), seen), size)
        self.link.send(out.peer, ShardStateEnd(self.shard, vshard, out.version, len(out.client_ids)))
        out.sent_at = self.time.mono
        self.wake()

    def check(self, sess: Session, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
              group: tuple[str, str] | None) -> bool:
        """A copy of ``msg`` for ``sess``, which is moving (``Delivery.moving``): whether it is
        taken care of here (relayed to where the session went, or had already), so not placed."""
        mark = sess.moving
        if type(mark) is Leaving:
            if qos and msg.mid:
                self.relay(mark.peer, sess.client_id, msg, qos, retain, sub_ids, group)
            else:
                self.stats["moves_not_relayed"] += 1
            return True
        mid = msg.mid
        if type(mark) is Restored:  # taken from a copy (or merged with one): see ``Restored``
            if mid and group is None:
                src = self.global_id(msg.src)
                got = mark.got.get(src)
                if self.time.mono < mark.until:
                    if got is None:
                        got = mark.got[src] = set()
                    got.add(mid)
                    return False
                if got is not None and mid in got:
                    got.discard(mid)
                    self.stats["moves_duplicates"] += 1
                    return True
            if self.time.mono >= mark.forget_at:
                sess.moving = None
            return False
        if type(mark) is not Arrived:
            return False
        if self.time.mono >= mark.until:
            sess.moving = self._after_arrived(mark)
            return False
        if group is not None or not mid:  # a shared subscription's copy goes one way only
            return False
        src = self.global_id(msg.src)
        got = mark.got.get(src)
        if got is not None and mid in got:  # the lost node's copy of one the session has
            got.discard(mid)
            self.stats["moves_duplicates"] += 1
            return True
        relayed = mark.relayed.get(src)
        if mid <= mark.seen.get(src, 0) or (relayed is not None and mid in relayed):
            if relayed is not None:
                relayed.discard(mid)
            self.stats["moves_duplicates"] += 1
            return True
        direct = mark.direct.get(src)
        if direct is None:
            direct = mark.direct[src] = set()
        direct.add(mid)
        return False

    def relayed(self, msg: Message, client_id: str, sub_ids: tuple[int, ...],
                group: tuple[str, str] | None) -> None:
        """A copy relayed by the worker ``client_id``'s session moved from (``msg.src`` is
        already a global id): placed unless it came straight too."""
        sess = self.sessions.get(client_id)
        delivery = self.delivery
        if sess is None or delivery is None:
            self.stats["moves_unmatched"] += 1
            log.warning("shard %d: a publish relayed for %s, which has no session here: dropped",
                        self.shard, client_id)
            return
        if msg.expires_at is not None and self.time.wall >= msg.expires_at:
            self.stats["expired"] += 1
            return
        mark = sess.moving
        if type(mark) is Leaving:  # moving on already: relayed again
            delivery.deliver(sess, msg, msg.qos, msg.retain, sub_ids, group)
            return
        if (type(mark) is Arrived or type(mark) is Restored) and group is None and msg.mid:
            got = mark.got.get(msg.src)
            if got is not None and msg.mid in got:  # the lost node's copy of one the session has
                got.discard(msg.mid)
                self.stats["moves_duplicates"] += 1
                return
        if type(mark) is Arrived and group is None and msg.mid and self.time.mono < mark.until:
            src, mid = msg.src, msg.mid
            direct = mark.direct.get(src)
            if direct is not None and mid in direct:
                direct.discard(mid)
                self.stats["moves_duplicates"] += 1
                return
            relayed = mark.relayed.get(src)
            if relayed is None:
                relayed = mark.relayed[src] = set()
            relayed.add(mid)
            delivery.place(sess, msg, msg.qos, msg.retain, sub_ids, group)
            self._in_order(sess, msg)
            return
        delivery.place(sess, msg, msg.qos, msg.retain, sub_ids, group)

    def _in_order(self, sess: Session, msg: Message) -> None:
        """A relayed copy just queued for ``sess`` goes before the copies of the same source
        with higher numbers that came straight before it (in memory: the store keeps the
        rows in arrival order, which a restart in the middle of a move would show)."""
        queue = sess.queue
        if not queue or queue[-1].message is not msg:
            return
        src, mid, glob = msg.src, msg.mid, self.global_id
        for i, q in enumerate(queue):
            other = q.message
            if other is msg:
                return
            if other.mid > mid and glob(other.src) == src:
                queue.insert(i, queue.pop())
                return

    def on_relay_end(self, m: ShardRelayEnd) -> None:
        """The previous owner relays nothing more for ``m.vshard``'s sessions: once its
        forwards up to ``m.upto`` are applied here, they need their marks no longer."""
        self._closing.append((m.shard, m.vshard, m.upto))
        self._close_due()

    def _close_due(self) -> None:
        if not self._closing:
            return
        waiting = []
        for peer, vshard, upto in self._closing:
            if self.inbox_mark(peer) < upto:
                waiting.append((peer, vshard, upto))
                continue
            for cid in self._arrived.pop((peer, vshard), ()):
                sess = self.sessions.get(cid)
                if sess is not None and type(sess.moving) is Arrived:
                    sess.moving = self._after_arrived(sess.moving)
        self._closing = waiting

    def on_ack(self, m: ShardStateAck) -> None:
        """The new owner has the sessions, and every peer its routes: once every peer has
        answered a barrier of this worker's too, what they sent here is relayed, and the
        sessions can go."""
        out = self.outgoing.get(m.vshard)
        if out is None or out.peer != m.shard or out.version != m.version:
            return
        del self.outgoing[m.vshard]
        self.ending[m.vshard] = out
        out.ending = self.time.mono
        vshard = m.vshard
        self.barrier(partial(self._finish, vshard, out))
        self.wake()

    def _finish(self, vshard: int, out: _Out) -> None:
        if self.ending.get(vshard) is not out:
            return
        del self.ending[vshard]
        self.link.send(out.peer, ShardRelayEnd(self.shard, vshard, out.version, self.last_sent(out.peer)))
        batch = self.commit.batch()
        for sess in out.held:
            if sess.moving is out.mark and self.sessions.get(sess.client_id) is sess:
                sess.moving = None
                self.sessions.drop(sess.client_id)
                release_rows(sess)
        for cid in out.client_ids:
            if self.sessions.get(cid) is None:  # not back here meanwhile
                batch.delete_session(cid)
        if out.client_ids:  # a shard without sessions moved nothing
            self.stats["shards_moved_out"] += 1
            self.stats["sessions_moved_out"] += len(out.client_ids)
        log.log(logging.INFO if out.client_ids else logging.DEBUG,
                "shard %d: virtual shard %d moved out to peer %d: %d sessions, %.3f s from"
                " closing its clients to the acknowledgement, %.3f s more until every peer"
                " knew", self.shard, vshard, out.peer, len(out.client_ids),
                out.ending - out.started, self.time.mono - out.ending)
        self.wake()

    def sweep(self) -> None:
        """Send again what has not been acknowledged in ``RESEND_AFTER`` seconds; end the
        barriers a lost peer holds up."""
        mono = self.time.mono
        for vshard, out in self.outgoing.items():
            if mono - out.sent_at >= RESEND_AFTER and out.peer in self.link.peers:
                log.warning("shard %d: virtual shard %d: no acknowledgement from peer %d;"
                            " sending its %d sessions again", self.shard, vshard, out.peer,
                            len(out.client_ids))
                self._send(vshard, out)
        for vshard, out in list(self.ending.items()):
            if mono - out.ending >= BARRIER_WAIT:
                log.warning("shard %d: virtual shard %d: a peer has not answered in %.0f s;"
                            " its sessions go all the same", self.shard, vshard, BARRIER_WAIT)
                self._finish(vshard, out)
        self._close_due()
        for key, (end, since) in list(self._acking.items()):
            if mono - since >= BARRIER_WAIT:
                log.warning("shard %d: virtual shard %d: a peer has not answered in %.0f s;"
                            " acknowledged all the same", self.shard, end.vshard, BARRIER_WAIT)
                self._ack(key)

    def peer_synced(self, peer: int) -> None:
        """``peer`` sent its routes: it (re)started, or has just come to hear this worker (a
        worker refuses the batches of a node its grant does not name yet): what is on its way
        there goes again."""
        for vshard, out in self.outgoing.items():
            if out.peer == peer:
                self._send(vshard, out)

    def forget_peer(self, peer: int) -> None:
        """``peer``'s node left: what was on its way there and not acknowledged is taken back
        (it is still in the store), to be given to the shard's next owner, or served here."""
        for vshard in [v for v, out in self.outgoing.items() if out.peer == peer]:
            self.take_back(vshard)

    def take_back(self, vshard: int) -> int:
        """Stop giving ``vshard`` away (it is this worker's again, or its taker left): the
        sessions are served here again (their routes were never withdrawn). One acknowledged
        already is gone: its new owner gives it back. How many."""
        ending = self.ending.get(vshard)
        if ending is not None:
            self._finish(vshard, ending)
        out = self.outgoing.pop(vshard, None)
        if out is None:
            return 0
        back = 0
        for sess in out.held:
            if sess.moving is out.mark:
                sess.moving = None
                back += 1
        if back:
            log.warning("shard %d: virtual shard %d: %d sessions taken back (peer %d did not"
                        " acknowledge them)", self.shard, vshard, back, out.peer)
        return back

    def keep_given(self, vshard: int) -> int:
        """``vshard`` is this worker's again, and the worker that acknowledged its sessions
        was lost before it passed them on (the map names no previous owner to send them): the
        sessions still held here, not yet dropped, are served here again (``on_kept``: as if
        taken from a copy of that moment; the lost worker's merge with them when it is back).
        How many."""
        out = self.ending.pop(vshard, None)
        if out is None:
            return 0
        kept = [sess for sess in out.held
                if sess.moving is out.mark and self.sessions.get(sess.client_id) is sess]
        for sess in kept:
            sess.moving = None
        self.on_kept(kept)
        if kept:
            log.warning("shard %d: virtual shard %d: %d sessions kept (peer %d, which took them, is"
                        " gone and the shard is served here again)", self.shard, vshard, len(kept), out.peer)
        return len(kept)

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
            carried: list[_Copy] = []
            pubrels: list[int] = []
            carried_subs: dict[str, Subscribed] = {}
            if have is not None:
                if have.client is not None or (have.disconnected_at or 0.0) >= (rec.disconnected_at or 0.0):
                    if (m.shard, m.vshard, m.version, rec.client_id) in self._merged:
                        continue  # the same state again (its acknowledgement was lost)
                    self._merged.add((m.shard, m.vshard, m.version, rec.client_id))
                    self._merged_now.append((m.shard, m.vshard, m.version, rec.client_id))
                    announce += self._add_subscriptions(have, {
                        sub.topic_filter: subscribed(sub.qos, sub.no_local, sub.retain_as_published,
                                                     sub.retain_handling, sub.subscription_id)
                        for sub in rec.subscriptions})
                    copies = _stored_copies(state)
                    numbers = _numbers(state.got, have.moving)
                    if numbers:  # a publish that reached both sessions: one copy goes
                        held = [out.message for out in have.inflight.values() if out.message is not None]
                        held += [q.message for q in have.queue or ()]
                        drop = {j for _i, j in self._alike(held, numbers, copies)}
                        copies = [c for j, c in enumerate(copies) if j not in drop]
                    n = self._carry(have, copies, _stored_pubrels(state))
                    if have.moving is None or type(have.moving) is Restored:
                        # the other worker relays what still reaches it there: taken once
                        have.moving = Arrived({}, self.time.mono + MARKS_KEEP, got=numbers)
                        self._arrived.setdefault((m.shard, m.vshard), []).append(rec.client_id)
                    self.lost_merged(rec.client_id, set(state.qos2_incoming) - (have.qos2_in or set()))
                    log.info("shard %d: kept the session of %s held here (newer than the one from"
                             " peer %d), with the %d messages that one held", self.shard,
                             rec.client_id, m.shard, n)
                    continue
                carried = _held_copies(have)
                pubrels = _held_pubrels(have)
                if state.got:  # publishes the incoming one got that were kept for this one too
                    carried = self._not_got(carried, state.got)
                own = _numbers((), have.moving)  # this one was taken from a copy
                if own:  # what it got that the incoming one holds too: its own copy goes
                    drop = {i for i, _j in self._alike([c[0] for c in carried], own, _stored_copies(state))}
                    carried = [c for i, c in enumerate(carried) if i not in drop]
                    got_left = {src: set(mids) for src, mids in state.got}
                    for src, mids in own.items():
                        got_left.setdefault(src, set()).update(mids)
                    state = dataclasses.replace(state, got=_packed(got_left))
                carried_subs = dict(have.subscriptions or {})
                other_had = set(have.qos2_in or ()) - set(state.qos2_incoming)
                self.sessions.end(have)
                self.lost_merged(rec.client_id, other_had)
            announce += self.sessions.adopt(put_state(batch, state))
            self._merged.add((m.shard, m.vshard, m.version, rec.client_id))  # taken: not again
            adopted = self.sessions.get(rec.client_id)
            if adopted is not None:
                self.holding(rec.client_id)
                adopted.moving = Arrived(dict(m.seen), self.time.mono + MARKS_KEEP,
                                         got={src: set(mids) for src, mids in state.got})
                self._arrived.setdefault((m.shard, m.vshard), []).append(rec.client_id)
                if carried or carried_subs:
                    announce += self._add_subscriptions(adopted, carried_subs)
                    n = self._carry(adopted, carried, pubrels)
                    log.info("shard %d: took the session of %s from peer %d (newer than the one held"
                             " here), with the %d messages this one held", self.shard,
                             rec.client_id, m.shard, n)
            self._adopted.append(rec.client_id)
            self._taken[key] = self._taken.get(key, 0) + 1
        if announce:
            self.sessions.subscriptions.announce(announce)
        self.wake()

    def _add_subscriptions(self, sess: Session, subs: dict[str, Subscribed]) -> list[str]:
        """The other session's subscriptions that ``sess`` lacks join it (a client that got a
        new session elsewhere may not have subscribed again), stored with it; the filters
        whose routes the peers must now hear of."""
        announce: list[str] = []
        added = 0
        for flt, sub in subs.items():
            if sess.subscriptions and flt in sess.subscriptions:
                continue
            if self.sessions.subscriptions.adopt(sess, flt, sub):
                announce.append(flt)
            added += 1
        if added:
            self.sessions.persist(sess)
        return announce

    def _after_arrived(self, mark: Arrived) -> Restored | None:
        """What an ``Arrived`` mark leaves when its marks go: the numbers still to drop of a
        session taken from a copy (``Restored``), or nothing."""
        if not any(mark.got.values()):
            return None
        mono = self.time.mono
        return Restored(mono, mono + MARKS_KEEP, mark.got)

    def _not_got(self, copies: list[_Copy], got: tuple[tuple[int, tuple[int, ...]], ...]) -> list[_Copy]:
        """``copies`` but those whose publish number ``got`` holds (``session.Restored``)."""
        numbers = {src: set(mids) for src, mids in got}
        glob = self.global_id
        kept = [c for c in copies if not (c[0].mid and c[0].mid in numbers.get(glob(c[0].src), ()))]
        self.stats["moves_duplicates"] += len(copies) - len(kept)
        return kept

    def _alike(self, numbered: list[Message], numbers: dict[int, set[int]],
               others: list[_Copy]) -> list[tuple[int, int]]:
        """A publish that reached both of two sessions of one client ID (one taken from a copy
        noted the numbers it got, ``Restored``): pairs (i, j) of ``numbered[i]``, whose number
        is in ``numbers`` (taken out of it), and the first copy ``others[j]`` (a stored state:
        no numbers) with the same topic and payload. Alike copies are interchangeable: keeping
        one of each pair, the client gets as many as were published. The numbers left are
        those still to drop when they arrive."""
        glob = self.global_id
        alike: dict[tuple[str, bytes], list[int]] = {}
        for j, c in enumerate(others):
            alike.setdefault((c[0].topic, c[0].payload), []).append(j)
        pairs: list[tuple[int, int]] = []
        for i, msg in enumerate(numbered):
            mids = numbers.get(glob(msg.src)) if msg.mid else None
            if mids is None or msg.mid not in mids:
                continue
            mids.discard(msg.mid)
            same = alike.get((msg.topic, msg.payload))
            if same:
                pairs.append((i, same.pop(0)))
        self.stats["moves_duplicates"] += len(pairs)
        for src in [src for src, mids in numbers.items() if not mids]:
            del numbers[src]
        return pairs

    def _carry(self, sess: Session, copies: list[_Copy], pubrels: list[int]) -> int:
        """Two nodes each held a session for one client ID (a node that lost its lease, or was
        killed, kept its own while the client got another one elsewhere): the one that stays
        gets the other's messages too, after its own (in flight there: queued here, sent again
        as new messages, unless their packet id is free here or held for them), and the
        PUBRELs the other owed under ids free here. How many messages."""
        delivery = self.delivery
        if delivery is None:
            return 0
        for msg, qos, retain, sub_ids, pid in copies:
            # a QoS 2 one the other had sent goes again under its id, as the same message (the
            # client may hold it awaiting PUBREL), where that id is free or held for it here
            if pid and qos == 2 and delivery.refill(sess, pid, msg, retain, sub_ids):
                self.stats["moves_refilled"] += 1
                continue
            delivery.place(sess, msg, qos, retain, sub_ids, None)
        for pid in pubrels:
            delivery.owe_pubrel(sess, pid)
        self.stats["moves_merged"] += 1
        return len(copies)

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
        merged, self._merged_now = self._merged_now, []
        if not ok:  # not acknowledged: the sender sends them again, and they are taken then
            for cid in adopted:
                self.sessions.drop(cid)
            self._merged.difference_update(merged)
            return
        for m, taken in ends:
            self.received[m.vshard] = max(m.version, self.received.get(m.vshard, 0))
            if taken:
                self.stats["shards_moved_in"] += 1
                self.stats["sessions_moved_in"] += taken
            self.on_done(m.vshard, m.shard, taken)
            # acknowledged once every peer has heard of the sessions' routes (announced before)
            key = (m.shard, m.vshard, m.version)
            if key not in self._acking:
                self._acking[key] = (m, self.time.mono)
                self.barrier(partial(self._ack, key))

    def _ack(self, key: tuple[int, int, int]) -> None:
        done = self._acking.pop(key, None)
        if done is None:
            return
        m = done[0]
        self.link.send(m.shard, ShardStateAck(self.shard, m.vshard, m.version, m.count))
        self.wake()
