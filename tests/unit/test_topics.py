"""Tests for shardbroker.core.topics: validation rules, matching, and the TopicTrie.

The property tests compare the trie and ``matches`` against a deliberately
naive reference matcher written here, level by level, without regexes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from shardbroker.core.topics import (
    FilterMap,
    TopicTrie,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)
from shardbroker.protocol import reasons
from shardbroker.protocol.errors import ProtocolError

# --------------------------------------------------------------------------- reference


def reference_match(topic_filter: str, topic: str) -> bool:
    """Spec rules written out as plainly as possible (recursive, level by level)."""
    f = topic_filter.split("/")
    t = topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False

    def go(fi: int, ti: int) -> bool:
        if fi == len(f):
            return ti == len(t)
        if f[fi] == "#":
            return True  # matches the parent (ti == len(t)) and any number of children
        if ti == len(t):
            return False
        if f[fi] == "+":
            return go(fi + 1, ti + 1)
        return f[fi] == t[ti] and go(fi + 1, ti + 1)

    return go(0, 0)


# --------------------------------------------------------------------------- topic names


@pytest.mark.parametrize(
    "topic", ["a", "a/b", "/", "//", "/a", "a/", "$SYS/x", "ä/ß/€", "a b", "$share/g/a"]
)
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "MQTT-4.7.3-1"),
        ("a/+", "MQTT-3.3.2-2"),
        ("a/#", "MQTT-3.3.2-2"),
        ("+", "MQTT-3.3.2-2"),
        ("a+b", "MQTT-3.3.2-2"),
        ("a\x00b", "MQTT-4.7.3-2"),
        ("a" * 65536, "MQTT-4.7.3-3"),
        ("€" * 21846, "MQTT-4.7.3-3"),  # 65538 bytes in 21846 characters
    ],
)
def test_invalid_topic_names(topic: str, rule: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_topic_name(topic)
    assert info.value.reason == reasons.TOPIC_NAME_INVALID
    assert rule in info.value.message
    assert len(info.value.message) < 300  # long topics are abbreviated


def test_topic_name_length_limit_is_in_bytes() -> None:
    validate_topic_name("a" * 65535)
    validate_topic_name("€" * 21845)  # exactly 65535 bytes


# --------------------------------------------------------------------------- topic filters


@pytest.mark.parametrize(
    "topic_filter",
    [
        "a", "#", "+", "a/#", "a/+", "+/+", "+/#", "/#", "/+", "a//b", "a/+/b/#", "$SYS/#", "//",
        "$share/g/a", "$share/g/#", "$share/g/+/x", "$share/group-1/a/b/c", "$share/g/$SYS/#",
        "$share", "$sharex/+", "a/$share/b",
    ],
)  # fmt: skip
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "rule"),
    [
        ("", "MQTT-4.7.3-1"),
        ("a/#/b", "MQTT-4.7.1-1"),  # '#' not last
        ("#/a", "MQTT-4.7.1-1"),
        ("a#", "MQTT-4.7.1-1"),  # '#' not alone in its level
        ("a/b#", "MQTT-4.7.1-1"),
        ("##", "MQTT-4.7.1-1"),
        ("a+", "MQTT-4.7.1-2"),  # '+' not alone in its level
        ("a/+b/c", "MQTT-4.7.1-2"),
        ("++", "MQTT-4.7.1-2"),
        ("a\x00", "MQTT-4.7.3-2"),
        ("a" * 65536, "MQTT-4.7.3-3"),
        ("$share/", "MQTT-4.8.2-1"),  # empty group
        ("$share//a", "MQTT-4.8.2-1"),
        ("$share/g+/a", "MQTT-4.8.2-2"),  # wildcard in group
        ("$share/#/a", "MQTT-4.8.2-2"),
        ("$share/+/a", "MQTT-4.8.2-2"),
        ("$share/g", "MQTT-4.8.2-2"),  # no '/' after the group
        ("$share/g/", "MQTT-4.8.2-2"),  # empty filter after the group
        ("$share/g/a/#/b", "MQTT-4.7.1-1"),  # inner filter invalid
        ("$share/g/a+", "MQTT-4.7.1-2"),
    ],
)
def test_invalid_topic_filters(topic_filter: str, rule: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_topic_filter(topic_filter)
    assert info.value.reason == reasons.TOPIC_FILTER_INVALID
    assert rule in info.value.message


def test_parse_shared() -> None:
    assert parse_shared("$share/g/a/b") == ("g", "a/b")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("$share/g//") == ("g", "/")
    assert parse_shared("a/b") is None
    assert parse_shared("$share") is None
    assert parse_shared("$SYS/#") is None


# --------------------------------------------------------------------------- matching rules

MATCH_CASES = [
    # (filter, topic, expected)
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    # '#' matches the parent and all children [MQTT-4.7.1-1]
    ("a/#", "a", True),
    ("a/#", "a/b", True),
    ("a/#", "a/b/c", True),
    ("a/#", "a/", True),
    ("a/#", "b", False),
    ("a/#", "ab", False),
    ("#", "a", True),
    ("#", "/", True),
    ("#", "a/b/c", True),
    ("/#", "/a", True),
    ("/#", "a", False),
    # '+' matches exactly one level, including an empty one [MQTT-4.7.1-2]
    ("+", "a", True),
    ("+", "a/b", False),
    ("+", "/a", False),
    ("+/+", "/a", True),
    ("+/+", "a/", True),
    ("+/+", "/", True),
    ("a/+", "a/", True),
    ("a/+", "a", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a//c", True),
    ("a/+/c", "a/b/d", False),
    ("+/#", "a", True),
    ("+/#", "a/b/c", True),
    # empty levels are real levels
    ("a//b", "a//b", True),
    ("a//b", "a/b", False),
    ("a/b", "a//b", False),
    ("/a", "/a", True),
    ("/a", "a", False),
    # '$' topics and leading wildcards [MQTT-4.7.2-1]
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/+", "$SYS/x", True),
    ("$SYS/x", "$SYS/x", True),
    ("a/#", "a/$x", True),  # only the first character of the topic counts
    ("+/$x", "a/$x", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_CASES)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    assert reference_match(topic_filter, topic) is expected


@pytest.mark.parametrize("cache_size", [0, 256])
def test_trie_match_cases(cache_size: int) -> None:
    trie: TopicTrie[str, int] = TopicTrie(cache_size=cache_size)
    for i, (topic_filter, _, _) in enumerate(MATCH_CASES):
        trie.add(topic_filter, "k", i)
    for topic_filter, topic, expected in MATCH_CASES:
        for _ in range(2):  # second round may come from the cache
            found = dict(trie.match(topic))
            assert (topic_filter in found) is expected, (topic_filter, topic)


# --------------------------------------------------------------------------- TopicTrie basics


def test_trie_add_get_remove() -> None:
    trie: TopicTrie[str, int] = TopicTrie()
    assert len(trie) == 0
    assert trie.get("a/b") is None
    assert trie.add("a/b", "c1", 1) is True
    assert trie.add("a/b", "c2", 2) is False
    assert trie.add("a/b", "c1", 3) is False  # replaces the value
    assert trie.get("a/b") == {"c1": 3, "c2": 2}
    assert trie.get("a") is None  # intermediate node, no entries
    assert trie.get("a/+") is None
    assert len(trie) == 1
    assert trie.remove("a/b", "nope") is False
    assert trie.remove("x/y", "c1") is False
    assert trie.remove("a/b", "c1") is False
    assert trie.remove("a/b", "c2") is True
    assert trie.get("a/b") is None
    assert len(trie) == 0
    assert list(trie.filters()) == []
    assert trie.remove("a/b", "c2") is False


def test_trie_prunes_empty_nodes() -> None:
    trie: TopicTrie[str, None] = TopicTrie()
    trie.add("a/b/c/d", "k", None)
    trie.add("a/+/#", "k", None)
    trie.add("a", "k", None)
    for topic_filter in ("a/b/c/d", "a/+/#", "a"):
        assert trie.remove(topic_filter, "k") is True
    assert trie._map._root.is_empty()
    assert not trie._map._exact and not trie._map._tails


def test_trie_match_uses_live_entries_and_cache_is_invalidated() -> None:
    trie: TopicTrie[str, int] = TopicTrie()
    trie.add("a/+", "c1", 1)
    assert trie.match("a/b") == [("a/+", {"c1": 1})]
    trie.add("a/+", "c2", 2)  # same filter: cached result sees the change
    assert trie.match("a/b") == [("a/+", {"c1": 1, "c2": 2})]
    trie.add("#", "c3", 3)  # new filter: cache cleared
    assert sorted(f for f, _ in trie.match("a/b")) == ["#", "a/+"]
    trie.remove("a/+", "c1")
    trie.remove("a/+", "c2")
    assert trie.match("a/b") == [("#", {"c3": 3})]
    result = trie.match("a/b")
    result.clear()  # the caller's list; the cache is unaffected
    assert trie.match("a/b") == [("#", {"c3": 3})]


def test_trie_cache_is_bounded() -> None:
    trie: TopicTrie[int, int] = TopicTrie(cache_size=4)
    trie.add("#", 0, 0)
    for i in range(20):
        assert trie.match(f"t/{i}") == [("#", {0: 0})]
        assert len(trie._map._cache) <= 4


def test_filter_map_one_value_per_filter() -> None:
    fm: FilterMap[int] = FilterMap()
    assert fm.set("a/b", 1) is True  # literal: the dict
    assert fm.set("a/+", 2) is True  # a wildcard as the last level: the second dict
    assert fm.set("a/b", 3) is False  # replaced, not added
    assert len(fm) == 2
    assert sorted(fm.match("a/b")) == [("a/+", 2), ("a/b", 3)]
    assert fm.get("a/b") == 3 and fm.get("a/+") == 2 and fm.get("a/#") is None
    assert sorted(fm.items()) == [("a/+", 2), ("a/b", 3)]
    fm.set("a/b", 4)  # a new value, not changed in place: the cached match is stale
    fm.set("a/+", 5)
    assert sorted(fm.match("a/b")) == [("a/+", 5), ("a/b", 4)]
    assert fm.remove("a/b") == 4
    assert fm.remove("a/b") is None
    assert fm.match("a/b") == [("a/+", 5)]  # the cache was emptied by the removal
    assert fm.remove("a/+") == 5
    assert len(fm) == 0 and fm.match("a/b") == [] and fm._root.is_empty() and not fm._tails


def test_filter_map_keeps_trailing_wildcards_without_nodes() -> None:
    """``a/b/+`` and ``a/b/#`` cost a slot of a dict keyed by the caller's own string, not
    trie nodes; ``+/x``, ``a/+/c``, ``#`` and ``+`` still go to the trie."""
    fm: FilterMap[int] = FilterMap()
    device = 7
    plus, hash_ = f"dev/{device}/+", f"dev/{device}/#"  # strings made at run time, not constants
    fm.set(plus, 1)
    fm.set(hash_, 2)
    fm.set("/+", 3)  # one empty literal level, then '+'
    assert fm._root.is_empty()
    assert next(k for k in fm._tails if k == plus) is plus  # the key is the caller's string
    for flt in ("+/x", "a/+/c", "#", "+", "a/+/#"):
        fm.set(flt, 9)
    assert fm._wild == 5 and len(fm) == 8
    assert sorted(fm.match("dev/7/x")) == [("#", 9), ("dev/7/#", 2), ("dev/7/+", 1)]
    assert sorted(fm.match("dev/7")) == [("#", 9), ("dev/7/#", 2)]  # '#' matches its parent
    assert sorted(fm.match("dev/7/")) == [("#", 9), ("dev/7/#", 2), ("dev/7/+", 1)]
    assert sorted(fm.match("dev/7/x/y")) == [("#", 9), ("dev/7/#", 2)]
    assert sorted(fm.match("/q")) == [("#", 9), ("/+", 3)]
    assert fm.match("$dev/7/x") == []
    assert fm.remove(hash_) == 2 and fm.remove(hash_) is None and not fm._hash_depths
    assert fm.remove(plus) == 1 and fm.remove("/+") == 3 and fm._plus_tails == 0 and not fm._tails
    assert sorted(fm.match("dev/7/x")) == [("#", 9)]


