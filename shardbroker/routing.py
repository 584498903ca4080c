"""The route table: which shards want which topic filters.

Every worker keeps a full copy, its own shard included. A key is a filter as
subscribed: a plain filter (``a/+/c``) or a shared one (``$share/g/a/+/c``).
A shard holds a key while at least one of its sessions subscribes to it; the
first subscriber adds the key everywhere, the last one removes it.

``targets(topic)`` is the per-publish question: for each shard, whether it has
plain subscribers and which shared groups it must serve. A shared group's message
goes to exactly one shard that has members of that group, chosen round robin.

No I/O: the shard sends and receives updates over the bus; this is the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .topics import TopicTrie, parse_shared


@dataclass(slots=True)
class Target:
    plain: bool = False
    groups: list[tuple[str, str]] = field(default_factory=list)  # (group, filter)


class RouteTable:
    def __init__(self) -> None:
        self._plain: TopicTrie[int, None] = TopicTrie()
        self._shared: TopicTrie[tuple[str, int], None] = TopicTrie()
        self._keys: dict[int, set[str]] = {}
        self._rr: dict[tuple[str, str], int] = {}
        self._cache: dict[str, dict[int, Target]] = {}

    def add(self, shard: int, key: str) -> bool:
        keys = self._keys.setdefault(shard, set())
        if key in keys:
            return False
        keys.add(key)
        self._cache.clear()
        shared = parse_shared(key)
        if shared is None:
            self._plain.add(key, shard, None)
        else:
            group, flt = shared
            self._shared.add(flt, (group, shard), None)
        return True

    def remove(self, shard: int, key: str) -> bool:
        keys = self._keys.get(shard)
        if not keys or key not in keys:
            return False
        keys.discard(key)
        self._cache.clear()
        shared = parse_shared(key)
        if shared is None:
            self._plain.remove(key, shard)
        else:
            group, flt = shared
            self._shared.remove(flt, (group, shard))
        return True

    def replace(self, shard: int, keys: set[str]) -> None:
        """Make ``keys`` the complete set for ``shard`` (a sync from that shard)."""
        for key in list(self._keys.get(shard, ())):
            if key not in keys:
                self.remove(shard, key)
        for key in keys:
            self.add(shard, key)

    def keys(self, shard: int) -> set[str]:
        return set(self._keys.get(shard, ()))

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
                for shard in entries:
                    t = cached.get(shard)
                    if t is None:
                        cached[shard] = Target(plain=True)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[topic] = cached
        shared = self._shared.match(topic) if len(self._shared) else []
        if not shared:
            return cached
        out = {s: Target(t.plain, []) for s, t in cached.items()}
        for flt, entries in shared:
            groups: dict[str, list[int]] = {}
            for group, shard in entries:
                groups.setdefault(group, []).append(shard)
            for group, shards in groups.items():
                shards.sort()
                k = (group, flt)
                n = self._rr.get(k, 0)
                self._rr[k] = n + 1
                pick = shards[n % len(shards)]
                t = out.get(pick)
                if t is None:
                    t = out[pick] = Target()
                t.groups.append((group, flt))
        return out
