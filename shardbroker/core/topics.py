"""MQTT topic names, topic filters, and a trie that matches topics to filters.

What it does:

* ``validate_topic_name`` / ``validate_topic_filter`` enforce the rules of
  MQTT 5.0 section 4.7 (and 4.8.2 for shared subscriptions) and raise
  ``ProtocolError`` with reason 0x90 (topic name invalid) or 0x8F (topic filter
  invalid). The same rules hold for 3.1 and 3.1.1.
* ``parse_shared`` splits ``$share/{group}/{filter}``.
* ``matches`` compares one filter with one topic.
* ``FilterMap`` maps many filters to one value each and finds every filter
  matching a topic at a cost that depends on the topic's depth, not on the
  number of filters. ``TopicTrie`` is a ``FilterMap`` of ``{key: value}``
  entries (typically ``{client_id: subscription}``).

Invariants:

* Levels are separated by ``/`` and empty levels are real levels: ``"a//b"``
  has three levels, ``"/a"`` has two (the first empty).
* ``+`` matches exactly one level, including an empty one. ``#`` matches its
  parent level and every level below it (``"a/#"`` matches ``"a"``).
* Filters whose first level is ``+`` or ``#`` never match topics that start
  with ``$`` [MQTT-4.7.2-1].
* In a ``FilterMap`` every trie node either holds a value or has descendants
  that do; nodes are pruned as soon as this stops being true, so memory follows
  the live filters. A ``TopicTrie`` filter is there while it has entries.

What it does not do:

* ``matches`` and ``TopicTrie`` do not validate their input: they expect a
  filter accepted by ``validate_topic_filter`` and a topic accepted by
  ``validate_topic_name`` (invalid input gives unspecified, but harmless,
  results).
* They treat a filter literally: a shared subscription ``$share/g/a/b`` is not
  understood by ``matches`` or the trie. Callers split it with
  ``parse_shared`` and store the inner filter ``a/b`` (keyed by group and
  client) themselves.
* Nothing here knows about protocol versions, authorisation, or retained
  messages (matching stored topics against a new filter is the reverse
  problem and lives elsewhere).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from shardbroker.protocol import reasons
from shardbroker.protocol.errors import ProtocolError

__all__ = [
    "MAX_TOPIC_BYTES",
    "SHARE_PREFIX",
    "FilterMap",
    "TopicTrie",
    "beyond_limits",
    "matches",
    "parse_shared",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES = 65535
"""Longest topic name or filter, in UTF-8 bytes (a UTF-8 string's 16-bit length)."""

SHARE_PREFIX = "$share/"
"""Topic filters starting with this are shared subscriptions (MQTT 5.0 section 4.8.2)."""

_SAFE_CHARS = MAX_TOPIC_BYTES // 4
"""A string of at most this many code points is within the byte limit whatever it holds."""

_SHOW_CHARS = 80
"""How much of an offending string an error message quotes."""


def _show(text: str) -> str:
    """``repr`` of ``text``, shortened so that error messages stay readable."""
    if len(text) <= _SHOW_CHARS:
        return repr(text)
    return repr(text[:_SHOW_CHARS]) + f"... ({len(text)} characters)"


def _too_long(text: str) -> bool:
    if len(text) <= _SAFE_CHARS:
        return False
    # surrogatepass: lone surrogates are the codec's business, not a crash here.
    return len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES


def validate_topic_name(topic: str) -> None:
    """Check a PUBLISH (or Will) topic name; raise ``ProtocolError(0x90)`` if invalid."""
    if not topic:
        raise ProtocolError(reasons.TOPIC_NAME_INVALID, "topic name is empty [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise ProtocolError(
            reasons.TOPIC_NAME_INVALID,
            f"topic name {_show(topic)} contains a wildcard '+' or '#' [MQTT-3.3.2-2]",
        )
    if "\x00" in topic:
        raise ProtocolError(
            reasons.TOPIC_NAME_INVALID, f"topic name {_show(topic)} contains U+0000 [MQTT-4.7.3-2]"
        )
    if _too_long(topic):
        raise ProtocolError(
            reasons.TOPIC_NAME_INVALID,
            f"topic name {_show(topic)} is longer than {MAX_TOPIC_BYTES} UTF-8 bytes [MQTT-4.7.3-3]",
        )


def beyond_limits(topic: str, max_levels: int, max_bytes: int) -> str | None:
    """Why a valid topic name or filter is beyond the broker's limits (``limits.max_topic_levels``,
    ``limits.max_topic_length``), or None."""
    if topic.count("/") >= max_levels:
        return f"more than {max_levels} levels (limits.max_topic_levels)"
    if max_bytes < MAX_TOPIC_BYTES and len(topic) * 4 > max_bytes \
            and len(topic.encode("utf-8", "surrogatepass")) > max_bytes:
        return f"longer than {max_bytes} UTF-8 bytes (limits.max_topic_length)"
    return None


def _filter_error(topic_filter: str, problem: str) -> ProtocolError:
    return ProtocolError(
        reasons.TOPIC_FILTER_INVALID, f"topic filter {_show(topic_filter)} {problem}"
    )


def _check_levels(whole: str, levels_text: str) -> None:
    """Wildcard placement in a (non-shared) filter; ``whole`` is only for messages."""
    if "+" not in levels_text and "#" not in levels_text:
        return
    levels = levels_text.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                raise _filter_error(
                    whole, "has '#' sharing a level with other characters [MQTT-4.7.1-1]"
                )
            if i != last:
                raise _filter_error(whole, "has '#' before the last level [MQTT-4.7.1-1]")
        elif "+" in level and level != "+":
            raise _filter_error(
                whole, "has '+' sharing a level with other characters [MQTT-4.7.1-2]"
            )


def validate_topic_filter(topic_filter: str) -> None:
    """Check a SUBSCRIBE / UNSUBSCRIBE topic filter; raise ``ProtocolError(0x8F)`` if invalid.

    Shared subscriptions ``$share/{group}/{filter}`` are checked too: the group
    (ShareName) is non-empty and holds no ``/``, ``+`` or ``#``, and is followed
    by ``/`` and a non-empty valid filter [MQTT-4.8.2-1, MQTT-4.8.2-2].
    Whether shared subscriptions are *allowed* (e.g. for a 3.1.1 client) is the
    caller's decision.
    """
    if not topic_filter:
        raise ProtocolError(reasons.TOPIC_FILTER_INVALID, "topic filter is empty [MQTT-4.7.3-1]")
    if "\x00" in topic_filter:
        raise _filter_error(topic_filter, "contains U+0000 [MQTT-4.7.3-2]")
    if _too_long(topic_filter):
        raise _filter_error(
            topic_filter, f"is longer than {MAX_TOPIC_BYTES} UTF-8 bytes [MQTT-4.7.3-3]"
        )
    if topic_filter.startswith(SHARE_PREFIX):
        group, slash, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
        if not group:
            raise _filter_error(
                topic_filter, "is a shared subscription with an empty share name [MQTT-4.8.2-1]"
            )
        if "+" in group or "#" in group:
            raise _filter_error(
                topic_filter,
                "is a shared subscription whose share name contains '+' or '#' [MQTT-4.8.2-2]",
            )
        if not slash or not inner:
            raise _filter_error(
                topic_filter,
                "is a shared subscription without a topic filter after the share name [MQTT-4.8.2-2]",
            )
        _check_levels(topic_filter, inner)
    else:
        _check_levels(topic_filter, topic_filter)


def parse_shared(topic_filter: str) -> tuple[str, str] | None:
    """``"$share/g/a/b"`` -> ``("g", "a/b")``; a non-shared filter -> ``None``.

    Expects a filter accepted by ``validate_topic_filter``.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    return group, inner


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic_filter`` (valid, not shared) matches ``topic`` (a valid topic name)."""
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    depth = len(topic_levels)
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # '#' is last; it matches its parent level too [MQTT-4.7.1-1]
        if i >= depth:
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == depth


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


_LITERAL, _TAIL, _TRIE = 0, 1, 2


def _kind(topic_filter: str) -> int:
    """Where a ``FilterMap`` keeps ``topic_filter``: ``_LITERAL`` without a wildcard;
    ``_TAIL`` when its one wildcard is its last level, after at least one literal level
    (``a/b/+``, ``a/#``: the usual shape of a wildcard subscription); ``_TRIE`` otherwise."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return _LITERAL
    head = topic_filter[:-2]
    if topic_filter[-2:-1] == "/" and "+" not in head and "#" not in head:
        return _TAIL  # (a valid filter's '+' or '#' is a whole level, so the last one is it)
    return _TRIE


class _Node(Generic[V]):
    """One level of the wildcard part of a ``FilterMap``.

    ``children`` holds literal levels (``None`` until the first one); the ``+``
    and ``#`` children have their own slots so that matching never looks them
    up in a dict. ``value`` is ``None`` or the value of the filter ``filter``
    that ends here.
    """

    __slots__ = ("children", "filter", "hash", "plus", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] | None = None
        self.plus: _Node[V] | None = None
        self.hash: _Node[V] | None = None
        self.value: V | None = None
        self.filter: str = ""

    def is_empty(self) -> bool:
        return self.value is None and self.children is None and self.plus is None and self.hash is None


class FilterMap(Generic[V]):
    """One value per topic filter, and every filter that matches a topic, at a cost that
    depends on the topic's depth, not on the number of filters.

    Filters are kept in one of three places, by shape (``_kind``):

    * without a wildcard, most of a broker's: one dict (``_exact``); matching looks the
      topic up once;
    * with one wildcard, as the last level after literal ones (``a/b/+``, ``a/b/#``):
      one dict too (``_tails``), keyed by the filter itself. Matching builds the few
      filters of that shape that could match the topic (its parent level and ``+``; its
      leading levels and ``#``, for the numbers of leading levels that some filter has)
      and looks each up;
    * any other: a trie with one node per level (its level names interned, so filters
      and maps in one process share them).

    A filter in either dict costs a dict slot (its key is the caller's string, shared
    with whatever else holds it), not a chain of nodes. Values must not be ``None``.

    ``cache_size`` (default 256, 0 disables) bounds a small topic -> result cache for
    ``match``, emptied whenever a filter is added, removed or given another value
    (callers that change a value in place, such as ``TopicTrie``'s dicts, see the
    change through the cache too).
    """

    __slots__ = ("_cache", "_cache_size", "_exact", "_hash_depths", "_plus_tails", "_root", "_tails", "_wild")

    def __init__(self, cache_size: int = 256) -> None:
        self._exact: dict[str, V] = {}
        self._tails: dict[str, V] = {}
        self._plus_tails = 0  # filters in ``_tails`` ending in '+'
        self._hash_depths: dict[int, int] = {}  # leading levels of a '#' filter in ``_tails`` -> filters
        self._root: _Node[V] = _Node()
        self._wild = 0
        self._cache: dict[str, list[tuple[str, V]]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self._exact) + len(self._tails) + self._wild

    def set(self, topic_filter: str, value: V) -> bool:
        """Map ``topic_filter`` to ``value``; True if the filter was not there before."""
        kind = _kind(topic_filter)
        if kind == _LITERAL:
            exact = self._exact
            old = exact.get(topic_filter)
            exact[topic_filter] = value
        elif kind == _TAIL:
            tails = self._tails
            old = tails.get(topic_filter)
            tails[topic_filter] = value
            if old is None:
                self._tail_count(topic_filter, 1)
        else:
            node = self._root
            for level in topic_filter.split("/"):
                if level == "+":
                    child = node.plus
                    if child is None:
                        child = node.plus = _Node()
                elif level == "#":
                    child = node.hash
                    if child is None:
                        child = node.hash = _Node()
                else:
                    children = node.children
                    if children is None:
                        children = node.children = {}
                    child = children.get(level)
                    if child is None:
                        child = children[sys.intern(level)] = _Node()
                node = child
            old = node.value
            node.value = value
            node.filter = topic_filter
            if old is None:
                self._wild += 1
        if old is not value:
            self._cache.clear()
        return old is None

    def _tail_count(self, topic_filter: str, step: int) -> None:
        """Count a filter of ``_tails`` in (``step`` 1) or out (-1)."""
        if topic_filter[-1] == "+":
            self._plus_tails += step
            return
        depths = self._hash_depths
        depth = topic_filter.count("/")
        left = depths.get(depth, 0) + step
        if left:
            depths[depth] = left
        else:
            del depths[depth]

    def remove(self, topic_filter: str) -> V | None:
        """Forget ``topic_filter``; its value, or None if it was not there. Trie nodes left
        with nothing below them are pruned, so memory follows the live filters."""
        kind = _kind(topic_filter)
        if kind != _TRIE:
            value = (self._exact if kind == _LITERAL else self._tails).pop(topic_filter, None)
            if value is not None:
                if kind == _TAIL:
                    self._tail_count(topic_filter, -1)
                self._cache.clear()
            return value
        node = self._root
        path: list[tuple[_Node[V], str]] = []
        for level in topic_filter.split("/"):
            if level == "+":
                child = node.plus
            elif level == "#":
                child = node.hash
            else:
                child = node.children.get(level) if node.children is not None else None
            if child is None:
                return None
            path.append((node, level))
            node = child
        value = node.value
        if value is None:
            return None
        node.value = None
        node.filter = ""
        self._wild -= 1
        self._cache.clear()
        for parent, level in reversed(path):  # prune from the bottom up
            if not node.is_empty():
                break
            if level == "+":
                parent.plus = None
            elif level == "#":
                parent.hash = None
            else:
                children = parent.children
                assert children is not None
                del children[level]
                if not children:
                    parent.children = None
            node = parent
        return value

    def get(self, topic_filter: str) -> V | None:
        """The value of exactly ``topic_filter`` (no wildcard matching), or None."""
        kind = _kind(topic_filter)
        if kind == _LITERAL:
            return self._exact.get(topic_filter)
        if kind == _TAIL:
            return self._tails.get(topic_filter)
        node: _Node[V] | None = self._root
        for level in topic_filter.split("/"):
            assert node is not None
            if level == "+":
                node = node.plus
            elif level == "#":
                node = node.hash
            else:
                children = node.children
                node = children.get(level) if children is not None else None
            if node is None:
                return None
        assert node is not None
        return node.value

    def match(self, topic: str) -> list[tuple[str, V]]:
        """Every ``(filter, value)`` whose filter matches ``topic`` (a valid topic name).

        Each matching filter appears once; the order is unspecified. The list is the
        caller's to keep or change.
        """
        cache = self._cache
        cached = cache.get(topic)
        if cached is not None:
            return cached.copy()
        value = self._exact.get(topic)
        result: list[tuple[str, V]] = [] if value is None else [(topic, value)]
        if self._tails:
            self._match_tails(topic, result)
        if self._wild:
            self._match(topic, result)
        if self._cache_size > 0:
            if len(cache) >= self._cache_size:
                cache.clear()
            cache[topic] = result.copy()
        return result

    def _match_tails(self, topic: str, out: list[tuple[str, V]]) -> None:
        """The filters of ``_tails`` that match ``topic``: ``parent/+`` for its last level,
        ``leading/#`` for every number of leading levels that a '#' filter here has. Their
        first level is literal, so the '$' rule [MQTT-4.7.2-1] never applies."""
        tails = self._tails
        if self._plus_tails:
            cut = topic.rfind("/")
            if cut >= 0:
                candidate = topic[:cut + 1] + "+"
                value = tails.get(candidate)
                if value is not None:
                    out.append((candidate, value))
        depths = self._hash_depths
        if not depths:
            return
        deepest = max(depths)
        ends: list[int] = []  # the index of the slash after each leading level
        at = topic.find("/")
        while at >= 0 and len(ends) < deepest:
            ends.append(at)
            at = topic.find("/", at + 1)
        levels = len(ends) + 1 if len(ends) < deepest else deepest + 1  # enough to tell
        for depth in depths:
            if depth < levels:  # 'leading/#' under a deeper topic
                candidate = topic[:ends[depth - 1] + 1] + "#"
            elif depth == levels:  # 'topic/#' matches its parent level, the topic itself
                candidate = topic + "/#"
            else:
                continue
            value = tails.get(candidate)
            if value is not None:
                out.append((candidate, value))

    def _match(self, topic: str, out: list[tuple[str, V]]) -> None:
        levels = topic.split("/")
        root = self._root
        frontier: list[_Node[V]] = []
        # First level: '+' and '#' at the root never match '$' topics [MQTT-4.7.2-1].
        if topic[:1] != "$":
            node = root.hash
            if node is not None and node.value is not None:
                out.append((node.filter, node.value))
            node = root.plus
            if node is not None:
                frontier.append(node)
        children = root.children
        if children is not None:
            node = children.get(levels[0])
            if node is not None:
                frontier.append(node)
        # Each further level: follow '+', the literal level, and collect '#'.
        for i in range(1, len(levels)):
            if not frontier:
                return
            level = levels[i]
            following: list[_Node[V]] = []
            for parent in frontier:
                node = parent.hash
                if node is not None and node.value is not None:
                    out.append((node.filter, node.value))
                node = parent.plus
                if node is not None:
                    following.append(node)
                children = parent.children
                if children is not None:
                    node = children.get(level)
                    if node is not None:
                        following.append(node)
            frontier = following
        # Filters ending exactly at the topic's depth, and 'parent/#' matching 'parent'.
        for node in frontier:
            if node.value is not None:
                out.append((node.filter, node.value))
            hash_node = node.hash
            if hash_node is not None and hash_node.value is not None:
                out.append((hash_node.filter, hash_node.value))

    def items(self) -> list[tuple[str, V]]:
        """Every ``(filter, value)`` (a snapshot: safe to change the map while iterating)."""
        found = [*self._exact.items(), *self._tails.items()]
        stack: list[_Node[V]] = [self._root]
        while stack:
            node = stack.pop()
            if node.value is not None:
                found.append((node.filter, node.value))
            if node.children is not None:
                stack.extend(node.children.values())
            if node.plus is not None:
                stack.append(node.plus)
            if node.hash is not None:
                stack.append(node.hash)
        return found


class TopicTrie(Generic[K, V]):
    """Maps topic filters to {key: value} (a ``FilterMap`` of dicts). Matching cost depends
    on topic depth, not on the number of filters.

    Filters are stored literally (see the module docstring about shared
    subscriptions) and are expected to be valid. The dicts returned by ``get``
    and ``match`` are the trie's own: read them, never mutate them, and do not
    hold on to them across ``add``/``remove`` if you need a snapshot. Adding or
    removing a key of an existing filter changes that filter's dict in place, so
    ``match``'s cached results stay correct.
    """

    __slots__ = ("_map",)

    def __init__(self, cache_size: int = 256) -> None:
        self._map: FilterMap[dict[K, V]] = FilterMap(cache_size)

    def __len__(self) -> int:
        """Number of filters with entries."""
        return len(self._map)

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Store ``key: value`` under ``topic_filter`` (replacing ``key``'s old value).

        Returns True if the filter had no entries before.
        """
        entries = self._map.get(topic_filter)
        if entries is not None:
            entries[key] = value
            return False
        self._map.set(topic_filter, {key: value})
        return True

    def remove(self, topic_filter: str, key: K) -> bool:
        """Remove ``key`` from ``topic_filter``.

        Returns True if this removed the filter's last entry. Returns False if
        entries remain, or if the filter or key was not there.
        """
        entries = self._map.get(topic_filter)
        if entries is None or key not in entries:
            return False
        del entries[key]
        if entries:
            return False
        self._map.remove(topic_filter)
        return True

    def get(self, topic_filter: str) -> dict[K, V] | None:
        """The entries stored under exactly ``topic_filter`` (no wildcard matching), or None."""
        return self._map.get(topic_filter)

    def match(self, topic: str) -> list[tuple[str, dict[K, V]]]:
        """Every ``(filter, entries)`` whose filter matches ``topic`` (a valid topic name).

        Each matching filter appears once; the order is unspecified. The list is
        the caller's to keep or change (the dicts in it are not, see the class).
        """
        return self._map.match(topic)

    def filters(self) -> Iterator[str]:
        """All filters with entries (a snapshot: safe to change the trie while iterating)."""
        return iter([flt for flt, _ in self._map.items()])
