"""A broker node in the cluster: the supervisor's side of serving under etcd.

One ``ClusterNode`` per ``serve`` with ``[cluster] node_id``. From a thread of the supervisor
it joins (``membership``: a registration under a lease, renewed by its own threads), runs a
controller candidate (``controller``: the node that wins the election writes the map), reads
the map every ``round`` seconds, keeps the ``Fence`` (map + lease deadline) and tells the
children what they may serve as a ``grant.Grant`` through ``publish`` (the supervisor sends it
over the control channel). A grant goes out when it changes, when the lease was renewed, when
a child missed the last one, and at least every second.

The lease, and what the children are told:

* ``until`` in a grant is the lease deadline less ``GUARD`` of the TTL, so that a child that
  hears nothing more (the supervisor stopped) has closed its clients before etcd can let
  another node take the shards;
* when ``membership`` says the lease is lost (etcd said so, or the last third of the TTL began
  unrenewed), a grant of nothing goes out at once, from the thread that noticed: the workers
  close the clients, the acceptor refuses new ones;
* the next round revokes the old lease (when etcd answers), registers again under a new one
  and serves again once the controller has written a map for that lease (the old map names
  the old lease, which the fence refuses).

A shard moving between live nodes (a node joins, or is drained): the map gives it to the new
owner at once, and the old one stops serving it when it reads that map. So that the two never
serve it together, each node says under ``APPLIED_PREFIX`` (bound to its lease) the oldest map
its children may serve from: before it first serves under a lease, in a transaction that
requires the map it read to still be the map; after each grant every child took, that map's
version. A node serves a shard of epoch E only once every other registered node that says so
has applied E (``cleared``); a node that says nothing serves nothing. A node whose lease ended
serves nothing either (the fence), so it is not waited for.

A node ID registered by this node's previous run (killed, its lease not ended yet: the
registration names this data directory's bus key) is taken over at once
(``Membership.join``), so the node keeps its shards across a quick restart. One registered
with another key is waited for, one log line; ``cluster forget`` ends the wait.

The grant also names, for each shard another registered node serves, that node's client
address (``NodeInfo.clients``): the acceptor relays such a client there.

Before its first registration, the node claims its node number (``cluster/numbers.py``: the
one its data directory's identity file remembers, when etcd still gives it to this node ID,
else a new one, written back to the file) and registers with it and its CURVE public key; the
grant carries the number, the other numbered nodes and each shard's peer id, for the bus
between nodes.

A shard that moves in from another live node: the grant names, per such shard, the previous
owner's worker (``grant.moved_in``, from the map held before and the new one, kept while the
shard stays here at that epoch); this node's worker refuses the shard's clients until that
worker has sent the shard's persistent sessions (``core/moves.py``), or for at most
``moves.INCOMING_WAIT`` seconds. A previous owner no longer registered sends nothing: the
shard is served at once, without its sessions.

What it does not do: carry messages between nodes (the workers do, on the bus).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from shardbroker.cluster.controller import Controller, MapMismatch, StaleController, read_view
from shardbroker.cluster.etcd import Compare, Etcd, EtcdError, Put
from shardbroker.cluster.fence import Fence
from shardbroker.cluster.grant import NONE, Grant, from_fence, local_owners, moved_in
from shardbroker.cluster.membership import Membership, NodeIdInUse, NodeInfo
from shardbroker.cluster.numbers import (
    Identity,
    IdentityError,
    NumbersExhausted,
    claim_number,
    save_identity,
)
from shardbroker.cluster.placement import vshard_for
from shardbroker.cluster.shardmap import APPLIED_PREFIX, MAP_KEY, MapFormatError, ShardMap
from shardbroker.config import ClusterConfig

__all__ = ["GUARD", "ClusterNode", "served_changes"]

log = logging.getLogger("shardbroker.cluster")

GUARD = 0.1  # of the TTL: children stop serving this long before the lease deadline
RESEND = 1.0  # seconds: a grant goes out at least this often

Publish = Callable[[Grant], bool]  # send to every child; whether all of them took it


class ClusterNode:
    def __init__(self, config: ClusterConfig, workers: int, publish: Publish, data_dir: Path,
                 identity: Identity, clock: Callable[[], float] = time.monotonic,
                 clients: str = "") -> None:
        self.config = config
        self.data_dir = data_dir
        self.identity = identity  # the data directory's (``numbers.ensure_identity``)
        self.number = 0  # claimed (or confirmed) in etcd by this run; 0: not yet
        self._unsaved = False  # the identity's number is not in its file yet
        self.workers = workers
        self.publish = publish
        self.clock = clock
        timeout = max(0.5, min(2.0, config.lease_ttl / 4))
        self.round = max(0.2, min(1.0, config.lease_ttl / 6))
        self._lease_etcd = Etcd(config.etcd_endpoints, timeout=timeout)  # renewals alone
        self.etcd = Etcd(config.etcd_endpoints, timeout=timeout)
        self.member = Membership(self._lease_etcd,
                                 NodeInfo(config.node_id, config.advertise, workers, clients=clients,
                                          key=identity.public),
                                 config.lease_ttl, self._lost, clock)
        self.member.lost = True  # not joined yet
        self.controller: Controller | None = None
        self.fence = Fence(config.node_id, 0)
        self.local = local_owners(config.node_id, workers, config.virtual_shards)
        self.grant = NONE
        self._seq = 0
        self._sent_at = -1e18
        self._stale = True
        self._lock = threading.Lock()  # the fence and the grants sent, in order
        self._stop = threading.Event()
        self._nudge = threading.Event()  # a round now (a child started)
        self._thread: threading.Thread | None = None
        self._said = ""  # the last problem logged (each one once)
        self._claimed = 0  # the map version under APPLIED_PREFIX for this lease (0: none)
        self._nodes: dict[str, NodeInfo] = {}  # the other registered nodes
        self._leases: dict[str, int] = {}  # and the leases they are registered under
        # virtual shards moving in from another node: v -> (epoch, previous node, its worker)
        self._incoming: dict[int, tuple[int, str, int]] = {}
        self._last_map: ShardMap | None = None  # the newest map held, whatever the lease

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the rounds (the children are stopped by then); give up the controller key and
        revoke the lease, so that the shards move at once rather than after the TTL."""
        self._stop.set()
        self._nudge.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.controller is not None:
                self.controller.resign()
            self.member.leave()
        except EtcdError as exc:
            log.warning("node %s: could not leave the cluster (its lease ends by itself within"
                        " %d s): %s", self.config.node_id, self.config.lease_ttl, exc)
            self.member.stop()
        self.etcd.close()
        self._lease_etcd.close()

    def refresh(self) -> None:
        """A child (re)started and holds no grant: send the grant at once."""
        self._stale = True
        self._nudge.set()

    def owner(self, client_id: str) -> int:
        """The local worker of ``client_id``: the map's when this node serves its virtual
        shard, else the one whose store keeps its session (``grant.local_owners``)."""
        v = vshard_for(client_id, len(self.local))
        grant = self.grant
        if grant.owners and grant.owners[v] >= 0:
            return grant.owners[v]
        return self.local[v]

    def status(self) -> dict[str, Any]:
        """What this node holds now, for metrics and readiness: whether it is a member (a lease
        it has not lost), the seconds its lease is sure to live, whether it is the controller,
        the version of the map its children serve from, and how many virtual shards they
        serve and how many of the map's they hold back (another node may still serve them)."""
        with self._lock:
            grant, fence = self.grant, self.fence
            member = not self.member.lost
            now = self.clock()
            served = sum(1 for w in grant.owners if w >= 0) if now < grant.until else 0
            held = max(0, len(fence.served(now)) - served) if member else 0
        controller = self.controller
        return {"node_id": self.config.node_id, "member": member,
                "lease_seconds": self.member.time_left() if member else 0.0,
                "controller": bool(member and controller is not None and controller.leading),
                "map_version": grant.version, "served": served, "held_back": held,
                "virtual_shards": self.config.virtual_shards}

    # ------------------------------------------------------------------ rounds

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except NodeIdInUse as exc:
                self._say(f"{exc}: waiting for that lease to end (`shardbroker cluster forget"
                          f" {self.config.node_id}` ends it now)")
            except (EtcdError, StaleController, MapMismatch, MapFormatError, NumbersExhausted,
                    IdentityError) as exc:
                self._say(f"node {self.config.node_id}: {exc}")
            except Exception as exc:  # noqa: BLE001 (the thread must go on; the next round retries)
                self._say(f"node {self.config.node_id}: round failed: {type(exc).__name__}: {exc}")
            self._nudge.wait(self.round)
            self._nudge.clear()

    def _say(self, text: str) -> None:
        if text != self._said:
            self._said = text
            log.warning("cluster: %s", text)

    def _round(self) -> None:
        if self.member.lost:
            self._join()
        assert self.controller is not None
        self.controller.reconcile()
        view = read_view(self.etcd)
        new = view.map
        if new is not None and new.count != self.config.virtual_shards:
            raise MapMismatch(f"the cluster's map has {new.count} virtual shards, this node is"
                              f" set for {self.config.virtual_shards}")
        me = self.config.node_id
        if (new is not None and not self._claimed and view.leases.get(me) == self.member.lease
                and new.lease_of(me) == self.member.lease):
            # about to serve from ``new`` for the first time under this lease: say so while
            # ``new`` is still the map, so that a node the next map gives a shard of ours
            # waits for us to apply it
            if not self.etcd.txn([Compare(MAP_KEY, "mod", view.map_revision)],
                                 [Put(APPLIED_PREFIX + me, str(new.version).encode(),
                                      self.member.lease)]):
                return  # the map changed meanwhile: the next round
            self._claimed = new.version
        # the oldest map every other node that may serve has applied
        cleared = min((version for node, version in view.applied.items()
                       if node != me and node in view.nodes), default=math.inf)
        self._said = ""
        with self._lock:
            if self.member.lost:
                return  # told while this round read etcd: the next round joins again
            if new is not None:
                before = self.fence.map or self._last_map  # a new lease starts with no map
                self.fence.apply(new)
                if self.fence.map is not None and self.fence.map is not before:
                    self._incoming = moved_in(me, before, self.fence.map, self._incoming)
                    self._last_map = self.fence.map
            self._nodes = {node: info for node, info in view.nodes.items() if node != me}
            self._leases = dict(view.leases)
            self.fence.renewed(self.member.deadline - GUARD * self.config.lease_ttl)
            self._send(force=False, cleared=cleared)
            applied = self.grant.version if not self._stale and self.grant.owners else 0
        if self._claimed and applied > self._claimed:
            # every child serves from this map now, and from no older one
            self.etcd.put(APPLIED_PREFIX + me, str(applied).encode(), self.member.lease)
            self._claimed = applied

    def _join(self) -> None:
        """Register (again) under a new lease, after revoking the old one if there is one."""
        self.member.stop()
        old = self.member.lease
        if old:
            try:
                self.etcd.revoke(old)
            except EtcdError:
                pass  # it ends by itself; the join below says whether the ID is free
        if not self.number:
            self._claim_number()
        self.member.join()
        self.member.start()
        with self._lock:
            self.fence = Fence(self.config.node_id, self.member.lease)
            self._claimed = 0
        self.controller = Controller(self.etcd, self.config.node_id, self.member.lease,
                                     self.config.virtual_shards)

    def _claim_number(self) -> None:
        """This node's number for this run: the one its data directory remembers when etcd
        still gives it to this node ID, else a new one (written to the identity file)."""
        me, was = self.config.node_id, self.identity.number
        number = claim_number(self.etcd, me, was)
        if number != was:
            if was:
                log.warning("cluster: node %s: node number %d is no longer this node's in etcd;"
                            " claimed %d", me, was, number)
            log.info("cluster: node %s claimed node number %d", me, number)
            # kept before it is written: should the write fail, the next round confirms this
            # number rather than claim another
            self.identity = replace(self.identity, number=number)
            self._unsaved = True
        if self._unsaved:
            save_identity(self.data_dir, self.identity)
            self._unsaved = False
        self.number = number
        self.member.info = replace(self.member.info, number=number)

    def _lost(self, left: float) -> None:
        """``membership``'s callback, from its thread: serve nothing from now on."""
        with self._lock:
            self.fence.lost()
            self._send(force=True)
        log.warning("cluster: node %s lost its lease (%.1f s left): its clients are closed and"
                    " new ones refused until it holds a lease and a map again",
                    self.config.node_id, left)

    def _send(self, force: bool, cleared: float = math.inf) -> None:
        """Under the lock: the fence's grant to the children, when it is news; the shards of a
        later epoch than ``cleared`` are held back (``grant.from_fence``)."""
        now = self.clock()
        grant = from_fence(self.fence, self._seq + 1, self.workers, now, cleared, self._nodes,
                           self._leases, self.number, self._incoming)
        last = self.grant
        changed = (grant.owners != last.owners or grant.version != last.version
                   or grant.lease != last.lease or grant.until != last.until
                   or grant.peers != last.peers or grant.remote != last.remote
                   or grant.number != last.number or grant.nodes != last.nodes
                   or grant.peer_of != last.peer_of or grant.incoming != last.incoming)
        if not (force or changed or self._stale or now - self._sent_at >= RESEND):
            return
        self._seq += 1
        self._sent_at = now
        self.grant = grant
        started, stopped = served_changes(last, grant)
        if started:  # said before the children can serve them
            log.debug("cluster: node %s starts serving at %.6f: %s", self.config.node_id,
                      self.clock(), started)
        self._stale = not self.publish(grant)
        if stopped:  # said once the children answered (one that did not stops at its deadline)
            log.debug("cluster: node %s stopped serving at %.6f: %s", self.config.node_id,
                      self.clock(), stopped)
        served = sum(1 for w in grant.owners if w >= 0)
        was = sum(1 for w in last.owners if w >= 0)
        held = len(self.fence.served(now)) - served if grant.owners else 0
        if held and grant.version != last.version:
            log.info("cluster: node %s holds back %d virtual shards of map version %d until every"
                     " other node has applied it (their previous owner may still serve them)",
                     self.config.node_id, held, grant.version)
        if served != was or (served and grant.version != last.version):
            if served:
                log.info("cluster: node %s serves %d virtual shards (map version %d, lease %x)",
                         self.config.node_id, served, grant.version, grant.lease)
            else:
                log.warning("cluster: node %s serves no virtual shard now (map version %d)",
                            self.config.node_id, grant.version)


def served_changes(last: Grant, grant: Grant) -> tuple[str, str]:
    """The ``vshard@epoch`` pairs ``grant`` serves and ``last`` did not, and the reverse, each
    as one space-separated string (empty when none): the DEBUG lines of ``_send``, from which
    a node's serving intervals per virtual shard can be read back (a test checks that no two
    nodes serve one virtual shard at once)."""
    def pairs(g: Grant) -> set[tuple[int, int]]:
        return {(v, g.epochs[v]) for v, w in enumerate(g.owners) if w >= 0}

    before, after = pairs(last), pairs(grant)
    return (" ".join(f"{v}@{e}" for v, e in sorted(after - before)),
            " ".join(f"{v}@{e}" for v, e in sorted(before - after)))
