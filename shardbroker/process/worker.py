"""A worker process: the asyncio shell around one shard's ``Broker``.

It opens the shard's store, receives client sockets from the acceptor
(``transport.fd_passing``) and runs each as a ``TcpConnection`` into the broker (all
of them watched through one ``Poller``), tells the acceptor when each of them closes (close
notices on the same link, batched per loop iteration),
connects the broker to the other workers over the bus, reads the clock for every
event it passes on, runs the broker's timers on the event loop (``LoopScheduler``),
sweeps every ``TICK`` seconds, and shuts down in order on SIGTERM: 5.0 clients are
told 0x8B, the last batch is committed, the store closed.

On a cluster node it serves the virtual shards of the supervisor's newest grant (control op
``fence``) until the grant's deadline: the handshake refuses other clients (CONNACK "server
unavailable"), and the clients a new grant (or the deadline) no longer covers are closed
(5.0: DISCONNECT 0x9C). A shard the grant gives to a worker of another node has its
persistent sessions sent there once its clients are closed; a shard moving in is refused
until its sessions have arrived, for at most ``moves.INCOMING_WAIT`` seconds
(``core/moves.py``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shardbroker.cluster.grant import NONE, Grant, local_owners
from shardbroker.cluster.numbers import load_identity
from shardbroker.cluster.placement import vshard_for
from shardbroker.config import Config, ConfigError, load_config
from shardbroker.core import clientlog
from shardbroker.core.broker import Broker
from shardbroker.core.clock import Now
from shardbroker.core.moves import ASK_AFTER, INCOMING_WAIT
from shardbroker.operations import control
from shardbroker.operations.admin import shard_socket
from shardbroker.operations.shard import ShardMetrics, ShardOps
from shardbroker.peer.bus import Bus, endpoint, remote_endpoint, remote_peer
from shardbroker.peer.messages import REMOTE_BASE, PeerMessage, from_sender
from shardbroker.process.runtime import install_loop, line_writer, log_in_turns, ready
from shardbroker.security.acl import AclFileError
from shardbroker.security.auth import Policies, load_policies
from shardbroker.security.passwords import PasswordFileError, PasswordHash
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore
from shardbroker.transport.fd_passing import ClosedWriter, Handoff, HandoffReceiver
from shardbroker.transport.tcp import Poller, RelayedConnection, TcpConnection

log = logging.getLogger("shardbroker.process.worker")

SYNC_WAIT = 2.0
# seconds past the lease TTL a gone node's durable routes are kept for its shards to be taken
# (a new placement controller elected and its map applied)
LOST_ROUTES_SLACK = 10.0
GC_THRESHOLDS = (50_000, 20, 20)  # the defaults are (700, 10, 10)
TICK = 0.5
VERIFY_THREADS = 2  # password hashes verified at once per worker
ADOPT_BATCH = 64  # hand-offs adopted per loop turn: a storm of new clients does not hold up those connected


def now() -> Now:
    return Now(time.time(), time.monotonic())


class LoopScheduler:
    """The broker's ``Scheduler`` on an asyncio loop: callbacks get the time they run at."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def soon(self, callback: Callable[[Now], None]) -> None:
        self._loop.call_soon(lambda: callback(now()))

    def later(self, delay: float, callback: Callable[[Now], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, lambda: callback(now()))


class ThreadVerifier:
    """Verifies passwords in a small thread pool (``hashlib.pbkdf2_hmac`` releases the GIL),
    so that a slow hash stalls no client; the outcome comes back on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = VERIFY_THREADS) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")

    def verify(self, against: PasswordHash, password: bytes, done: Callable[[bool, Now], None]) -> None:
        def finished(future: Future[bool]) -> None:
            ok = not future.cancelled() and future.exception() is None and future.result()
            self._loop.call_soon_threadsafe(lambda: done(ok, now()))

        self._pool.submit(against.verify, password).add_done_callback(finished)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def load_security(config: Config) -> Policies:
    """The password and ACL files the configuration names (per listener), read now;
    ``PasswordFileError`` and ``AclFileError`` propagate (fatal at startup, not at a reload)."""
    policy, problems = load_policies(config)
    for problem in problems:
        log.warning("password file line left out: %s", problem)
    return policy


class Link:
    """One hand-off link from the acceptor: the hand-offs read from it, numbered in order, and
    the close notices written back on it, one ``send`` per loop iteration."""

    __slots__ = ("_flushing", "_loop", "_writer", "_writing", "alive", "count", "receiver")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self.receiver = HandoffReceiver(sock)
        self._writer = ClosedWriter(sock)
        self.count = 0  # hand-offs received: the next one's number
        self.alive = True
        self._flushing = False
        self._writing = False

    def next_number(self) -> int:
        n, self.count = self.count, (self.count + 1) & 0xFFFFFFFF
        return n

    def closed(self, number: int) -> None:
        if self.alive and self._writer.add(number) and not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if not self.alive:
            return
        waiting = self._writer.flush()
        if waiting != self._writing:
            fd = self.receiver.sock.fileno()
            if waiting:
                self._loop.add_writer(fd, self._flush)
            else:
                self._loop.remove_writer(fd)
            self._writing = waiting

    def close(self) -> None:
        if self._writing:
            self._loop.remove_writer(self.receiver.sock.fileno())
            self._writing = False
        self.alive = False
        self.receiver.close()


class Worker:
    def __init__(self, config: Config, shard: int, shards: int, run_dir: str) -> None:
        self.config = config
        self.shard_index = shard
        self.shards = shards
        self.run_dir = run_dir
        sync = config.storage.durability == "fsync"
        data_dir = Path(config.server.data_dir)
        self.store = ShardStore.open(data_dir, shard, shards, map_size=config.storage.map_size,
                                     max_map_size=config.storage.max_map_size, sync=sync)
        self.retained = RetainedStore.open(data_dir, map_size=config.storage.map_size,
                                           max_map_size=config.storage.max_map_size, sync=sync)
        self.policy = load_security(config)
        self._links: list[Link] = []
        self._arrivals: deque[tuple[Link, Handoff, int]] = deque()  # hand-offs not adopted yet, in order
        self._adopting = False  # an _adopt_some is scheduled
        self._listen: socket.socket | None = None
        self._poller: Poller | None = None
        # A cluster node's worker serves the virtual shards of the supervisor's newest grant
        # (cluster/grant.py), until its deadline; before the first one, nothing.
        cluster = config.cluster
        self.clustered = cluster.enabled
        self.local = local_owners(cluster.node_id, shards, cluster.virtual_shards) if self.clustered else []
        self.grant = NONE
        self._fence_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.data_dir = data_dir
        # the workers of other nodes this one's bus reaches: peer id -> (lease, endpoint, key)
        self._remote: dict[int, tuple[int, str, str]] = {}
        self._leases: dict[int, int] = {}  # node number -> the lease its frames must carry
        self._refused_said = 0.0
        # shards this worker has served under its node's current lease and not given away
        # since: only those move to another node when the map gives them away. A node that
        # lost its lease (cut off, restarted) keeps its sessions: the forwards other nodes
        # kept for it in their outboxes come back to this worker and must find them here
        self._held: set[int] = set()
        # virtual shard -> the worker of a gone node that served it last (``_sync_nodes``),
        # named to every peer when this worker takes the shard (``_place_replicas``)
        self._lost_from: dict[int, int] = {}
        self._asked_at: dict[int, float] = {}  # a shard moving in -> when its sender was last asked
        # a shard moving in -> its epoch, and when a client first asked for it under that epoch
        self._incoming: dict[int, tuple[int, float]] = {}
        self._waited_said: set[tuple[int, int]] = set()  # (shard, epoch) served without its sessions

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        log_in_turns(loop)
        clientlog.write_directly(line_writer(clientlog.log))  # the connect and disconnect lines
        endpoints = [endpoint(self.run_dir, i) for i in range(self.shards)]
        holder: list[Broker] = []
        bus = Bus(self.shard_index, endpoints, lambda messages: holder[0].peer_messages(messages, now()),
                  lambda: holder[0].wake())
        metrics = ShardMetrics(self.store, self.retained, bus)
        self.store.on_commit = metrics.committed  # from the first commit on (the restore's)
        verifier = ThreadVerifier(loop)
        broker = Broker(self.config, self.shard_index, self.shards, self.store, self.retained, bus,
                        LoopScheduler(loop), now(), policy=self.policy, verifier=verifier)
        holder.append(broker)
        self.broker = broker
        self._loop = loop
        self.bus = bus
        if self.clustered:
            local, count = self.local, len(self.local)

            def owner(client_id: str) -> int:  # a publisher's worker, on this node or another
                v = vshard_for(client_id, count)
                peer_of = self.grant.peer_of
                return peer_of[v] if peer_of and peer_of[v] >= 0 else local[v]

            broker.backpressure.owner = owner
            broker.handshake.admit = self._admit
            broker.moves.on_done = self._moved_in
            broker.moves.asked = self._asked
            broker.moves.moving_in = self._count_moving_in
            broker.deadline_passed = self._deadline_passed
            self._listen_remote(bus)
        broker.restore(now())
        poller = self._poller = Poller(loop)
        bus.start(loop)
        broker.announce()

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

        deadline = time.monotonic() + SYNC_WAIT
        while len(broker.synced) < self.shards - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if len(broker.synced) < self.shards - 1:
            log.warning("shard %d: no route sync from shards %s yet; serving anyway", self.shard_index,
                        sorted(set(range(self.shards)) - broker.synced - {self.shard_index}))
        # Clients only once the routes are known: a publish must reach every subscriber.
        path = os.path.join(self.run_dir, f"handoff-{self.shard_index}.sock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listen.bind(path)
        listen.listen(16)
        listen.setblocking(False)
        self._listen = listen
        loop.add_reader(listen.fileno(), self._accept_link, loop)

        # What startup built (restored sessions, modules) lives as long as the process: keep it
        # out of the collector's scans, and collect young objects less often. Per-message
        # objects are freed by reference counting; a full collection over a large heap is
        # milliseconds of stalled loop, which shows as latency.
        control_server = await control.serve(shard_socket(self.run_dir, self.shard_index),
                                             ShardOps(broker, now, metrics, self.reconfigure,
                                                      self.fence if self.clustered else None))
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        ready(f"worker {self.shard_index}")
        log.info("shard %d serving (%d sessions restored)", self.shard_index, len(broker.sessions))

        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), TICK)
            except TimeoutError:
                pass
            broker.tick(now())

        connections = len(broker.sessions.clients)
        log.info("shard %d shutting down: %d connections", self.shard_index, connections)
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        loop.remove_reader(listen.fileno())
        listen.close()
        control_server.close()
        broker.shutdown(now())
        if self.clustered:
            await self._hand_over(broker)
        if connections:
            await asyncio.sleep(0.05)  # let the connections write DISCONNECT before the process ends
        poller.close()
        verifier.close()
        bus.close()
        self.store.close()
        self.retained.close()
        st = broker.stats
        log.info("shard %d stopped: received %d, delivered %d, forwarded %d, dropped %d (queue full) and %d "
                 "(too large); %d commits of %.1f operations on average; inputs held %d times for %.2f s; "
                 "%d bus batches waited for room",
                 self.shard_index, st["received"], st["delivered"], st["forwarded"], st["dropped_queue_full"],
                 st["dropped_too_large"], st["commits"], st["commit_ops"] / max(1, st["commits"]), broker.flow.holds,
                 broker.flow.held_for, bus.waited)

    async def _hand_over(self, broker: Broker) -> None:
        """Before a cluster node's worker stops: what it owes the other nodes it reaches (a
        shard moving there, not yet acknowledged or relaying; durable forwards they have not
        acknowledged) goes on for at most 60 % of ``server.shutdown_timeout``, so that a node
        drained and then stopped leaves nothing behind that only its return would deliver."""
        deadline = time.monotonic() + 0.6 * self.config.server.shutdown_timeout
        moves, peers = broker.moves, broker.peers

        def owed() -> int:
            reached = set(peers.link.peers)
            return (len(moves.outgoing) + len(moves.ending)
                    + sum(len(items) for peer, items in peers.outbox.pending.items()
                          if peer >= REMOTE_BASE and peer in reached))

        left = owed()
        if not left:
            return
        started = time.monotonic()
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            broker.tick(now())
            left = owed()
        log.log(logging.WARNING if left else logging.INFO,
                "shard %d: %s what it owed other nodes in %.2f s before stopping%s", self.shard_index,
                "not done with" if left else "handed over", time.monotonic() - started,
                f" ({left} moves and durable forwards left: they wait in its store)" if left else "")

    # ------------------------------------------------------------------ the bus between nodes

    def _listen_remote(self, bus: Bus) -> None:
        """Bind this worker's end of the bus between nodes: the node's bus address
        (``[cluster] advertise``) plus this worker's index, with the node's CURVE keys."""
        identity = load_identity(self.data_dir)
        if identity is None:
            raise SystemExit(f"shard {self.shard_index}: no cluster identity in {self.data_dir}")
        host, _, port = self.config.cluster.advertise.rpartition(":")
        try:
            address = str(socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            raise SystemExit(f"shard {self.shard_index}: cluster.advertise host {host!r}: {exc}") from None
        where = remote_endpoint(f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                                self.shard_index)
        try:
            bus.listen_remote(where, identity.public, identity.secret, self._remote_items)
        except OSError as exc:
            raise SystemExit(f"shard {self.shard_index}: cannot listen for other nodes on {where}:"
                             f" {exc}") from None
        log.info("shard %d: listening for other nodes on %s", self.shard_index, where)

    def _sync_nodes(self, grant: Grant, old: Grant) -> None:
        """Make the bus reach every worker of every other node the grant names, and no other:
        a node that registered again (a new lease) is a new peer (its routes are asked for
        again); one whose registration ended loses its routes once the shards ``old`` gave it
        are taken (``Peers.peer_removed``)."""
        bus, peers = self.bus, self.broker.peers
        bus.identify(grant.number, grant.lease)
        peers.node_number = grant.number
        bus.allow(frozenset(key for *_, key in grant.nodes if key))
        want: dict[int, tuple[int, str, str]] = {}
        leases: dict[int, int] = {}
        for _node, number, lease, advertise, workers, key in grant.nodes:
            if number <= 0 or not key:
                continue
            leases[number] = lease
            for w in range(workers):
                want[remote_peer(number, w)] = (lease, remote_endpoint(advertise, w), key)
        self._leases = leases
        for peer, spec in list(self._remote.items()):
            if want.get(peer) != spec:
                del self._remote[peer]
                bus.disconnect(peer)
                served = [v for v, p in enumerate(old.peer_of) if p == peer]
                for v in served:
                    self._lost_from[v] = peer
                peers.peer_removed(peer, served, keep=self.config.cluster.lease_ttl + LOST_ROUTES_SLACK)
                log.info("shard %d: bus to %s closed (peer %d)", self.shard_index, spec[1], peer)
        for peer, spec in want.items():
            if peer not in self._remote:
                self._remote[peer] = spec
                for v in [v for v, p in self._lost_from.items() if p == peer]:
                    del self._lost_from[v]
                bus.connect(peer, spec[1], spec[2])
                peers.peer_added(peer)
                log.info("shard %d: bus to %s (peer %d)", self.shard_index, spec[1], peer)

    def _remote_items(self, number: int, worker: int, lease: int, items: list[PeerMessage]) -> None:
        """A batch from a worker of another node: taken only from a registered node under the
        lease its registration has now (a node whose lease ended cannot be heard, even when its
        frames arrive late); its sender is then named by its remote peer id."""
        peer = remote_peer(number, worker)
        if self._leases.get(number) != lease or peer not in self._remote:
            self.bus.refused_frames += 1
            t = time.monotonic()
            if t - self._refused_said >= 1.0:
                self._refused_said = t
                log.warning("shard %d: %d batches refused so far from nodes not registered under"
                            " the lease they carry (the last: node number %d, worker %d, lease %x)",
                            self.shard_index, self.bus.refused_frames, number, worker, lease)
            return
        from_sender(items, peer)
        self.broker.peer_messages(items, now())

    # ------------------------------------------------------------------ the fence (cluster)

    def _admit(self, client_id: str) -> str | None:
        """Why this worker may not serve ``client_id`` now (the handshake refuses it with
        CONNACK "server unavailable"), or None."""
        grant = self.grant
        if not grant.owners:
            return "this node serves no virtual shard now (no lease or no shard map)"
        if time.monotonic() >= grant.until:
            return "this node's lease was not renewed in time"
        v = vshard_for(client_id, grant.count)
        if grant.owners[v] != self.shard_index:
            return f"virtual shard {v} is not served by this worker"
        if self._moving_in(grant, v):
            return f"virtual shard {v} is moving in from another node"
        if self.broker.awaiting_copies(v):
            return f"virtual shard {v} waits for the copies of its sessions"
        return None

    def _moving_in(self, grant: Grant, v: int) -> bool:
        """Whether ``v`` (served here) waits for its sessions from its previous owner: the grant
        names one and they have not arrived under this epoch, for at most ``INCOMING_WAIT``."""
        if not grant.incoming or grant.incoming[v] < 0:
            return False
        if self.broker.moves.received.get(v, 0) >= grant.epochs[v]:
            return False
        t = time.monotonic()
        epoch, since = self._incoming.get(v, (0, t))
        if epoch != grant.epochs[v]:  # the first ask under this epoch
            since = t
            self._incoming[v] = (grant.epochs[v], t)
        if t - since < INCOMING_WAIT:
            if t - since >= ASK_AFTER and t - self._asked_at.get(v, 0.0) >= ASK_AFTER:
                self._asked_at[v] = t  # its sender may not know it is waited for: ask
                self.broker.moves.ask(v, grant.incoming[v], grant.epochs[v])
            return True
        if (v, epoch) not in self._waited_said:
            self._waited_said.add((v, epoch))
            log.error("shard %d: virtual shard %d: no sessions from peer %d in %.0f s; serving it"
                      " without them", self.shard_index, v, grant.incoming[v], INCOMING_WAIT)
        return False

    def _count_moving_in(self) -> int:
        """The shards this worker serves under its grant whose sessions have not arrived (and
        whose wait has not run out)."""
        grant, me, received = self.grant, self.shard_index, self.broker.moves.received
        if not grant.incoming:
            return 0
        t = time.monotonic()
        return sum(1 for v, w in enumerate(grant.owners)
                   if w == me and grant.incoming[v] >= 0 and received.get(v, 0) < grant.epochs[v]
                   and t - self._incoming.get(v, (0, t))[1] < INCOMING_WAIT)

    def _moved_in(self, vshard: int, peer: int, count: int) -> None:
        """The sessions of ``vshard`` from ``peer`` are committed here: it may be served."""
        self._asked_at.pop(vshard, None)
        asked = self._incoming.pop(vshard, None)
        waited = f", {time.monotonic() - asked[1]:.3f} s after a client first asked for it" if asked else ""
        log.log(logging.INFO if count else logging.DEBUG,
                "shard %d: virtual shard %d moved in from peer %d: %d sessions%s",
                self.shard_index, vshard, peer, count, waited)

    def _asked(self, vshard: int, peer: int, epoch: int) -> None:
        """``peer`` serves ``vshard`` from ``epoch`` on and waits for its sessions from this
        worker: give them (or say there are none) when the grant agrees the shard is not ours."""
        grant = self.grant
        if (not grant.owners or grant.owners[vshard] == self.shard_index or grant.version < epoch
                or not grant.peer_of or grant.peer_of[vshard] != peer):
            return  # a grant newer than ours, or older: the asker asks again
        self._held.discard(vshard)
        self.broker.give_shards([(vshard, peer)], grant.version, now())

    def _give_away(self, grant: Grant) -> None:
        """Send the shards this grant gives to a worker of another node their persistent
        sessions: those this worker has served under this lease and not given away since (even
        with none: the new owner waits for word). Not the others whose sessions its store holds
        (a node that restarted or was cut off): their forwards, kept in other nodes' outboxes
        for this worker, would arrive with nobody to take them. A new owner that waits all the
        same asks (``_asked``)."""
        peer_of = grant.peer_of
        me = self.shard_index
        mine = [v for v, w in enumerate(grant.owners) if w == me]
        self._held.update(mine)
        moves = self.broker.moves
        for v in [v for v in moves.outgoing if v in mine]:
            moves.take_back(v)  # back before the taker acknowledged
        incoming = grant.incoming
        for v in [v for v in moves.ending if v in mine and (not incoming or incoming[v] < 0)]:
            moves.keep_given(v)  # acknowledged, but the taker is gone: nobody will send them back
        if not peer_of or not grant.number:
            return
        given = [(v, peer) for v, peer in enumerate(peer_of)
                 if peer >= REMOTE_BASE and v in self._held
                 and not (grant.owners and grant.owners[v] == me)]
        if given:
            self._held.difference_update(v for v, _ in given)
            self.broker.give_shards(given, grant.version, now())

    def _place_replicas(self, grant: Grant, old: Grant) -> None:
        """The session copies (``core/replicas.py``): a shard served here from now on whose
        previous owner is not to send its sessions (its node lost its lease) takes those of
        its copies held here; each shard served here copies its records to its backup; the
        copies of shards this worker neither backs up nor is given by the map go."""
        me = self.shard_index
        owners, backup_of = grant.owners, grant.backup_of
        restore = [v for v, w in enumerate(owners)
                   if w == me and (not old.owners or old.owners[v] != me)
                   and (not grant.incoming or grant.incoming[v] < 0)]
        backup = tuple(backup_of[v] if w == me else -1 for v, w in enumerate(owners)) if backup_of else ()
        peer_of = grant.peer_of  # a shard the map gives this worker may be held back a while
        keep: Callable[[int], bool] = ((lambda v: backup_of[v] == me or peer_of[v] == me) if backup_of
                                       else (lambda v: True))
        previous: dict[int, int] = {}
        for v in restore:
            lost = self._lost_from.pop(v, -1)
            if lost >= 0 and lost not in self._remote:
                previous[v] = lost
        self.broker.place_replicas(restore, backup, keep, now(), previous)

    def fence(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control operation ``fence``: the supervisor's grant. A newer one replaces the one
        held; the clients it no longer lets this worker serve are closed at once, and the rest
        when its deadline passes without a newer grant."""
        grant = Grant.from_value(request.get("grant"))
        if grant.seq <= self.grant.seq:
            return {"shard": self.shard_index, "seq": self.grant.seq}
        old, self.grant = self.grant, grant
        self._sync_nodes(grant, old)
        if grant.owners != old.owners or grant.until < old.until:
            self._close_unserved("the shard map gives the client's virtual shard to another node"
                                 if grant.owners else "this node lost its cluster lease")
        if grant.lease != old.lease:
            self._held.clear()
        if grant.peer_of != old.peer_of or grant.owners != old.owners:
            self._give_away(grant)
        if grant.owners != old.owners or grant.backup_of != old.backup_of:
            self._place_replicas(grant, old)
        if grant.owners != old.owners or grant.peer_of != old.peer_of:
            # parked: the sessions of shards the map gives another worker (not those it gives
            # this one and the grant holds back a moment: they are about to be served)
            me, peer_of = self.shard_index, grant.peer_of
            self.broker.park_unserved(lambda cid: not peer_of or peer_of[vshard_for(cid, len(peer_of))] == me,
                                      now())
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None
        if grant.owners and self._loop is not None:
            self._fence_timer = self._loop.call_later(max(0.0, grant.until - time.monotonic()),
                                                      self._fence_expired, grant)
        self.broker.serve_until = grant.until if grant.owners else math.inf
        return {"shard": self.shard_index, "seq": grant.seq,
                "serving": len(grant.served_by(self.shard_index))}

    def _deadline_passed(self) -> None:
        """A client's bytes came after the grant's deadline, before its timer ran (the process
        was stopped past it): the clients go first."""
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        self._fence_expired(self.grant)

    def _fence_expired(self, grant: Grant) -> None:
        """The deadline of the grant held passed with no newer one: serve nothing more."""
        self._fence_timer = None
        if grant is not self.grant:
            return
        early = grant.until - time.monotonic()
        if early > 0 and self._loop is not None:  # the loop's clock fired a little early
            self._fence_timer = self._loop.call_later(early + 0.001, self._fence_expired, grant)
            return
        log.warning("shard %d: no renewed grant from the supervisor before the lease deadline:"
                    " closing the clients", self.shard_index)
        self._close_unserved("this node's cluster lease was not renewed in time")

    def _close_unserved(self, text: str) -> None:
        closed = self.broker.close_unserved(lambda cid: self._admit(cid) is None, text, now())
        if closed:
            log.warning("shard %d: %d clients closed: %s", self.shard_index, closed, text)

    def reload(self) -> None:
        """SIGHUP sent to this worker alone: read the password and ACL files again; a file that
        no longer reads or parses leaves the previous ones in force. (The supervisor reloads
        through ``reconfigure``.)"""
        try:
            self._reload_security(self.config)
        except ValueError as exc:
            log.error("shard %d: %s", self.shard_index, exc)

    def reconfigure(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The control operation ``reload``: ``overrides`` is the supervisor's new resolved
        configuration; its live settings are applied (``Broker.reconfigure``) and the password
        and ACL files read again. A configuration or file that does not load changes nothing
        (``ValueError``, the error answered to the supervisor)."""
        try:
            config = load_config(None, overrides)
        except ConfigError as exc:
            raise ValueError(f"reload failed, the previous configuration stays in force: {exc}") from None
        self._reload_security(config)
        self.config = config
        logging.getLogger().setLevel(config.server.log_level.upper())
        self.broker.reconfigure(config)
        return {"shard": self.shard_index}

    def _reload_security(self, config: Config) -> None:
        try:
            policy = load_security(config)
        except (PasswordFileError, AclFileError) as exc:
            raise ValueError(f"reload failed, the previous password and ACL files stay in force: {exc}") from None
        self.policy = policy
        self.broker.security_changed(policy, now())
        log.info("shard %d: password and ACL files reloaded", self.shard_index)

    def _accept_link(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._listen is not None
        try:
            sock, _ = self._listen.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        link = Link(loop, sock)
        self._links.append(link)
        loop.add_reader(sock.fileno(), self._read_link, loop, link)

    def _read_link(self, loop: asyncio.AbstractEventLoop, link: Link) -> None:
        receiver = link.receiver
        try:
            handoffs = receiver.read()
        except ValueError as exc:
            log.error("bad hand-off stream: %s", exc)
            handoffs = []
            receiver.closed = True
        if handoffs:
            self._arrivals.extend((link, h, link.next_number()) for h in handoffs)
            if not self._adopting:
                self._adopt_some(loop)
        if receiver.closed:
            loop.remove_reader(receiver.sock.fileno())
            link.close()
            self._links.remove(link)

    def _adopt_some(self, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt up to ``ADOPT_BATCH`` of the hand-offs that arrived, the rest at the next turns
        of the loop, so that the clients already connected are served in between."""
        self._adopting = False
        arrivals = self._arrivals
        at = now()  # one reading of the clock for the batch (a few microseconds of it)
        for _ in range(min(ADOPT_BATCH, len(arrivals))):
            link, h, number = arrivals.popleft()
            self._adopt(h, link, number, at)
        if arrivals:
            self._adopting = True
            loop.call_soon(self._adopt_some, loop)

    def _adopt(self, h: Handoff, link: Link, number: int, at: Now) -> None:
        # Non-blocking (set by the acceptor) and TCP_NODELAY (inherited from the listener)
        # belong to the socket, so they came along with the descriptor. ``SocketType`` is the
        # socket without ``socket.socket``'s Python layer (``makefile``, context manager), which
        # the connection does not use: 48 bytes, against 104 with that layer. A hand-off is
        # always a stream socket: saying so spares the two getsockopt calls that would ask (the
        # family comes from the getsockname every wrapped descriptor gets).
        assert self._poller is not None
        sock = socket.SocketType(-1, socket.SOCK_STREAM, 0, h.fd)
        conn = (TcpConnection(sock, self._poller, h.initial) if h.peer is None and h.listener == 0
                else RelayedConnection(sock, self._poller, h.initial, h.peer, h.identity, h.listener))
        conn.notify_close(link, number)
        conn.start(self.broker, self.broker.open_client(conn, h.client_id, at), at)


def run(config: Config, shard: int, shards: int, run_dir: str) -> None:
    """Process entry point."""
    install_loop()
    worker = Worker(config, shard, shards, run_dir)
    asyncio.run(worker.run())
