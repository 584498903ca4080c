"""Where a client lives in a cluster: client ID -> virtual shard -> (node, worker).

Pure: no I/O, no clock; the same inputs give the same answer in every process and release.

* ``vshard_for(client_id, count)``: the virtual shard, ``sharding.shard_for`` with ``count``
  shards (BLAKE2b-64 of the UTF-8 client ID, modulo ``count``), so it is stable across
  processes and restarts like the single-host shard. The count is fixed for the life of a
  cluster (``[cluster] virtual_shards``); a client's virtual shard never changes.
* ``place(count, slots)``: each virtual shard goes to the slot (node x worker) with the
  highest rendezvous score, BLAKE2b-64 of ``"<node>/<worker>/"`` followed by the virtual
  shard as 4 bytes, big-endian. A slot that comes or
  goes only takes or gives up its own shards: adding one node to N equal nodes moves about
  1/(N+1) of the virtual shards, all of them to the new node; removing (draining) a node
  moves only the shards it held. Each slot's share is about even (binomial spread).
* ``place_with_backups(count, slots)``: the same owners, and for each virtual shard its
  *backup*: the best slot on another node. When the owner's node leaves, the shard goes to
  exactly that slot (the best of those left), so the backup is where the owner keeps a copy
  of the shard's session records (``core/replicas.py``) for its successor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shardbroker.sharding import shard_for

__all__ = ["Slot", "place", "place_with_backups", "slots_of", "vshard_for"]


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """One worker of one node: where a virtual shard is served."""

    node: str
    worker: int


def vshard_for(client_id: str, count: int) -> int:
    """The virtual shard (0..count-1) of ``client_id``."""
    return shard_for(client_id, count)


def slots_of(workers: Mapping[str, int], excluded: Iterable[str] = ()) -> list[Slot]:
    """The slots of nodes with their worker counts, leaving out ``excluded`` (drained) nodes."""
    out = set(excluded)
    return sorted(Slot(node, w) for node, n in workers.items() if node not in out
                  for w in range(n))


def place(count: int, slots: Iterable[Slot]) -> list[Slot | None]:
    """The slot of each virtual shard 0..count-1 (``None`` for all when there is no slot).
    Ties (a 64-bit collision) go to the lowest slot, so the answer is still one."""
    return place_with_backups(count, slots)[0]


def place_with_backups(count: int, slots: Iterable[Slot]) -> tuple[list[Slot | None], list[Slot | None]]:
    """The owner of each virtual shard (as ``place``) and its backup: the highest scoring
    slot on another node than the owner's (``None`` when every slot is on one node)."""
    candidates = sorted(set(slots))
    if not candidates:
        return [None] * count, [None] * count
    # the slot's part of the hashed bytes is hashed once; each score continues a copy
    bases = [hashlib.blake2b(f"{s.node}/{s.worker}/".encode("utf-8", "surrogatepass"),
                             digest_size=8) for s in candidates]
    owners: list[Slot | None] = []
    backups: list[Slot | None] = []
    for v in range(count):
        suffix = v.to_bytes(4, "big")
        scores = []
        for i, base in enumerate(bases):
            h = base.copy()
            h.update(suffix)
            scores.append((-int.from_bytes(h.digest(), "big"), i))
        scores.sort()
        owner = candidates[scores[0][1]]
        owners.append(owner)
        backups.append(next((candidates[i] for _, i in scores[1:] if candidates[i].node != owner.node), None))
    return owners, backups
