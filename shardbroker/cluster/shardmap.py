"""The shard map: which slot (node x worker) serves each virtual shard, at which epoch.

Pure: no I/O. The controller writes it to etcd as one JSON value under ``MAP_KEY``;
everyone else reads it.

Invariants, kept by ``next_map``:

* ``version`` grows by one with every map written (the first map is version 1);
* a virtual shard's ``epoch`` changes only when its owner changes, and then becomes the new
  map's version, so epochs only ever increase, and (vshard, epoch) names one owner for ever;
* ``len(vshards)`` is the cluster's virtual shard count, fixed once the first map exists.

The etcd keys of the cluster are named here too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shardbroker.cluster.placement import Slot

__all__ = ["CONTROLLER_KEY", "DRAIN_PREFIX", "MAP_KEY", "NODES_PREFIX", "MapFormatError",
           "ShardMap", "VShard", "next_map"]

ROOT = "/shardbroker/"
NODES_PREFIX = ROOT + "nodes/"  # + node ID: a live node's registration, bound to its lease
DRAIN_PREFIX = ROOT + "drain/"  # + node ID: the node is drained (no lease: it outlives restarts)
CONTROLLER_KEY = ROOT + "controller"  # the elected controller's node ID, bound to its lease
MAP_KEY = ROOT + "map"  # the shard map, JSON


class MapFormatError(ValueError):
    """The value under ``MAP_KEY`` is not a shard map."""


@dataclass(frozen=True, slots=True)
class VShard:
    """One virtual shard's owner (``None``: no node could take it) and epoch."""

    slot: Slot | None
    epoch: int


@dataclass(frozen=True, slots=True)
class ShardMap:
    version: int
    vshards: tuple[VShard, ...]

    @property
    def count(self) -> int:
        return len(self.vshards)

    def per_node(self) -> Counter[str]:
        """How many virtual shards each node serves."""
        return Counter(v.slot.node for v in self.vshards if v.slot is not None)

    def encode(self) -> bytes:
        owners = [None if v.slot is None else [v.slot.node, v.slot.worker, v.epoch]
                  for v in self.vshards]
        # an unowned shard keeps its epoch too
        epochs = [v.epoch for v in self.vshards if v.slot is None]
        return json.dumps({"version": self.version, "owners": owners, "unowned_epochs": epochs},
                          separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> ShardMap:
        try:
            doc = json.loads(data)
            unowned = iter(doc["unowned_epochs"])
            vshards = []
            for owner in doc["owners"]:
                if owner is None:
                    vshards.append(VShard(None, int(next(unowned))))
                else:
                    node, worker, epoch = owner
                    vshards.append(VShard(Slot(str(node), int(worker)), int(epoch)))
            return ShardMap(int(doc["version"]), tuple(vshards))
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise MapFormatError(f"not a shard map: {exc}") from None


def next_map(current: ShardMap | None, placement: Sequence[Slot | None]) -> ShardMap | None:
    """The map after ``current`` that serves ``placement``; ``None`` when nothing changes.
    A virtual shard whose owner changes gets the new version as its epoch."""
    if current is not None and len(placement) != current.count:
        raise ValueError(f"the map has {current.count} virtual shards, not {len(placement)}")
    version = 1 if current is None else current.version + 1
    vshards = []
    changed = current is None
    for v, slot in enumerate(placement):
        old = None if current is None else current.vshards[v]
        if old is not None and old.slot == slot:
            vshards.append(old)
        else:
            vshards.append(VShard(slot, version))
            changed = True
    return ShardMap(version, tuple(vshards)) if changed else None
