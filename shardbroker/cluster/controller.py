"""The placement controller: one node, elected through etcd, writes the shard map.

Election: the controller key is created in a transaction that requires it to be absent
(``create_revision == 0``), bound to the candidate's lease; whoever creates it leads until
its lease ends (it stops renewing, leaves, or is forgotten), and then the next ``campaign``
of another node wins.

Each ``reconcile`` reads the live registrations (state ``up``), the drain marks and the map,
places the virtual shards over the slots of the nodes that are up and not drained
(``placement.place_with_backups``: owners and backups) and, when that changes the map, writes the next map
(``shardmap.next_map``: version + 1, new epochs for the shards that move, and for all the
shards of a node that registered again under a new lease) in a transaction
that requires both that this node still holds the controller key (the same create revision)
and that the map is still the one it read (the same mod revision). So two controllers can
never both write over one map, and a controller that lost its lease or read an old map is
refused (``StaleController``) and reads again.

What it does not do: move sessions or tell nodes to hand shards over (nodes read the map);
shards move at once from the map's point of view.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from shardbroker.cluster.etcd import Compare, Delete, Etcd, EtcdError, Put
from shardbroker.cluster.membership import NodeInfo, parse_node
from shardbroker.cluster.placement import place_with_backups, slots_of
from shardbroker.cluster.shardmap import (
    APPLIED_PREFIX,
    CONTROLLER_KEY,
    DRAIN_PREFIX,
    MAP_KEY,
    NODES_PREFIX,
    ROOT,
    MapFormatError,
    ShardMap,
    next_map,
)

__all__ = ["ClusterView", "Controller", "MapMismatch", "StaleController", "read_view"]

log = logging.getLogger("shardbroker.cluster")


class StaleController(Exception):
    """The map write was refused: this node no longer leads, or the map changed meanwhile."""


class MapMismatch(Exception):
    """The map in etcd has another virtual shard count than this node is configured for."""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What etcd says at one revision: registrations, drain marks, controller, map."""

    nodes: dict[str, NodeInfo]
    leases: dict[str, int]  # the lease each registration is bound to
    drained: frozenset[str]
    controller: str | None
    map: ShardMap | None
    map_revision: int  # the map key's mod revision, 0 when there is no map
    applied: dict[str, int]  # the map version each node has applied (APPLIED_PREFIX)


def read_view(etcd: Etcd) -> ClusterView:
    """Read the cluster's keys (one range over the prefix, so one revision)."""
    nodes: dict[str, NodeInfo] = {}
    leases: dict[str, int] = {}
    drained: set[str] = set()
    controller: str | None = None
    shard_map: ShardMap | None = None
    revision = 0
    applied: dict[str, int] = {}
    for entry in etcd.get_prefix(ROOT):
        if entry.key.startswith(NODES_PREFIX):
            info = parse_node(entry.key, entry.value)
            if info is not None:
                nodes[info.node_id] = info
                leases[info.node_id] = entry.lease
        elif entry.key.startswith(DRAIN_PREFIX):
            drained.add(entry.key.removeprefix(DRAIN_PREFIX))
        elif entry.key == CONTROLLER_KEY:
            controller = entry.value.decode(errors="replace")
        elif entry.key == MAP_KEY:
            shard_map = ShardMap.decode(entry.value)
            revision = entry.mod_revision
        elif entry.key.startswith(APPLIED_PREFIX) and entry.value.isdigit():
            applied[entry.key.removeprefix(APPLIED_PREFIX)] = int(entry.value)
    return ClusterView(nodes, leases, frozenset(drained), controller, shard_map, revision,
                       applied)


class Controller:
    """Candidate ``node_id`` (registered under ``lease``) for placing ``virtual_shards``."""

    def __init__(self, etcd: Etcd, node_id: str, lease: int, virtual_shards: int) -> None:
        self.etcd = etcd
        self.node_id = node_id
        self.lease = lease
        self.virtual_shards = virtual_shards
        self._held = 0  # create revision of the controller key this node holds; 0: none

    @property
    def leading(self) -> bool:
        return self._held != 0

    def campaign(self) -> bool:
        """Become the controller if there is none; whether this node is it now."""
        self.etcd.txn([Compare(CONTROLLER_KEY, "create", 0)],
                      [Put(CONTROLLER_KEY, self.node_id.encode(), self.lease)])
        held = self.etcd.get(CONTROLLER_KEY)
        was = self._held
        self._held = held.create_revision if held is not None and held.lease == self.lease else 0
        if self._held and not was:
            log.info("node %s is the placement controller", self.node_id)
        return self.leading

    def plan(self) -> tuple[ClusterView, ShardMap | None]:
        """The cluster as read, and the map it should have (``None``: the current one)."""
        view = read_view(self.etcd)
        if view.map is not None and view.map.count != self.virtual_shards:
            raise MapMismatch(f"the cluster's map has {view.map.count} virtual shards,"
                              f" this node is set for {self.virtual_shards}")
        workers = {n.node_id: n.workers for n in view.nodes.values() if n.state == "up"}
        placement, backups = place_with_backups(self.virtual_shards, slots_of(workers, view.drained))
        return view, next_map(view.map, placement, view.leases, backups)

    def publish(self, view: ClusterView, new: ShardMap) -> None:
        """Write ``new`` over the map read in ``view``, if this node still leads and the map
        has not changed since; else ``StaleController``."""
        if not self._held:
            raise StaleController(f"node {self.node_id} is not the controller")
        if not self.etcd.txn([Compare(CONTROLLER_KEY, "create", self._held),
                              Compare(CONTROLLER_KEY, "lease", self.lease),
                              Compare(MAP_KEY, "mod", view.map_revision)],
                             [Put(MAP_KEY, new.encode())]):
            held = self.etcd.get(CONTROLLER_KEY)
            if held is None or held.create_revision != self._held:
                self._held = 0
            raise StaleController(f"map version {new.version} refused: the controller or the"
                                  " map changed since it was read")
        moved = sum(1 for v, s in enumerate(new.vshards)
                    if view.map is None or view.map.vshards[v].slot != s.slot)
        log.info("shard map version %d written: %d virtual shards moved", new.version, moved)

    def reconcile(self) -> ShardMap | None:
        """Campaign; as the controller, write the map the cluster should have. The map
        written, or ``None`` (not the controller, or nothing to change)."""
        if not self.campaign():
            return None
        view, new = self.plan()
        if new is None:
            return None
        self.publish(view, new)
        return new

    def resign(self) -> None:
        """Give up the controller key, if held (another node can then win at once)."""
        if self._held:
            self.etcd.txn([Compare(CONTROLLER_KEY, "create", self._held)],
                          [Delete(CONTROLLER_KEY)])
        self._held = 0

    def run(self, stop: threading.Event, interval: float) -> None:
        """Reconcile every ``interval`` seconds until ``stop`` is set; etcd errors and
        refused writes are logged and tried again at the next round."""
        while not stop.is_set():
            try:
                self.reconcile()
            except (EtcdError, StaleController, MapMismatch, MapFormatError) as exc:
                log.warning("placement controller: %s", exc)
            stop.wait(interval)
