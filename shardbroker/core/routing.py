"""The route table: which shards want which topic filters.

Every worker keeps a full copy, its own shard included. A key is a filter as
subscribed: a plain filter (``a/+/c``) or a shared one (``$share/g/a/+/c``).
A shard holds a key while at least one of its sessions subscribes to it; the
first subscriber adds the key everywhere, the last one removes it.

Each key of a shard carries a *durable* flag: whether a persistent session of
that shard subscribes to it. Only publishes that reach a durable key of another
shard need the durable outbox (``outbox.py``); the rest go straight over the bus.

``targets(topic)`` is the per-publish question: for each shard, whether it has
plain subscribers, which shared groups it must serve, and whether any of them is
durable. A shared group's message goes to exactly one shard that has members of
that group, chosen round robin.

No I/O: the shard sends and receives updates over the bus; this is the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TypeVar

from shardbroker.core.topics import SHARE_PREFIX, FilterMap, TopicTrie, parse_shared

T = TypeVar("T")


class RoundRobin:
    """Takes turns among the candidates of each key (a shared group and its filter): the one
    rotation used both to pick a shard for a group and to pick a member on that shard."""

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], int] = {}

    def pick(self, key: tuple[str, str], candidates: Sequence[T]) -> T:
        n = self._turns.get(key, 0)
        self._turns[key] = n + 1
        return candidates[n % len(candidates)]


@dataclass(slots=True)
class Target:
    non_shared: bool = False  # it has non-shared subscriptions matching the topic
    groups: list[tuple[str, str]] = field(default_factory=list)  # (group, filter)
    durable: bool = False  # a persistent session there may need it: hand over durably


_MASK64 = (1 << 64) - 1


def _entry_hash(key: str, durable: bool) -> int:
    data = key.encode("utf-8", "surrogatepass") + (b"\x01" if durable else b"\x00")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class RouteTable:
    """Plain keys map to one small integer each (``FilterMap``): bit ``2 * s`` says that
    the shard in slot ``s`` has the key, bit ``2 * s + 1`` that it is durable there. With up
    to four shards that integer is one of the interpreter's shared small ints, so a route
    costs its filter string and a dict slot (or the trie nodes of a wildcard filter).

    Slots are dense, given to shards in the order they first hold a key: a worker of another
    node has a peer id of 256 or more (``peer.messages.REMOTE_BASE``), which as a bit
    position would make every mask hundreds of bits wide and every match walk them."""

    def __init__(self) -> None:
        self._slot_of: dict[int, int] = {}  # shard -> slot
        self._shard_at: list[int] = []  # slot -> shard
        self._digests: dict[int, int] = {}  # shard -> the sum of its entries' hashes
        self._plain: FilterMap[int] = FilterMap()
        self._shared: TopicTrie[tuple[str, int], bool] = TopicTrie()
        self._turns = RoundRobin()
        self._cache: dict[str, dict[int, Target]] = {}

    def add(self, shard: int, key: str, durable: bool = False) -> bool:
        """Add ``key`` for ``shard`` or change its durable flag; True if anything changed."""
        shared = parse_shared(key)
        if shared is None:
            slot = self._slot_of.get(shard)
            if slot is None:
                slot = self._slot_of[shard] = len(self._shard_at)
                self._shard_at.append(shard)
            mask = self._plain.get(key) or 0
            bits = (3 if durable else 1) << (2 * slot)
            new = (mask & ~(3 << (2 * slot))) | bits
            if new == mask:
                return False
            self._plain.set(key, new)
            was = bool(mask & (2 << (2 * slot))) if mask & (1 << (2 * slot)) else None
        else:
            group, flt = shared
            entries = self._shared.get(flt)
            was = entries.get((group, shard)) if entries is not None else None
            if was is durable:
                return False
            self._shared.add(flt, (group, shard), durable)
        d = self._digests.get(shard, 0) + _entry_hash(key, durable)
        self._digests[shard] = (d - _entry_hash(key, was) if was is not None else d) & _MASK64
        self._cache.clear()
        return True

    def remove(self, shard: int, key: str) -> bool:
        shared = parse_shared(key)
        if shared is None:
            slot = self._slot_of.get(shard)
            mask = self._plain.get(key)
            if slot is None or mask is None or not mask & (1 << (2 * slot)):
                return False
            rest = mask & ~(3 << (2 * slot))
            was = bool(mask & (2 << (2 * slot)))
            if rest:
                self._plain.set(key, rest)
            else:
                self._plain.remove(key)
        else:
            group, flt = shared
            entries = self._shared.get(flt)
            if entries is None or (group, shard) not in entries:
                return False
            was = entries[(group, shard)]
            self._shared.remove(flt, (group, shard))
        self._digests[shard] = (self._digests.get(shard, 0) - _entry_hash(key, was)) & _MASK64
        self._cache.clear()
        return True

    def digest(self, shard: int) -> int:
        """A digest of ``shard``'s keys and durable flags (64 bits), whatever the order they
        came in: the sum of a BLAKE2b-64 of each. Two tables that hold the same keys for a
        shard give it the same digest, so a shard's own view and its peers' can be compared
        without sending the keys."""
        return self._digests.get(shard, 0)

    def replace(self, shard: int, keys: dict[str, bool]) -> None:
        """Make ``keys`` (key -> durable) the complete set for ``shard`` (a sync from it)."""
        for key in self.keys(shard):
            if key not in keys:
                self.remove(shard, key)
        for key, durable in keys.items():
            self.add(shard, key, durable)

    def size(self) -> int:
        """Distinct filters in the table (plain keys, and the filters of shared subscriptions)."""
        return len(self._plain) + len(self._shared)

    def keys(self, shard: int) -> dict[str, bool]:
        """Every key of ``shard``, with its durable flag."""
        slot = self._slot_of.get(shard)
        present = 0 if slot is None else 1 << (2 * slot)
        out = {key: bool(mask & (present << 1)) for key, mask in self._plain.items() if mask & present}
        for flt in self._shared.filters():
            for (group, s), durable in (self._shared.get(flt) or {}).items():
                if s == shard:
                    out[f"{SHARE_PREFIX}{group}/{flt}"] = durable
        return out

    def holders(self) -> dict[str, dict[int, bool]]:
        """Every key, with the shards that hold it and whether it is durable there (a snapshot,
        for ``shardbroker ctl routes``)."""
        out: dict[str, dict[int, bool]] = {}
        at = self._shard_at
        for key, mask in self._plain.items():
            shards: dict[int, bool] = {}
            slot = 0
            while mask:
                if mask & 1:
                    shards[at[slot]] = bool(mask & 2)
                mask >>= 2
                slot += 1
            out[key] = shards
        for flt in self._shared.filters():
            for (group, shard), durable in (self._shared.get(flt) or {}).items():
                out.setdefault(f"{SHARE_PREFIX}{group}/{flt}", {})[shard] = durable
        return out

    def shards_for_group(self, group: str, flt: str) -> list[int]:
        entries = self._shared.get(flt) or {}
        return sorted(s for (g, s) in entries if g == group)

    def targets(self, topic: str) -> dict[int, Target]:
        """Shards that must receive a publish to ``topic``, and what each serves.

        Plain routes are cached per topic (cleared on any change); shared-group picks
        rotate, so they are computed each time.
        """
        cached = self._cache.get(topic)
        if cached is None:
            cached = {}
            at = self._shard_at
            for _flt, mask in self._plain.match(topic):
                slot = 0
                while mask:
                    if mask & 1:
                        durable = bool(mask & 2)
                        shard = at[slot]
                        t = cached.get(shard)
                        if t is None:
                            cached[shard] = Target(non_shared=True, durable=durable)
                        elif durable:
                            t.durable = True
                    mask >>= 2
                    slot += 1
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[topic] = cached
        shared = self._shared.match(topic) if len(self._shared) else []
        if not shared:
            return cached
        out = {s: Target(t.non_shared, [], t.durable) for s, t in cached.items()}
        for flt, members in shared:
            groups: dict[str, list[tuple[int, bool]]] = {}
            for (group, shard), durable in members.items():
                groups.setdefault(group, []).append((shard, durable))
            for group, shards in groups.items():
                shards.sort()
                pick, durable = self._turns.pick((group, flt), shards)
                t = out.get(pick)
                if t is None:
                    t = out[pick] = Target()
                t.groups.append((group, flt))
                t.durable = t.durable or durable
        return out