def test_filter_map_shares_level_names() -> None:
    fm: FilterMap[int] = FilterMap()
    fm.set("device/+/state", 1)  # split at run time: new strings
    other: FilterMap[int] = FilterMap()
    other.set("device/+/#", 2)
    assert fm._root.children is not None and other._root.children is not None
    (a,) = fm._root.children
    (b,) = other._root.children
    assert a is b  # one interned string for the level in both maps


def test_dollar_topics_in_trie() -> None:
    trie: TopicTrie[str, None] = TopicTrie()
    for f in ("#", "+/x", "+/#", "$SYS/#", "$SYS/+", "+"):
        trie.add(f, "k", None)
    assert sorted(f for f, _ in trie.match("$SYS/x")) == ["$SYS/#", "$SYS/+"]
    assert sorted(f for f, _ in trie.match("$SYS")) == ["$SYS/#"]
    assert sorted(f for f, _ in trie.match("a/x")) == ["#", "+/#", "+/x"]


# --------------------------------------------------------------------------- properties

LEVELS = ["", "a", "b", "$x", "$SYS"]
FILTER_LEVELS = [*LEVELS, "+"]


@st.composite
def topics(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5))
    topic = "/".join(levels)
    return topic if topic else "/"  # the empty string is not a topic name


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(FILTER_LEVELS), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter if topic_filter else "#"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(topic_filters(), max_size=25),
    st.lists(topics(), min_size=1, max_size=10),
    st.sampled_from([0, 3]),
)
def test_trie_match_agrees_with_reference(
    filter_list: list[str], topic_list: list[str], cache_size: int
) -> None:
    trie: TopicTrie[int, int] = TopicTrie(cache_size=cache_size)
    for i, topic_filter in enumerate(filter_list):
        validate_topic_filter(topic_filter)
        trie.add(topic_filter, i, i)
    for topic in topic_list:
        validate_topic_name(topic)
        result = trie.match(topic)
        found = [f for f, _ in result]
        assert len(found) == len(set(found)), "a filter was reported twice"
        expected = {f for f in filter_list if reference_match(f, topic)}
        assert set(found) == expected, topic
        assert {f for f in set(filter_list) if matches(f, topic)} == expected
        for topic_filter, entries in result:
            assert entries == {i: i for i, f in enumerate(filter_list) if f == topic_filter}


