"""Fencing: a node serves a virtual shard only while it holds the shard's current epoch and
its own lease is alive; a frame or record stamped with an older epoch is refused.

Pure: time comes in as an argument (monotonic seconds), the lease deadline from
``membership`` (which computes it so that it is never later than etcd's own expiry).

Why this is enough for one owner at a time: etcd deletes a node's registration when its lease
expires, and only then does the controller give its shards to another node, at a higher
epoch. The old owner stops serving at its lease deadline at the latest (earlier when it cannot
renew), which comes before etcd's expiry, so the two never serve together. Messages that were
already in flight carry the old epoch and are refused by whoever checks them against a newer
map.

What it does not do: read etcd, or close clients (the owner does, when ``may_serve`` turns
false).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from shardbroker.cluster.shardmap import ShardMap

__all__ = ["Fence", "NotOwner", "Stamp", "Verdict"]


@dataclass(frozen=True, slots=True)
class Stamp:
    """What every inter-node frame and outbox record carries: the shard and its epoch."""

    vshard: int
    epoch: int


class Verdict(enum.Enum):
    CURRENT = "current"  # the epoch of the map this node holds: accept
    STALE = "stale"  # an older owner's: refuse for ever
    AHEAD = "ahead"  # from a newer map than this node's: refuse until it has read that map


class NotOwner(Exception):
    """This node may not serve (or stamp frames for) the virtual shard now."""


class Fence:
    """One node's view: the newest map it has read, and until when its lease is alive. The
    map must have given the shards to this node under this ``lease``: a map written for an
    earlier run of the node does not let a later one serve."""

    def __init__(self, node: str, lease: int) -> None:
        self.node = node
        self.lease = lease
        self.map: ShardMap | None = None
        self.lease_until = -math.inf

    def apply(self, new: ShardMap) -> bool:
        """Take ``new`` if it is newer than the map held; whether it was taken."""
        if self.map is not None and new.version <= self.map.version:
            return False
        if self.map is not None and new.count != self.map.count:
            raise ValueError(f"the map has {new.count} virtual shards, not {self.map.count}")
        self.map = new
        return True

    def renewed(self, until: float) -> None:
        """The lease is alive until ``until`` (monotonic), as ``membership`` reckons it."""
        self.lease_until = until

    def lost(self) -> None:
        """The lease is gone (or about to be): serve nothing from now on."""
        self.lease_until = -math.inf

    def may_serve(self, vshard: int, now: float) -> bool:
        if self.map is None or now >= self.lease_until or not 0 <= vshard < self.map.count:
            return False
        slot = self.map.vshards[vshard].slot
        return (slot is not None and slot.node == self.node
                and self.map.lease_of(self.node) == self.lease)

    def served(self, now: float) -> list[int]:
        """The virtual shards this node may serve at ``now``."""
        if self.map is None:
            return []
        return [v for v in range(self.map.count) if self.may_serve(v, now)]

    def stamp(self, vshard: int, now: float) -> Stamp:
        """The stamp for a frame this node sends as ``vshard``'s owner."""
        if not self.may_serve(vshard, now):
            raise NotOwner(f"node {self.node} does not serve virtual shard {vshard} now")
        assert self.map is not None
        return Stamp(vshard, self.map.vshards[vshard].epoch)

    def check(self, stamp: Stamp) -> Verdict:
        """Whether a frame or record stamped ``stamp`` comes from the shard's current owner,
        as far as the map held says. Without a map nothing is current."""
        if self.map is None or not 0 <= stamp.vshard < self.map.count:
            return Verdict.AHEAD if self.map is None else Verdict.STALE
        epoch = self.map.vshards[stamp.vshard].epoch
        if stamp.epoch < epoch:
            return Verdict.STALE
        return Verdict.CURRENT if stamp.epoch == epoch else Verdict.AHEAD
