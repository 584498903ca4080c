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
from typing import TypeVar

from shardbroker.core.topics import TopicTrie, parse_shared

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


class RouteTable:
    def __init__(self) -> None:
        self._plain: TopicTrie[int, bool] = TopicTrie()
        self._shared: TopicTrie[tuple[str, int], bool] = TopicTrie()
        self._keys: dict[int, dict[str, bool]] = {}
        self._turns = RoundRobin()
        self._cache: dict[str, dict[int, Target]] = {}

    def add(self, shard: int, key: str, durable: bool = False) -> bool:
        """Add ``key`` for ``shard`` or change its durable flag; True if anything changed."""
        keys = self._keys.setdefault(shard, {})
        if keys.get(key) is durable:
            return False
        keys[key] = durable
        self._cache.clear()
        shared = parse_shared(key)
        if shared is None:
            self._plain.add(key, shard, durable)
        else:
            group, flt = shared
            self._shared.add(flt, (group, shard), durable)
        return True

    def remove(self, shard: int, key: str) -> bool:
        keys = self._keys.get(shard)
        if not keys or key not in keys:
            return False
        del keys[key]
        self._cache.clear()
        shared = parse_shared(key)
        if shared is None:
            self._plain.remove(key, shard)
        else:
            group, flt = shared
            self._shared.remove(flt, (group, shard))
        return True

    def replace(self, shard: int, keys: dict[str, bool]) -> None:
        """Make ``keys`` (key -> durable) the complete set for ``shard`` (a sync from it)."""
        for key in list(self._keys.get(shard, ())):
            if key not in keys:
                self.remove(shard, key)
        for key, durable in keys.items():
            self.add(shard, key, durable)

    def keys(self, shard: int) -> dict[str, bool]:
        return dict(self._keys.get(shard, {}))

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
            for _flt, entries in self._plain.match(topic):
                for shard, durable in entries.items():
                    t = cached.get(shard)
                    if t is None:
                        cached[shard] = Target(non_shared=True, durable=durable)
                    elif durable:
                        t.durable = True
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
