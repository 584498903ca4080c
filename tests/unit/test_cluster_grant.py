"""What a node's supervisor tells its children (``cluster/grant.py``): the virtual shards the
fence lets it serve, on which local worker, until the lease deadline; and the node's own
table of virtual shard -> worker, which the map agrees with whatever other nodes there are; and
what the bus between nodes reads in it: this node's number, the other numbered nodes, and each
virtual shard's peer id."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from shardbroker.cluster.fence import Fence
from shardbroker.cluster.grant import NONE, Grant, GrantError, from_fence, local_owners, moved_in
from shardbroker.cluster.membership import NodeInfo
from shardbroker.cluster.node import ClusterNode, served_changes
from shardbroker.cluster.numbers import Identity
from shardbroker.cluster.placement import Slot, place, place_with_backups, slots_of, vshard_for
from shardbroker.cluster.shardmap import ShardMap, next_map
from shardbroker.config import load_config

COUNT = 1024


def two_nodes(lease1: int = 11, lease2: int = 22):  # type: ignore[no-untyped-def]
    placement = place(COUNT, slots_of({"n1": 2, "n2": 3}))
    shard_map = next_map(None, placement, {"n1": lease1, "n2": lease2})
    assert shard_map is not None
    return placement, shard_map


def test_a_grant_is_what_the_fence_lets_this_node_serve() -> None:
    placement, shard_map = two_nodes()
    fence = Fence("n1", 11)
    fence.apply(shard_map)
    fence.renewed(100.0)
    grant = from_fence(fence, 7, 2, now=50.0)
    assert (grant.seq, grant.version, grant.lease, grant.until) == (7, 1, 11, 100.0)
    for v, slot in enumerate(placement):
        assert slot is not None
        want = slot.worker if slot.node == "n1" else -1
        assert grant.owners[v] == want
        assert grant.epochs[v] == (1 if want >= 0 else 0)
    mine = [v for v, s in enumerate(placement) if s == Slot("n1", 1)]
    assert grant.served_by(1) == mine
    cid = next(c for c in (f"c{i}" for i in range(10_000))
               if placement[vshard_for(c, COUNT)] == Slot("n1", 0))
    assert grant.owner(cid, 99.9) == 0
    assert grant.owner(cid, 100.0) == -1  # the deadline passed


def test_no_grant_without_a_live_lease_or_under_another_lease() -> None:
    _placement, shard_map = two_nodes()
    fence = Fence("n1", 11)
    assert from_fence(fence, 1, 2, now=0.0).owners == ()  # no map yet
    fence.apply(shard_map)
    fence.renewed(10.0)
    assert from_fence(fence, 2, 2, now=10.0).owners == ()  # deadline reached
    fence.renewed(20.0)
    fence.lost()
    assert from_fence(fence, 3, 2, now=11.0).owners == ()
    restarted = Fence("n1", 12)  # the same node under a new lease: the old map does not do
    restarted.apply(shard_map)
    restarted.renewed(20.0)
    assert set(from_fence(restarted, 1, 2, now=0.0).owners) == {-1}


def test_a_grant_travels_as_plain_data() -> None:
    _placement, shard_map = two_nodes()
    fence = Fence("n2", 22)
    fence.apply(shard_map)
    fence.renewed(5.5)
    grant = from_fence(fence, 3, 3, now=1.0)
    assert Grant.from_value(grant.to_value()) == grant
    assert Grant.from_value(NONE.to_value()) == NONE and NONE.until == -math.inf
    assert set(grant.without({0, 2}).owners) == {-1, 1}  # for the acceptor: worker 1 took it
    for bad in (None, [], {"seq": 1}, {**grant.to_value(), "epochs": [1]},
                {**grant.to_value(), "owners": ["x"]}):
        with pytest.raises(GrantError):
            Grant.from_value(bad)


def test_local_owners_agree_with_the_map_whatever_the_other_nodes() -> None:
    """Rendezvous hashing: a virtual shard the map gives a node is on the node's best slot, so
    the table that places the node's stores holds with one node, three, or after a drain."""
    table = local_owners("n1", 3, COUNT)
    assert set(table) == {0, 1, 2}
    for workers in ({"n1": 3}, {"n1": 3, "n2": 2}, {"n1": 3, "n2": 2, "n3": 4}):
        for v, slot in enumerate(place(COUNT, slots_of(workers))):
            if slot is not None and slot.node == "n1":
                assert slot.worker == table[v]


