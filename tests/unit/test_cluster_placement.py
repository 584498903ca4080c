"""The cluster's pure parts: virtual shards, rendezvous placement, the shard map, the fence."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardbroker.cluster.fence import Fence, NotOwner, Stamp, Verdict
from shardbroker.cluster.placement import Slot, place, place_with_backups, slots_of, vshard_for
from shardbroker.cluster.shardmap import MapFormatError, ShardMap, VShard, next_map
from shardbroker.sharding import shard_for

COUNT = 1024
LEASES = {n: 100 + i for i, n in enumerate("abcdefgh")}  # each node's lease (incarnation)


def test_vshard_is_the_stable_client_id_hash() -> None:
    # pinned: a change of hash would move every client of every cluster
    assert [vshard_for(c, COUNT) for c in ("a", "client-1", "sensor/ü")] == [
        shard_for(c, COUNT) for c in ("a", "client-1", "sensor/ü")]
    assert vshard_for("client-1", COUNT) == vshard_for("client-1", COUNT)
    assert {vshard_for(f"c{i}", COUNT) for i in range(20000)} == set(range(COUNT))


def test_pinned_values() -> None:
    """Written down once: another hash or score would move clients between nodes on upgrade."""
    assert (vshard_for("a", 1024), vshard_for("client-1", 1024)) == (559, 222)
    n1, n2 = Slot("n1", 0), Slot("n2", 0)
    assert place(4, [n1, n2]) == place(4, [n2, n1]) == [n2, n2, n2, n1]


def test_placement_is_stable_and_ignores_slot_order() -> None:
    slots = slots_of({"a": 2, "b": 2, "c": 2})
    assert place(COUNT, slots) == place(COUNT, list(reversed(slots)))
    assert set(place(COUNT, slots)) == set(slots)
    assert place(8, []) == [None] * 8


def test_shares_are_about_even() -> None:
    counts: dict[Slot | None, int] = {}
    for s in place(COUNT, slots_of({"a": 2, "b": 2, "c": 2, "d": 2})):
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 8
    mean = COUNT / 8
    assert all(abs(n - mean) < 4 * math.sqrt(mean) for n in counts.values()), counts


@pytest.mark.parametrize("nodes", [2, 3, 5, 8])
def test_adding_a_node_moves_about_one_in_n_plus_one_all_to_it(nodes: int) -> None:
    before = place(COUNT, slots_of({f"n{i}": 1 for i in range(nodes)}))
    after = place(COUNT, slots_of({f"n{i}": 1 for i in range(nodes + 1)}))
    moved = [v for v in range(COUNT) if before[v] != after[v]]
    assert all(after[v] == Slot(f"n{nodes}", 0) for v in moved)
    expected = COUNT / (nodes + 1)
    assert abs(len(moved) - expected) < 4 * math.sqrt(expected), (len(moved), expected)


def test_draining_moves_only_the_drained_nodes_shards() -> None:
    workers = {"a": 2, "b": 2, "c": 2}
    before = place(COUNT, slots_of(workers))
    after = place(COUNT, slots_of(workers, excluded={"b"}))
    assert all(s is not None and s.node != "b" for s in after)
    for v in range(COUNT):
        assert (before[v] == after[v]) == (before[v] is not None and before[v].node != "b")  # type: ignore[union-attr]
    moved = sum(1 for v in range(COUNT) if before[v] != after[v])
    assert abs(moved - COUNT / 3) < 4 * math.sqrt(COUNT / 3)


def test_more_workers_on_one_node_move_shards_only_among_its_workers_and_to_it() -> None:
    before = place(COUNT, slots_of({"a": 1, "b": 1}))
    after = place(COUNT, slots_of({"a": 2, "b": 1}))
    assert all(after[v] == Slot("a", 1) for v in range(COUNT) if before[v] != after[v])


# ------------------------------------------------------------------------ the map


def test_first_map_is_version_1_with_epoch_1() -> None:
    m = next_map(None, place(16, slots_of({"a": 1})), LEASES)
    assert m is not None and m.version == 1 and {v.epoch for v in m.vshards} == {1}
    assert next_map(m, place(16, slots_of({"a": 1})), LEASES) is None  # nothing changes: no write


def test_epochs_change_only_with_the_owner_and_only_increase() -> None:
    m1 = next_map(None, place(COUNT, slots_of({"a": 1, "b": 1})), LEASES)
    m2 = next_map(m1, place(COUNT, slots_of({"a": 1, "b": 1, "c": 1})), LEASES)
    assert m1 is not None and m2 is not None and m2.version == 2
    for old, new in zip(m1.vshards, m2.vshards):
        assert new.epoch == (old.epoch if old.slot == new.slot else 2)
    m3 = next_map(m2, place(COUNT, slots_of({"a": 1, "b": 1})), LEASES)
    assert m3 is not None
    assert all(n.epoch >= o.epoch for o, n in zip(m2.vshards, m3.vshards))
    # the shards c had come back at epoch 3: the epoch-1 owner's frames stay stale
    assert {v.epoch for v, o in zip(m3.vshards, m2.vshards) if o.slot == Slot("c", 0)} == {3}


def test_a_node_under_a_new_lease_gets_new_epochs_for_all_its_shards() -> None:
    m1 = next_map(None, place(COUNT, slots_of({"a": 1, "b": 1})), LEASES)
    assert m1 is not None and m1.lease_of("a") == LEASES["a"] and m1.lease_of("z") == 0
    restarted = {**LEASES, "b": 999}
    m2 = next_map(m1, place(COUNT, slots_of({"a": 1, "b": 1})), restarted)
    assert m2 is not None and m2.lease_of("b") == 999
    for old, new in zip(m1.vshards, m2.vshards):
        assert old.slot == new.slot
        assert new.epoch == (2 if new.slot == Slot("b", 0) else 1)
    assert next_map(m2, place(COUNT, slots_of({"a": 1, "b": 1})), restarted) is None
    # the fence of b's earlier run serves nothing under the new map
    before, after = Fence("b", LEASES["b"]), Fence("b", 999)
    for fence in (before, after):
        fence.apply(m2)
        fence.renewed(10.0)
    assert before.served(0.0) == [] and len(after.served(0.0)) == m2.per_node()["b"]


def test_map_round_trips_and_refuses_garbage() -> None:
    m = ShardMap(7, (VShard(Slot("a", 0), 3), VShard(None, 5), VShard(Slot("b", 1), 7)),
                 (("a", 2**63 - 1), ("b", 1)))
    assert ShardMap.decode(m.encode()) == m
    for junk in (b"", b"{}", b"[1]", b'{"version": 1, "owners": [[1]], "leases": {}}',
                 b'{"version": 1, "owners": [null], "leases": {}}',
                 b'{"version": 1, "owners": [], "leases": []}'):
        with pytest.raises(MapFormatError):
            ShardMap.decode(junk)


@given(st.lists(st.sets(st.sampled_from("abcdef"), min_size=0, max_size=6), min_size=1,
                max_size=8))
def test_epochs_never_decrease_over_any_sequence_of_memberships(
        memberships: list[set[str]]) -> None:
    current: ShardMap | None = None
    for members in memberships:
        new = next_map(current, place(64, slots_of({n: 1 for n in members})), LEASES)
        if new is None:
            continue
        if current is not None:
            assert new.version == current.version + 1
            assert all(n.epoch >= o.epoch for o, n in zip(current.vshards, new.vshards))
        current = new


# ------------------------------------------------------------------------ the fence


def _maps() -> tuple[ShardMap, ShardMap]:
    m1 = next_map(None, place(COUNT, slots_of({"a": 1, "b": 1})), LEASES)
    m2 = next_map(m1, place(COUNT, slots_of({"b": 1})), LEASES)  # a drained
    assert m1 is not None and m2 is not None
    return m1, m2


def test_serves_only_its_shards_while_the_lease_is_alive() -> None:
    m1, _ = _maps()
    fence = Fence("a", LEASES["a"])
    assert not fence.may_serve(0, 0.0)  # no map yet
    fence.apply(m1)
    mine = [v for v in range(COUNT) if m1.vshards[v].slot == Slot("a", 0)]
    assert fence.served(0.0) == []  # no lease yet
    fence.renewed(10.0)
    assert fence.served(9.9) == mine and fence.served(10.0) == []
    assert not fence.may_serve(COUNT, 5.0) and not fence.may_serve(-1, 5.0)
    fence.lost()
    assert fence.served(0.0) == []


def test_a_moved_shard_is_no_longer_served_and_its_old_stamps_are_refused() -> None:
    m1, m2 = _maps()
    a, b = Fence("a", LEASES["a"]), Fence("b", LEASES["b"])
    for f in (a, b):
        f.apply(m1)
        f.renewed(100.0)
    v = next(v for v in range(COUNT) if m1.vshards[v].slot == Slot("a", 0))
    old = a.stamp(v, 1.0)
    assert old == Stamp(v, m1.vshards[v].epoch) and b.check(old) is Verdict.CURRENT
    with pytest.raises(NotOwner):
        b.stamp(v, 1.0)
    b.apply(m2)  # b reads the new map first: a's frames are stale from now on
    assert b.check(old) is Verdict.STALE
    new = b.stamp(v, 1.0)
    assert new.epoch == 2 and a.check(new) is Verdict.AHEAD  # a has not read m2 yet
    a.apply(m2)
    assert not a.may_serve(v, 1.0) and a.check(new) is Verdict.CURRENT
    assert a.check(old) is Verdict.STALE


def test_an_older_map_is_not_applied() -> None:
    m1, m2 = _maps()
    fence = Fence("b", LEASES["b"])
    assert fence.apply(m2) and not fence.apply(m1) and not fence.apply(m2)
    assert fence.map is m2
    assert Fence("x", 1).check(Stamp(0, 1)) is Verdict.AHEAD  # no map: nothing is current
    fence.renewed(1.0)
    assert fence.check(Stamp(COUNT, 1)) is Verdict.STALE


def test_a_backup_is_on_another_node_and_is_where_the_shard_goes_when_its_owner_leaves() -> None:
    workers = {"a": 2, "b": 1, "c": 3}
    owners, backups = place_with_backups(COUNT, slots_of(workers))
    assert owners == place(COUNT, slots_of(workers))
    for node in workers:
        without = place(COUNT, slots_of(workers, excluded=[node]))
        for v, owner in enumerate(owners):
            backup = backups[v]
            assert owner is not None and backup is not None and backup.node != owner.node
            if owner.node == node:
                assert without[v] == backup  # the successor is the backup
    # one node: no backup
    assert place_with_backups(8, slots_of({"a": 3}))[1] == [None] * 8
    assert place_with_backups(4, []) == ([None] * 4, [None] * 4)


def test_a_map_carries_backups_and_a_backup_change_keeps_the_epoch() -> None:
    owners, backups = place_with_backups(64, slots_of({"a": 1, "b": 1, "c": 1}))
    m1 = next_map(None, owners, LEASES, backups)
    assert m1 is not None and [v.backup for v in m1.vshards] == backups
    assert ShardMap.decode(m1.encode()) == m1
    assert next_map(m1, owners, LEASES, backups) is None
    other = [None if b is None else Slot(b.node, b.worker + 1) for b in backups]
    m2 = next_map(m1, owners, LEASES, other)
    assert m2 is not None and m2.version == 2
    assert [v.epoch for v in m2.vshards] == [v.epoch for v in m1.vshards]
    # a map written before backups reads as one without them
    old = ShardMap(3, (VShard(Slot("a", 0), 3),), (("a", 1),))
    assert ShardMap.decode(old.encode()).vshards[0].backup is None
    with pytest.raises(MapFormatError):
        ShardMap.decode(b'{"version": 1, "owners": [["a", 0, 1, "b"]], "leases": {"a": 1}}')
