"""The route table against a plain model: which shards want which keys, and what a publish
to a topic must reach (no loop, no sockets)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shardbroker.core.routing import RouteTable
from shardbroker.core.session import Subscribed, subscribed
from shardbroker.core.subscriptions import PlainIndex
from shardbroker.core.topics import matches, parse_shared

KEYS = ["a/b", "a/+", "a/#", "#", "+/b", "x", "$share/g/a/b", "$share/g/a/+", "$share/h/a/b"]
TOPICS = ["a/b", "a/c", "x", "a", "y/b"]
SHARD_IDS = (0, 1, 2, 3, 5, 6, 256, 513, 65535)  # 256 and up: workers of other nodes
SHARDS = st.sampled_from(SHARD_IDS)  # past four slots the masks are no longer small ints


def test_add_remove_and_durable_flag() -> None:
    rt = RouteTable()
    assert rt.add(0, "a/+") is True
    assert rt.add(0, "a/+") is False  # no change
    assert rt.add(0, "a/+", True) is True  # the durable flag changed
    assert rt.add(5, "a/b") is True
    assert rt.keys(0) == {"a/+": True} and rt.keys(5) == {"a/b": False}
    t = rt.targets("a/b")
    assert sorted(t) == [0, 5] and t[0].durable and not t[5].durable
    assert rt.remove(0, "a/b") is False  # shard 0 does not have it
    assert rt.remove(0, "a/+") is True and rt.remove(0, "a/+") is False
    assert sorted(rt.targets("a/b")) == [5]
    rt.replace(5, {"x": True})
    assert rt.keys(5) == {"x": True} and rt.targets("a/b") == {}


class RouteModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rt = RouteTable()
        self.model: dict[int, dict[str, bool]] = {}

    @rule(shard=SHARDS, key=st.sampled_from(KEYS), durable=st.booleans())
    def add(self, shard: int, key: str, durable: bool) -> None:
        keys = self.model.setdefault(shard, {})
        changed = keys.get(key) is not durable
        assert self.rt.add(shard, key, durable) is changed
        keys[key] = durable

    @rule(shard=SHARDS, key=st.sampled_from(KEYS))
    def remove(self, shard: int, key: str) -> None:
        keys = self.model.setdefault(shard, {})
        assert self.rt.remove(shard, key) is (key in keys)
        keys.pop(key, None)

    @rule(shard=SHARDS, keys=st.dictionaries(st.sampled_from(KEYS), st.booleans()))
    def replace(self, shard: int, keys: dict[str, bool]) -> None:
        self.rt.replace(shard, keys)
        self.model[shard] = dict(keys)

    @invariant()
    def same(self) -> None:
        for shard in SHARD_IDS:
            assert self.rt.keys(shard) == self.model.get(shard, {})
            fresh = RouteTable()  # the digest depends on the keys alone, not on their history
            fresh.replace(shard, self.model.get(shard, {}))
            assert self.rt.digest(shard) == fresh.digest(shard)
        for topic in TOPICS:
            targets = self.rt.targets(topic)
            plain = {s for s, keys in self.model.items()
                     if any(parse_shared(k) is None and matches(k, topic) for k in keys)}
            assert {s for s, t in targets.items() if t.non_shared} == plain
            for s in plain:
                durable = any(d for k, d in self.model[s].items()
                              if parse_shared(k) is None and matches(k, topic))
                assert targets[s].durable is durable or (targets[s].groups and targets[s].durable)
            for group, flt in {parse_shared(k) for keys in self.model.values() for k in keys} - {None}:
                assert self.rt.shards_for_group(group, flt) == sorted(
                    s for s, keys in self.model.items() if f"$share/{group}/{flt}" in keys)


RouteModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_route_model = RouteModel.TestCase


def test_plain_index_one_subscriber_then_many_then_one() -> None:
    sessions: dict[tuple[str, str], Subscribed] = {}  # (client ID, filter) -> options, as the sessions hold them
    idx = PlainIndex(lambda cid, flt: sessions.get((cid, flt)))
    flt = "a/+"
    sessions["a", flt] = subscribed(1)
    idx.add(flt, "a", sessions["a", flt])
    assert idx.count(flt) == 1 and idx.match("a/b") == [(flt, "a")]  # the client ID alone
    sessions["a", flt] = subscribed(2)
    idx.add(flt, "a", sessions["a", flt])  # new options of the same client's subscription: its session has them
    assert idx.count(flt) == 1 and idx.match("a/b") == [(flt, "a")]
    b = sessions["b", flt] = subscribed(0, no_local=True)
    idx.add(flt, "b", b)
    assert idx.count(flt) == 2 and idx.match("a/b") == [(flt, {"a": subscribed(2), "b": b})]
    idx.remove(flt, "nobody")
    idx.remove(flt, "a")
    assert idx.count(flt) == 1 and idx.match("a/b") == [(flt, "b")]
    idx.remove(flt, "a")  # not there any more: nothing changes
    assert idx.count(flt) == 1
    idx.remove(flt, "b")
    assert idx.count(flt) == 0 and idx.match("a/b") == [] and len(idx) == 0 and idx.filters() == []


def test_subscriptions_with_the_same_options_share_one_object() -> None:
    assert subscribed(1) is subscribed(1, False, False, 0) and subscribed(1) == Subscribed(1)
    assert subscribed(1) is not subscribed(2) and subscribed(1) is not subscribed(1, no_local=True)
    assert subscribed(1, subscription_id=7) is not subscribed(1, subscription_id=7)  # identifiers are many
    assert subscribed(1, subscription_id=7) == Subscribed(1, subscription_id=7)


def test_size_counts_distinct_filters() -> None:
    rt = RouteTable()
    assert rt.size() == 0
    rt.add(0, "a/b")
    rt.add(1, "a/b", durable=True)  # the same filter for another shard: one entry
    rt.add(0, "a/+")
    rt.add(1, "$share/g/x/#")
    rt.add(2, "$share/h/x/#")  # another group, the same filter
    assert rt.size() == 3
    rt.remove(0, "a/b")
    assert rt.size() == 3
    rt.remove(1, "a/b")
    assert rt.size() == 2


def test_workers_of_other_nodes_take_dense_slots() -> None:
    """Peer ids of other nodes' workers (256 and up) are slots 0, 1, 2 ... in the masks: a
    route they hold costs what a local one does, and every query names them by peer id."""
    table = RouteTable()
    table.add(0, "a/#")
    table.add(0x1FF01, "a/b", durable=True)  # any int names a shard here
    table.add(513, "a/#", durable=True)
    table.add(65535, "c")
    assert max(mask.bit_length() for _key, mask in table._plain.items()) <= 2 * 4
    targets = table.targets("a/b")
    assert {s: t.durable for s, t in targets.items()} == {0: False, 0x1FF01: True, 513: True}
    assert table.keys(513) == {"a/#": True} and table.keys(65535) == {"c": False}
    assert table.holders()["a/#"] == {0: False, 513: True}
    assert table.remove(513, "a/#") and not table.remove(513, "a/#") and not table.remove(7, "c")
    table.replace(65535, {})
    assert table.keys(65535) == {} and set(table.targets("a/x")) == {0}
    assert table.digest(65535) == 0 and table.digest(0) != 0
    other = RouteTable()
    other.add(9, "a/#", durable=True)
    assert other.digest(9) != table.digest(0)  # the durable flag counts
