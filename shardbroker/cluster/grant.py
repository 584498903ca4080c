"""What a node's supervisor tells its acceptor and workers: which virtual shards they serve.

Pure: no I/O, no clock. The supervisor builds a ``Grant`` from the fence (the map it holds
and its lease) and sends it to every child over the control channel (op ``fence``); each
child keeps the newest one (by ``seq``) and decides with it alone:

* ``owners[v]``: the local worker that serves virtual shard ``v``, or -1 when this node does
  not (another node's, nobody's, or no map yet);
* ``epochs[v]``: the shard's epoch in the map (0 where it is not served here);
* ``peers``: the client addresses (``host:port`` of the plain MQTT listener) of the other
  registered nodes (the hosts a relayed client's PROXY header is believed from), and ``remote[v]``: the index in ``peers`` of the
  node that serves ``v`` when another node does (-1 otherwise; empty when no shard is
  another node's): where the acceptor relays such a client;
* for the bus between nodes: ``number``, this node's number (``cluster/numbers.py``; 0:
  none yet); ``nodes``, every other registered node that has a number, sorted by node ID, as
  ``(node_id, number, lease, advertise, workers, key)`` (``advertise``: the ``HOST:PORT`` its
  worker ``w`` binds at ``PORT + w``; ``key``: its CURVE public key); and ``peer_of[v]``, the
  peer id of the worker the map gives virtual shard ``v``: the local worker index when the map
  gives it to this node (even while it is held back), ``number * 256 + worker`` when one of
  ``nodes`` holds it, -1 otherwise (nobody, or a node without a number); empty without a map;
* ``incoming[v]``: for a virtual shard the map gave this node from another live node, the
  peer id (``number * 256 + worker``) of the previous owner's worker, which is to send the
  shard's persistent sessions (``core/moves.py``); -1 otherwise (never moved, or the previous
  owner's node is not registered any more: nobody will send anything). Empty when no shard is
  incoming. ``moved_in`` computes it from the map held before and the map now;
* ``backup_of[v]``: as ``peer_of``, for the shard's backup slot in the map (where its owner
  keeps copies of its session records, ``core/replicas.py``); empty without a map;
* ``until``: a CLOCK_MONOTONIC time (system-wide on Linux, so it means the same in every
  process of the host) after which nothing may be served: the lease deadline as
  ``membership`` reckons it, which is never later than etcd's expiry. A child stops at
  ``until`` even when no newer grant comes (the supervisor stopped, say).

``NONE`` (served nothing) is what a child holds before the first grant, and what the
supervisor sends when the lease is lost.

``local_owners(node, workers, count)`` is the placement of every virtual shard over this
node's workers alone. Rendezvous hashing gives a virtual shard that the map places on this
node to the same worker whatever the other nodes are (the best of the node's own slots), so
this table is where each shard's state is kept in the data directory, and where a shard the
map gives this node later will be served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from shardbroker.cluster.fence import Fence
from shardbroker.cluster.placement import Slot, place, vshard_for
from shardbroker.cluster.shardmap import ShardMap

__all__ = ["NONE", "Grant", "GrantError", "Registration", "from_fence", "local_owners", "moved_in"]

PEER_STRIDE = 256  # a remote worker's peer id is number * PEER_STRIDE + worker


class Registration(Protocol):
    """What a grant reads of another node's registration (``membership.NodeInfo``)."""

    @property
    def advertise(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def clients(self) -> str: ...
    @property
    def number(self) -> int: ...
    @property
    def key(self) -> str: ...


class GrantError(ValueError):
    """A control request that is no grant."""


@dataclass(frozen=True, slots=True)
class Grant:
    seq: int  # grows with every grant the supervisor sends; an older one is ignored
    version: int  # the map's version (0: no map)
    lease: int
    until: float  # monotonic seconds; -inf: serve nothing
    owners: tuple[int, ...]  # per virtual shard: the local worker, or -1
    epochs: tuple[int, ...]
    peers: tuple[str, ...] = ()  # client addresses of other nodes
    remote: tuple[int, ...] = ()  # per virtual shard: its index in peers, or -1; or empty
    number: int = 0  # this node's number (0: none yet)
    # other nodes with a number: (node_id, number, lease, advertise, workers, key), by node ID
    nodes: tuple[tuple[str, int, int, str, int, str], ...] = ()
    peer_of: tuple[int, ...] = ()  # per virtual shard: the peer id of its worker, or -1; or empty
    incoming: tuple[int, ...] = ()  # per virtual shard: the previous owner's peer id, or -1; or empty
    backup_of: tuple[int, ...] = ()  # per virtual shard: the peer id of its backup, or -1; or empty

    @property
    def count(self) -> int:
        return len(self.owners)

    def owner(self, client_id: str, now: float) -> int:
        """The local worker that serves ``client_id`` at ``now``, or -1."""
        if not self.owners or now >= self.until:
            return -1
        return self.owners[vshard_for(client_id, len(self.owners))]

    def relay_to(self, client_id: str, now: float) -> str | None:
        """The client address of the other node that serves ``client_id`` at ``now``, or
        None (this node serves it, nobody does, or the owner has no address)."""
        if not self.remote or now >= self.until:
            return None
        index = self.remote[vshard_for(client_id, len(self.remote))]
        return self.peers[index] if index >= 0 else None

    def served_by(self, worker: int) -> list[int]:
        """The virtual shards ``worker`` serves under this grant."""
        return [v for v, w in enumerate(self.owners) if w == worker]

    def without(self, workers: set[int]) -> Grant:
        """This grant with nothing served by ``workers`` (they did not take it)."""
        return replace(self, owners=tuple(-1 if w in workers else w for w in self.owners))

    def to_value(self) -> dict[str, object]:
        return {"seq": self.seq, "version": self.version, "lease": self.lease,
                "until": self.until if math.isfinite(self.until) else None,
                "owners": list(self.owners), "epochs": list(self.epochs),
                "peers": list(self.peers), "remote": list(self.remote), "number": self.number,
                "nodes": [list(n) for n in self.nodes], "peer_of": list(self.peer_of),
                "incoming": list(self.incoming), "backup_of": list(self.backup_of)}

    @classmethod
    def from_value(cls, value: object) -> Grant:
        try:
            if not isinstance(value, dict):
                raise TypeError("not an object")
            until = value["until"]
            owners = tuple(int(w) for w in value["owners"])
            epochs = tuple(int(e) for e in value["epochs"])
            if len(epochs) != len(owners):
                raise ValueError("owners and epochs differ in length")
            peers = tuple(str(p) for p in value.get("peers", ()))
            remote = tuple(int(i) for i in value.get("remote", ()))
            if remote and (len(remote) != len(owners) or not all(-1 <= i < len(peers) for i in remote)):
                raise ValueError("remote does not match owners and peers")
            number = int(value.get("number", 0))
            nodes = tuple((str(n), int(num), int(lease), str(adv), int(w), str(key))
                          for n, num, lease, adv, w, key in value.get("nodes", ()))
            peer_of = tuple(int(p) for p in value.get("peer_of", ()))
            if not 0 <= number <= 0xFF or any(not -1 <= p <= 0xFFFF for p in peer_of):
                raise ValueError("number or peer_of out of range")
            if peer_of and owners and len(peer_of) != len(owners):
                raise ValueError("peer_of and owners differ in length")
            incoming = tuple(int(p) for p in value.get("incoming", ()))
            if any(not -1 <= p <= 0xFFFF for p in incoming) or (
                    incoming and peer_of and len(incoming) != len(peer_of)):
                raise ValueError("incoming out of range or of another length")
            backup_of = tuple(int(p) for p in value.get("backup_of", ()))
            if any(not -1 <= p <= 0xFFFF for p in backup_of) or (
                    backup_of and peer_of and len(backup_of) != len(peer_of)):
                raise ValueError("backup_of out of range or of another length")
            return cls(int(value["seq"]), int(value["version"]), int(value["lease"]),
                       -math.inf if until is None else float(until), owners, epochs, peers, remote,
                       number, nodes, peer_of, incoming, backup_of)
        except (KeyError, TypeError, ValueError) as exc:
            raise GrantError(f"not a grant: {exc}") from None


NONE = Grant(0, 0, 0, -math.inf, (), ())


def from_fence(fence: Fence, seq: int, workers: int, now: float,
               cleared: float = math.inf, nodes: Mapping[str, Registration] | None = None,
               leases: Mapping[str, int] | None = None, number: int = 0,
               incoming: Mapping[int, tuple[int, str, int]] | None = None) -> Grant:
    """The grant of ``fence`` (this node's map and lease) at ``now``: the shards it may serve
    on workers this node has, until the lease deadline. Nothing when it may serve nothing.
    ``cleared``: the oldest map version every other live node has applied; a shard the map
    gave this node at a later epoch is held back until then (its previous owner may still
    serve it: the handover of a shard between live nodes), unless ``incoming`` names its
    previous owner and that node is registered no more (its lease ended: it serves nothing,
    and the shard's clients, and the publishes for its sessions, wait for nobody else). ``nodes``: the registered nodes
    (this one is left out), under ``leases``; a shard the map gives one with a client address
    is relayed there (``peers``, ``remote``), and those with a number are the grant's
    ``nodes`` and ``peer_of``. ``number``: this node's. ``incoming``: per virtual shard moving
    in, its epoch and the previous owner's node and worker (``moved_in``); only those of a node still
    registered with a number, and still given to this node, become ``Grant.incoming``."""
    shard_map = fence.map
    registered = {node: info for node, info in (nodes or {}).items() if node != fence.node}
    numbered = {node: info for node, info in registered.items() if info.number > 0}
    bus_nodes = tuple((node, info.number, (leases or {}).get(node, 0), info.advertise,
                       info.workers, info.key) for node, info in sorted(numbered.items()))
    peer_of: tuple[int, ...] = ()
    backup_of: tuple[int, ...] = ()
    if shard_map is not None:
        peer_of = _peer_of(fence.node, [v.slot for v in shard_map.vshards], numbered)
        if any(v.backup is not None for v in shard_map.vshards):
            backup_of = _peer_of(fence.node, [v.backup for v in shard_map.vshards], numbered)
    moving: list[int] = []
    if incoming and shard_map is not None:
        moving = [-1] * shard_map.count
        for v, (_epoch, node, worker) in incoming.items():
            slot = shard_map.vshards[v].slot if 0 <= v < shard_map.count else None
            if slot is not None and slot.node == fence.node and node in numbered:
                moving[v] = numbered[node].number * PEER_STRIDE + worker
        if all(p < 0 for p in moving):
            moving = []
    if shard_map is None or now >= fence.lease_until:
        return Grant(seq, 0 if shard_map is None else shard_map.version, fence.lease, -math.inf,
                     (), (), number=number, nodes=bus_nodes, peer_of=peer_of, incoming=tuple(moving),
                     backup_of=backup_of)
    owners = [-1] * shard_map.count
    epochs = [0] * shard_map.count
    # shards taken from a node that is gone, at the epoch they were taken at
    orphaned = {v for v, (epoch, node, _w) in (incoming or {}).items()
                if node not in registered and 0 <= v < shard_map.count
                and shard_map.vshards[v].epoch == epoch}
    for v in fence.served(now):
        slot = shard_map.vshards[v].slot
        if slot is not None and 0 <= slot.worker < workers and (
                shard_map.vshards[v].epoch <= cleared or v in orphaned):
            owners[v] = slot.worker
            epochs[v] = shard_map.vshards[v].epoch
    others = sorted(node for node, info in registered.items() if info.clients)
    peers = [registered[node].clients for node in others]
    index = {node: i for i, node in enumerate(others)}
    remote = [-1] * shard_map.count if peers else []
    for v, vshard in enumerate(shard_map.vshards if peers else ()):
        if vshard.slot is not None and vshard.slot.node in index:
            remote[v] = index[vshard.slot.node]
    return Grant(seq, shard_map.version, fence.lease, fence.lease_until, tuple(owners),
                 tuple(epochs), tuple(peers), tuple(remote), number, bus_nodes, peer_of,
                 tuple(moving), backup_of)


def moved_in(me: str, before: ShardMap | None, after: ShardMap,
             held: Mapping[int, tuple[int, str, int]]) -> dict[int, tuple[int, str, int]]:
    """The virtual shards moving in to node ``me``, as ``{v: (epoch, node, worker)}``: the
    shard's epoch in ``after`` and the (node, worker) that held it before that epoch (the
    map's ``prev``, or else the owner in ``before``), for each shard ``after`` gives ``me``
    at an epoch ``before`` did not hold and another node held before. ``held`` is the previous
    answer: an entry stays while ``after`` gives the shard to ``me`` at the same epoch (the
    previous owner is named until the move is done, whichever maps come between); a shard
    given to ``me`` at a new epoch is judged again, and one given elsewhere is dropped."""
    out: dict[int, tuple[int, str, int]] = {}
    for v, vshard in enumerate(after.vshards):
        slot = vshard.slot
        if slot is None or slot.node != me:
            continue
        kept = held.get(v)
        if kept is not None and kept[0] == vshard.epoch:
            out[v] = kept
            continue
        was = before.vshards[v] if before is not None and v < before.count else None
        if was is not None and was.epoch == vshard.epoch:
            continue  # held at this epoch before: it is here already
        # the map names the owner before this epoch (a node whose first map gives it the
        # shard knows it too); a map without it: the owner in ``before``
        old = vshard.prev if vshard.prev is not None or was is None else was.slot
        if old is not None and old.node != me:
            out[v] = (vshard.epoch, old.node, old.worker)
    return out


def _peer_of(me: str, slots: Sequence[Slot | None], numbered: Mapping[str, Registration]) -> tuple[int, ...]:
    """Per virtual shard, the peer id of the worker of its slot in ``slots`` (``Grant.peer_of``,
    ``Grant.backup_of``)."""
    out = []
    for slot in slots:
        if slot is None:
            out.append(-1)
        elif slot.node == me:
            out.append(slot.worker)
        elif slot.node in numbered and 0 <= slot.worker < PEER_STRIDE:
            out.append(numbered[slot.node].number * PEER_STRIDE + slot.worker)
        else:
            out.append(-1)
    return tuple(out)


def local_owners(node: str, workers: int, count: int) -> list[int]:
    """The worker of this node each virtual shard goes to when the map places it here."""
    slots: Sequence[Slot] = [Slot(node, w) for w in range(workers)]
    return [slot.worker if slot is not None else 0 for slot in place(count, slots)]