class TrieModel(RuleBasedStateMachine):
    """Random add/remove/match sequences against a plain dict of dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.trie: TopicTrie[int, int] = TopicTrie(cache_size=4)
        self.model: dict[str, dict[int, int]] = {}

    stored = Bundle("stored")

    @rule(target=stored, topic_filter=topic_filters(), key=st.integers(0, 3), value=st.integers())
    def add(self, topic_filter: str, key: int, value: int) -> tuple[str, int]:
        was_new = topic_filter not in self.model
        assert self.trie.add(topic_filter, key, value) is was_new
        self.model.setdefault(topic_filter, {})[key] = value
        return topic_filter, key

    @rule(item=stored)
    def remove_stored(self, item: tuple[str, int]) -> None:
        self._remove(*item)

    @rule(topic_filter=topic_filters(), key=st.integers(0, 3))
    def remove_any(self, topic_filter: str, key: int) -> None:
        self._remove(topic_filter, key)

    def _remove(self, topic_filter: str, key: int) -> None:
        entries = self.model.get(topic_filter)
        emptied = entries is not None and key in entries and len(entries) == 1
        assert self.trie.remove(topic_filter, key) is emptied
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self.model[topic_filter]

    @rule(topic=topics())
    def match(self, topic: str) -> None:
        got = {f: dict(e) for f, e in self.trie.match(topic)}
        assert got == {f: e for f, e in self.model.items() if reference_match(f, topic)}

    @rule(topic_filter=topic_filters())
    def get(self, topic_filter: str) -> None:
        assert self.trie.get(topic_filter) == self.model.get(topic_filter)

    @invariant()
    def consistent(self) -> None:
        assert len(self.trie) == len(self.model)
        assert sorted(self.trie.filters()) == sorted(self.model)
        for topic_filter, entries in self.model.items():
            assert self.trie.get(topic_filter) == entries

    def teardown(self) -> None:
        for topic_filter, entries in list(self.model.items()):
            for key in list(entries):
                self._remove(topic_filter, key)
        assert self.trie._map._root.is_empty()
        assert not self.trie._map._exact and not self.trie._map._tails
        assert self.trie._map._plus_tails == 0 and not self.trie._map._hash_depths


TrieModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_trie_model = TrieModel.TestCase
