"""The shard map: which slot (node x worker) serves each virtual shard, at which epoch.

Pure: no I/O. The controller writes it to etcd as one JSON value under ``MAP_KEY``;
everyone else reads it.

Invariants, kept by ``next_map``:

* ``version`` grows by one with every map written (the first map is version 1);
* a virtual shard's ``epoch`` changes only when its owner changes (another slot, or the same
  node under another lease: it restarted), and then becomes the new map's version, so epochs
  only ever increase, and (vshard, epoch) names one owner, in one incarnation, for ever;
* ``len(vshards)`` is the cluster's virtual shard count, fixed once the first map exists;
* a virtual shard's ``backup`` (``placement.place_with_backups``: the slot it goes to if its
  owner's node leaves) is on another node than its owner, and changes no epoch;
* ``prev`` names the slot that served a virtual shard before its epoch began, when that was
  another node.

The etcd keys of the cluster are named here too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardbroker.cluster.placement import Slot

__all__ = ["APPLIED_PREFIX", "CONTROLLER_KEY", "DRAIN_PREFIX", "MAP_KEY", "NODES_PREFIX", "NUMBERS_PREFIX",
           "ROOT", "MapFormatError", "ShardMap", "VShard", "next_map"]

ROOT = "/shardbroker/"
NODES_PREFIX = ROOT + "nodes/"  # + node ID: a live node's registration, bound to its lease
DRAIN_PREFIX = ROOT + "drain/"  # + node ID: the node is drained (no lease: it outlives restarts)
# + node ID: the newest map version the node has applied (it serves nothing that map does not
# give it), bound to its lease; a node serves a shard the map gave it at epoch E only once
# every other registered node has applied E
APPLIED_PREFIX = ROOT + "applied/"
CONTROLLER_KEY = ROOT + "controller"  # the elected controller's node ID, bound to its lease
MAP_KEY = ROOT + "map"  # the shard map, JSON
# + number (1..255): the node ID that holds that node number (no lease: numbers are permanent)
NUMBERS_PREFIX = ROOT + "numbers/"


class MapFormatError(ValueError):
    """The value under ``MAP_KEY`` is not a shard map."""


@dataclass(frozen=True, slots=True)
class VShard:
    """One virtual shard's owner (``None``: no node could take it), epoch and backup (the
    slot that holds copies of its session records; ``None``: none)."""

    slot: Slot | None
    epoch: int
    backup: Slot | None = None
    # the slot that served it before ``epoch`` (None: nobody, or the same node): where a node
    # whose first map gives it the shard asks for its sessions (``grant.moved_in``)
    prev: Slot | None = None


@dataclass(frozen=True, slots=True)
class ShardMap:
    """``leases``: for each node that owns shards, the lease it was registered under when the
    map gave them to it (its incarnation: a node that restarts has another lease, and its
    shards get new epochs)."""

    version: int
    vshards: tuple[VShard, ...]
    leases: tuple[tuple[str, int], ...] = ()  # (node, lease), sorted by node

    @property
    def count(self) -> int:
        return len(self.vshards)

    def lease_of(self, node: str) -> int:
        """The lease ``node`` holds its shards under (0: it holds none)."""
        return dict(self.leases).get(node, 0)

    def per_node(self) -> Counter[str]:
        """How many virtual shards each node serves."""
        return Counter(v.slot.node for v in self.vshards if v.slot is not None)

    def encode(self) -> bytes:
        owners: list[list[object]] = []
        for v in self.vshards:
            entry: list[object] = ([None, None, v.epoch] if v.slot is None
                                   else [v.slot.node, v.slot.worker, v.epoch])
            if v.backup is not None or v.prev is not None:
                entry += [None, None] if v.backup is None else [v.backup.node, v.backup.worker]
            if v.prev is not None:
                entry += [v.prev.node, v.prev.worker]
            owners.append(entry)
        return json.dumps({"version": self.version, "leases": dict(self.leases), "owners": owners},
                          separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> ShardMap:
        try:
            doc = json.loads(data)
            vshards = []
            for entry in doc["owners"]:
                # then the backup's node and worker, then the previous owner's (each optional)
                node, worker, epoch, *more = entry
                slot = None if node is None else Slot(str(node), int(worker))
                if len(more) not in (0, 2, 4):
                    raise ValueError(f"an owner entry of {len(entry)} fields")
                backup = Slot(str(more[0]), int(more[1])) if more and more[0] is not None else None
                prev = Slot(str(more[2]), int(more[3])) if len(more) == 4 else None
                vshards.append(VShard(slot, int(epoch), backup, prev))
            leases = tuple(sorted((str(n), int(lease)) for n, lease in doc["leases"].items()))
            return ShardMap(int(doc["version"]), tuple(vshards), leases)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MapFormatError(f"not a shard map: {exc}") from None


def next_map(current: ShardMap | None, placement: Sequence[Slot | None],
             leases: Mapping[str, int], backups: Sequence[Slot | None] | None = None) -> ShardMap | None:
    """The map after ``current`` that serves ``placement``, the nodes in it registered under
    ``leases``, with ``backups`` (none when not given); ``None`` when nothing changes. A
    virtual shard whose owner changes, or whose owner's lease changed (it restarted), gets the
    new version as its epoch."""
    if current is not None and len(placement) != current.count:
        raise ValueError(f"the map has {current.count} virtual shards, not {len(placement)}")
    version = 1 if current is None else current.version + 1
    owners = {slot.node for slot in placement if slot is not None}
    new_leases = tuple(sorted((node, leases[node]) for node in owners))
    old_leases = dict(current.leases) if current is not None else {}
    vshards = []
    for v, slot in enumerate(placement):
        old = None if current is None else current.vshards[v]
        same_owner = old is not None and old.slot == slot and (
            slot is None or old_leases.get(slot.node) == leases[slot.node])
        backup = backups[v] if backups is not None else None
        if same_owner and old is not None:
            vshards.append(old if old.backup == backup else VShard(slot, old.epoch, backup, old.prev))
            continue
        # a new owner: the one before is named, unless it is the same node (a restart)
        prev = old.slot if old is not None and old.slot is not None and (
            slot is None or old.slot.node != slot.node) else None
        vshards.append(VShard(slot, version, backup, prev))
    if current is not None and tuple(vshards) == current.vshards and new_leases == current.leases:
        return None
    return ShardMap(version, tuple(vshards), new_leases)