def test_shards_taken_from_a_live_node_wait_until_it_has_applied_the_map() -> None:
    """Epochs: n2 joins at version 2; the shards it takes have epoch 2, and another node that
    has applied version 1 only may still serve them."""
    first = next_map(None, place(COUNT, slots_of({"n1": 1})), {"n1": 11})
    assert first is not None
    second = next_map(first, place(COUNT, slots_of({"n1": 1, "n2": 1})), {"n1": 11, "n2": 22})
    assert second is not None and second.version == 2
    fence = Fence("n2", 22)
    fence.apply(second)
    fence.renewed(100.0)
    taken = [v for v, s in enumerate(second.vshards) if s.slot == Slot("n2", 0)]
    assert taken and all(second.vshards[v].epoch == 2 for v in taken)
    assert set(from_fence(fence, 1, 1, now=0.0, cleared=1).owners) == {-1}
    owners = from_fence(fence, 2, 1, now=0.0, cleared=2).owners
    assert [v for v, w in enumerate(owners) if w == 0] == taken
    # n1 keeps what it had (epoch 1) once the others have applied version 1 or later
    keeper = Fence("n1", 11)
    keeper.apply(second)
    keeper.renewed(100.0)
    kept = from_fence(keeper, 1, 1, now=0.0, cleared=1).owners
    assert [v for v, w in enumerate(kept) if w == 0] == [
        v for v, s in enumerate(second.vshards) if s.slot == Slot("n1", 0)]


def test_shards_taken_from_a_node_that_is_gone_are_not_held_back() -> None:
    """n2's lease ended: the shards it had go to n1 at version 2, and nobody can still serve
    them, so n1 does not wait for the other live nodes (n3) to apply the map."""
    first = next_map(None, place(COUNT, slots_of({"n1": 1, "n2": 1, "n3": 1})),
                     {"n1": 11, "n2": 22, "n3": 33})
    second = next_map(first, place(COUNT, slots_of({"n1": 1, "n3": 1})), {"n1": 11, "n3": 33})
    assert first is not None and second is not None
    fence = Fence("n1", 11)
    fence.apply(second)
    fence.renewed(100.0)
    incoming = moved_in("n1", first, second, {})
    taken = sorted(incoming)
    assert taken and all(node == "n2" for _e, node, _w in incoming.values())
    n3 = NodeInfo("n3", "127.0.0.4:7000", 1, number=3, key="k")
    n2 = NodeInfo("n2", "127.0.0.3:7000", 1, number=2, key="k")
    gone = from_fence(fence, 1, 1, now=0.0, cleared=1, nodes={"n3": n3}, incoming=incoming)
    assert all(gone.owners[v] == 0 for v in taken)
    # while n2 is still registered (a live handover), they wait as before
    live = from_fence(fence, 2, 1, now=0.0, cleared=1, nodes={"n2": n2, "n3": n3}, incoming=incoming)
    assert all(live.owners[v] == -1 for v in taken)


def test_served_changes_name_the_shards_started_and_stopped_with_their_epochs() -> None:
    def grant(owners: dict[int, tuple[int, int]]) -> Grant:  # vshard -> (worker, epoch)
        return Grant(1, 1, 11, 100.0, tuple(owners.get(v, (-1, 0))[0] for v in range(4)),
                     tuple(owners.get(v, (-1, 0))[1] for v in range(4)))

    first = grant({0: (0, 1), 2: (1, 1)})
    assert served_changes(NONE, first) == ("0@1 2@1", "")
    # the same shard under a new epoch is a stop and a start; a worker change alone is neither
    second = grant({0: (1, 1), 2: (1, 5), 3: (0, 5)})
    assert served_changes(first, second) == ("2@5 3@5", "2@1")
    assert served_changes(second, NONE) == ("", "0@1 2@5 3@5")
    assert served_changes(second, second) == ("", "")


def three_nodes() -> tuple[list[Slot | None], ShardMap, dict[str, NodeInfo]]:
    """n1 (2 workers, number 3), n2 (3 workers, number 7), n3 (1 worker, no number yet), and
    the map over them; ``nodes`` as a node reads them from etcd (itself included)."""
    placement = place(COUNT, slots_of({"n1": 2, "n2": 3, "n3": 1}))
    shard_map = next_map(None, placement, {"n1": 11, "n2": 22, "n3": 33})
    assert shard_map is not None
    nodes = {"n1": NodeInfo("n1", "10.0.0.1:7100", 2, number=3, key="K1"),
             "n2": NodeInfo("n2", "10.0.0.2:7200", 3, number=7, key="K2"),
             "n3": NodeInfo("n3", "10.0.0.3:7100", 1, key="K3")}
    return placement, shard_map, nodes


def test_the_grant_names_the_numbered_nodes_and_each_shards_peer_id() -> None:
    placement, shard_map, nodes = three_nodes()
    leases = {"n1": 11, "n2": 22, "n3": 33}
    fence = Fence("n1", 11)
    fence.apply(shard_map)
    fence.renewed(100.0)
    grant = from_fence(fence, 1, 2, now=0.0, nodes=nodes, leases=leases, number=3)
    assert grant.number == 3
    # the other nodes that have a number, by node ID; n3 has none yet, n1 is this node
    assert grant.nodes == (("n2", 7, 22, "10.0.0.2:7200", 3, "K2"),)
    want = [-1 if s is None or s.node == "n3" else s.worker if s.node == "n1" else 7 * 256 + s.worker
            for s in placement]
    assert list(grant.peer_of) == want
    assert {p for p in want if p >= 256} == {7 * 256, 7 * 256 + 1, 7 * 256 + 2}
    assert -1 in want and 0 in want and 1 in want
    # held back (another node has not applied the map yet): served by nobody here, but the
    # map gives the shards to this node's workers all the same
    held = from_fence(fence, 2, 2, now=0.0, cleared=0, nodes=nodes, leases=leases, number=3)
    assert set(held.owners) == {-1} and held.peer_of == grant.peer_of
    # the same with the lease gone: nothing served, the map's peer ids still said
    after = from_fence(fence, 3, 2, now=100.0, nodes=nodes, leases=leases, number=3)
    assert after.owners == () and after.peer_of == grant.peer_of and after.nodes == grant.nodes
    # no map: no peer ids
    assert from_fence(Fence("n1", 11), 4, 2, now=0.0, nodes=nodes, number=3).peer_of == ()


def test_the_bus_fields_travel_and_old_grants_parse_without_them() -> None:
    _placement, shard_map, nodes = three_nodes()
    fence = Fence("n2", 22)
    fence.apply(shard_map)
    fence.renewed(100.0)
    grant = from_fence(fence, 5, 3, now=0.0, nodes=nodes, leases={"n1": 11}, number=7)
    assert grant.nodes == (("n1", 3, 11, "10.0.0.1:7100", 2, "K1"),)
    assert Grant.from_value(grant.to_value()) == grant
    old = {k: v for k, v in grant.to_value().items() if k not in ("number", "nodes", "peer_of")}
    parsed = Grant.from_value(old)
    assert (parsed.number, parsed.nodes, parsed.peer_of) == (0, (), ())
    assert parsed.owners == grant.owners
    for bad in ({"number": 256}, {"peer_of": [70_000] * COUNT}, {"nodes": [["n1", 3]]},
                {"peer_of": ["x"]}, {"peer_of": [0, 1]}):
        with pytest.raises(GrantError):
            Grant.from_value({**grant.to_value(), **bad})


def test_a_change_of_the_bus_fields_is_news_to_the_children(tmp_path: Path) -> None:
    _placement, shard_map, nodes = three_nodes()
    config = load_config(None, {"cluster.node_id": "n1", "cluster.etcd_endpoints": ["http://127.0.0.1:9"],
                                "cluster.advertise": "127.0.0.1:7100"}).cluster
    sent: list[Grant] = []

    def publish(grant: Grant) -> bool:
        sent.append(grant)
        return True

    node = ClusterNode(config, 2, publish, tmp_path, Identity("n1", "P" * 40, "S" * 40, 3),
                       clock=lambda: 0.0)
    try:
        node.fence = Fence("n1", 11)
        node.fence.apply(shard_map)
        node.fence.renewed(100.0)
        node._send(force=False)
        node._send(force=False)
        assert len(sent) == 1 and sent[0].nodes == () and set(sent[0].peer_of) >= {0, 1, -1}
        node.number = 3  # claimed
        node._send(force=False)
        assert len(sent) == 2 and sent[1].number == 3
        node._nodes = {"n2": nodes["n2"]}  # n2 registered (with its number)
        node._leases = {"n2": 22}
        node._send(force=False)
        assert len(sent) == 3 and sent[2].nodes == (("n2", 7, 22, "10.0.0.2:7200", 3, "K2"),)
        assert sent[2].owners == sent[1].owners and sent[2].peer_of != sent[1].peer_of
        node._nodes = {"n2": replace(nodes["n2"], key="K2b")}  # a new key alone
        node._send(force=False)
        assert len(sent) == 4 and sent[3].nodes[0][5] == "K2b"
        node._send(force=False)
        assert len(sent) == 4
    finally:
        node.etcd.close()
        node._lease_etcd.close()


def test_a_joining_node_names_each_shard_it_takes_with_its_previous_owner() -> None:
    """n2 joins n1 (2 workers): every shard the new map gives n2 is incoming from the n1
    worker that held it; the grant carries that worker's peer id while n1 is registered,
    and nothing once it is not (nobody will send the sessions)."""
    first = next_map(None, place(COUNT, slots_of({"n1": 2})), {"n1": 11})
    assert first is not None
    second = next_map(first, place(COUNT, slots_of({"n1": 2, "n2": 1})), {"n1": 11, "n2": 22})
    assert second is not None
    incoming = moved_in("n2", first, second, {})
    taken = [v for v, s in enumerate(second.vshards) if s.slot is not None and s.slot.node == "n2"]
    assert taken and sorted(incoming) == taken
    for v in taken:
        old = first.vshards[v].slot
        assert old is not None and incoming[v] == (second.vshards[v].epoch, "n1", old.worker)
    assert moved_in("n1", first, second, {}) == {}  # n1 only loses shards
    # a node whose first map this is knows them too: the map names each shard's previous owner
    assert moved_in("n2", None, second, {}) == incoming
    assert all(second.vshards[v].prev == first.vshards[v].slot for v in taken)
    # a map written before it named them: nothing known to wait for
    plain = replace(second, vshards=tuple(replace(vs, prev=None) for vs in second.vshards))
    assert moved_in("n2", None, plain, {}) == {}
    # n1 restarts (another lease): its shards get new epochs, and nobody before it to wait for
    third = next_map(second, place(COUNT, slots_of({"n1": 2, "n2": 1})), {"n1": 12, "n2": 22})
    assert third is not None and moved_in("n1", second, third, {}) == {}
    assert moved_in("n1", None, third, {}) == {}
    assert ShardMap.decode(third.encode()) == third
    fence = Fence("n2", 22)
    fence.apply(second)
    fence.renewed(100.0)
    n1 = {"n1": NodeInfo("n1", "10.0.0.1:7100", 2, number=3, key="K1")}
    grant = from_fence(fence, 1, 1, 0.0, nodes=n1, leases={"n1": 11}, number=4, incoming=incoming)
    assert [v for v, p in enumerate(grant.incoming) if p >= 0] == taken
    assert all(grant.incoming[v] == 3 * 256 + incoming[v][2] for v in taken)
    assert Grant.from_value(grant.to_value()) == grant
    gone = from_fence(fence, 2, 1, 0.0, nodes={}, number=4, incoming=incoming)
    assert gone.incoming == ()  # n1 is not registered any more: served at once, empty


def test_an_incoming_shard_stays_named_until_it_moves_again() -> None:
    """A later map that keeps the shard here at the same epoch keeps its previous owner (the
    move may not be done); a drain of n2 drops it and names n2 on n1's side."""
    first = next_map(None, place(COUNT, slots_of({"n1": 1})), {"n1": 11})
    assert first is not None
    second = next_map(first, place(COUNT, slots_of({"n1": 1, "n2": 1})), {"n1": 11, "n2": 22})
    assert second is not None
    held = moved_in("n2", first, second, {})
    assert held
    assert moved_in("n2", second, second, held) == held
    back = next_map(second, place(COUNT, slots_of({"n1": 1})), {"n1": 11})
    assert back is not None
    assert moved_in("n2", second, back, held) == {}
    returned = moved_in("n1", second, back, {})
    assert sorted(returned) == sorted(held)
    assert all(node == "n2" and worker == 0 for _epoch, node, worker in returned.values())


def test_a_grant_names_each_shards_backup_by_peer_id() -> None:
    owners, backups = place_with_backups(COUNT, slots_of({"n1": 2, "n2": 3}))
    shard_map = next_map(None, owners, {"n1": 11, "n2": 22}, backups)
    assert shard_map is not None
    fence = Fence("n1", 11)
    fence.apply(shard_map)
    fence.renewed(100.0)
    n2 = NodeInfo("n2", "127.0.0.3:7000", 3, clients="127.0.0.3:1883", number=2, key="k")
    grant = from_fence(fence, 1, 2, now=0.0, nodes={"n2": n2}, leases={"n2": 22}, number=1)
    for v, backup in enumerate(backups):
        assert backup is not None
        assert grant.backup_of[v] == (backup.worker if backup.node == "n1" else 2 * 256 + backup.worker)
    assert Grant.from_value(grant.to_value()) == grant
    # a map without backups: none in the grant
    plain = next_map(None, owners, {"n1": 11, "n2": 22})
    assert plain is not None
    fence.apply(replace(plain, version=2))
    assert from_fence(fence, 2, 2, now=0.0, nodes={"n2": n2}, number=1).backup_of == ()
