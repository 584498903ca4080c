"""The cluster's coordination layer against a real etcd (tests/cluster_fixtures.py): node
registration under a lease, lease loss seen by its holder, the controller's election, the
shard map's versions and epochs, drain and forget, ``shardbroker cluster``, and a 3-member
etcd with a member stopped. No broker runs: clustering is not in the data path yet."""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import EtcdCluster
from conftest import wait_until

from shardbroker.cli.main import main
from shardbroker.cluster import admin
from shardbroker.cluster.controller import Controller, StaleController, read_view
from shardbroker.cluster.etcd import Etcd, EtcdUnavailable
from shardbroker.cluster.membership import Membership, NodeIdInUse, NodeInfo
from shardbroker.cluster.placement import Slot
from shardbroker.cluster.shardmap import NODES_PREFIX

VSHARDS = 1024


BUS_PORTS = itertools.count(7100, 4)


class Node:
    """A membership and a controller candidate on their own etcd client."""

    def __init__(self, endpoints: list[str], node_id: str, ttl: int = 2, workers: int = 1,
                 key: str = "") -> None:
        self.etcd = Etcd(endpoints, timeout=1.0)
        self.lost: list[tuple[float, float]] = []  # (time_left, when)
        # registered only (no bus binds it), but each node a bus address of its own
        self.advertise = f"127.0.0.1:{next(BUS_PORTS)}"
        self.member = Membership(self.etcd, NodeInfo(node_id, self.advertise, workers, key=key),
                                 ttl, lambda left: self.lost.append((left, time.monotonic())))
        self.controller: Controller | None = None

    def join(self) -> Node:
        self.member.join()
        self.controller = Controller(Etcd(self.etcd.endpoints, timeout=1.0),
                                     self.member.info.node_id, self.member.lease, VSHARDS)
        return self

    def close(self) -> None:
        self.member.stop()
        self.etcd.close()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for n in made:
        n.close()


def registered(etcd: Etcd) -> set[str]:
    return {e.key.removeprefix(NODES_PREFIX) for e in etcd.get_prefix(NODES_PREFIX)}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["cluster", *args])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


# ------------------------------------------------------------------ membership


def test_registration_expires_with_its_lease(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    node = Node(etcd_single.endpoints, "n1", ttl=2).join()
    nodes.append(node)
    entry = node.etcd.get(NODES_PREFIX + "n1")
    assert entry is not None and entry.lease == node.member.lease
    assert json.loads(entry.value) == {"advertise": node.advertise, "workers": 1, "state": "up",
                                      "clients": "", "number": 0, "key": ""}
    # nobody renews: etcd deletes it after the TTL (2 s, plus etcd's own rounding)
    joined = time.monotonic()
    wait_until(lambda: "n1" not in registered(node.etcd), timeout=5, message="expiry")
    assert time.monotonic() - joined >= 1.5


def test_renewed_registration_outlives_the_ttl_and_leave_removes_it(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    node = Node(etcd_single.endpoints, "n1", ttl=2).join()
    nodes.append(node)
    node.member.start()
    time.sleep(3.5)
    assert "n1" in registered(node.etcd) and node.lost == []
    assert node.member.time_left() > 1.0
    node.member.leave()
    assert "n1" not in registered(node.etcd) and node.lost == []


def test_a_node_id_registers_once(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    first = Node(etcd_single.endpoints, "n1", ttl=5).join()
    second = Node(etcd_single.endpoints, "n1", ttl=5)
    nodes += [first, second]
    with pytest.raises(NodeIdInUse, match=r"node n1 is registered already \(its lease has \d s left\)"):
        second.member.join()
    first.member.leave()
    second.join()  # free again
    assert second.etcd.get(NODES_PREFIX + "n1").lease == second.member.lease  # type: ignore[union-attr]


def test_a_node_takes_over_the_registration_its_previous_run_left(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    """Same node ID and same bus key (the same data directory, after a kill): the registration
    moves to the new lease at once and the old lease is revoked; another key still waits."""
    first = Node(etcd_single.endpoints, "n1", ttl=30, key="K" * 40).join()
    nodes.append(first)
    first.member.stop()  # as a kill: its lease lives on for 30 s
    old = first.member.lease
    intruder = Node(etcd_single.endpoints, "n1", ttl=5, key="J" * 40)
    nodes.append(intruder)
    with pytest.raises(NodeIdInUse):
        intruder.member.join()
    again = Node(etcd_single.endpoints, "n1", ttl=5, key="K" * 40)
    nodes.append(again)
    again.member.join()
    held = again.etcd.get(NODES_PREFIX + "n1")
    assert held is not None and held.lease == again.member.lease != old
    assert again.etcd.time_to_live(old) < 0  # revoked


def test_revoked_lease_is_seen_by_its_holder(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    node = Node(etcd_single.endpoints, "n1", ttl=3).join()
    nodes.append(node)
    node.member.start()
    other = Etcd(etcd_single.endpoints)
    assert admin.forget(other, "n1") == "node n1: registration removed (lease revoked)"
    wait_until(lambda: node.lost, timeout=3, message="on_lost")
    assert node.lost[0][0] == 0.0 and node.member.lost
    with pytest.raises(Exception, match="no longer registered"):
        node.member.set_state("leaving")


def test_unreachable_etcd_is_seen_before_the_lease_can_expire(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    node = Node(etcd_single.endpoints, "n1", ttl=3).join()
    nodes.append(node)
    node.member.start()
    time.sleep(1.2)  # a renewal or so
    deadline = node.member.deadline
    etcd_single.stop(etcd_single.members[0])
    wait_until(lambda: node.lost, timeout=4, message="on_lost")
    left, when = node.lost[0]
    # told while time was left (so clients can be closed), and before the deadline
    assert 0.0 < left <= 1.0 and when < deadline
    with pytest.raises(EtcdUnavailable):
        node.etcd.get("/x")


def test_a_hanging_etcd_is_seen_before_the_lease_can_expire(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    """etcd stopped with SIGSTOP accepts connections and answers nothing (as behind a cut
    link): renewals hang until their timeout, and the watchdog still warns in time."""
    node = Node(etcd_single.endpoints, "n1", ttl=3).join()
    nodes.append(node)
    node.member.start()
    time.sleep(1.2)
    proc = etcd_single.members[0].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: node.lost, timeout=4, message="on_lost")
        left, when = node.lost[0]
        assert 0.5 < left <= 1.0 and when < node.member.deadline - 0.5
        with pytest.raises(EtcdUnavailable, match=r"\(http://127\.0\.0\.1:\d+: timed out\)$"):
            Etcd(etcd_single.endpoints, timeout=0.3).get("/x")
    finally:
        proc.send_signal(signal.SIGCONT)


# ------------------------------------------------------------------ the controller


def test_one_controller_elected_and_the_other_takes_over_after_its_lease(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    a = Node(etcd_single.endpoints, "a", ttl=2).join()
    b = Node(etcd_single.endpoints, "b", ttl=2).join()
    nodes += [a, b]
    b.member.start()
    assert a.controller is not None and b.controller is not None
    results = []
    barrier = threading.Barrier(2)

    def race(c: Controller) -> None:
        barrier.wait()
        results.append((c.node_id, c.campaign()))

    threads = [threading.Thread(target=race, args=(c,)) for c in (a.controller, b.controller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, won in results if won]
    assert len(winners) == 1
    leader, follower = (a, b) if winners == ["a"] else (b, a)
    assert follower.controller is not None and leader.controller is not None
    assert read_view(a.etcd).controller == leader.member.info.node_id
    first = leader.controller.reconcile()
    assert first is not None and first.version == 1 and follower.controller.reconcile() is None
    if leader is a:
        # a stops renewing (as if it died): b takes over once a's lease has expired
        stopped = time.monotonic()
        wait_until(follower.controller.campaign, timeout=5, interval=0.1, message="takeover")
        assert time.monotonic() - stopped >= 1.0
        second = follower.controller.reconcile()
        assert second is not None and second.version == 2
        assert set(second.per_node()) == {"b"} and second.per_node()["b"] == VSHARDS
        for old, new in zip(first.vshards, second.vshards):
            assert new.epoch == (old.epoch if old.slot == new.slot else 2)
    else:
        # b leads and keeps renewing: a never wins
        time.sleep(2.5)
        assert not a.controller.campaign()


def test_takeover_after_the_leader_stops(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    a = Node(etcd_single.endpoints, "a", ttl=2).join()
    b = Node(etcd_single.endpoints, "b", ttl=2).join()
    nodes += [a, b]
    b.member.start()  # a is never renewed: it dies with its lease
    assert a.controller is not None and b.controller is not None
    assert a.controller.campaign() and not b.controller.campaign()
    m1 = a.controller.reconcile()
    assert m1 is not None and set(m1.per_node()) == {"a", "b"}
    wait_until(b.controller.campaign, timeout=5, interval=0.1, message="takeover")
    m2 = b.controller.reconcile()
    assert m2 is not None and m2.version == 2 and m2.per_node() == {"b": VSHARDS}
    assert all(n.epoch == (o.epoch if o.slot == n.slot else 2) for o, n in zip(m1.vshards, m2.vshards))
    assert not a.controller.campaign()


def test_a_stale_controller_cannot_write(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    a = Node(etcd_single.endpoints, "a", ttl=5).join()
    b = Node(etcd_single.endpoints, "b", ttl=5).join()
    nodes += [a, b]
    assert a.controller is not None and b.controller is not None
    assert a.controller.campaign()
    view, new = a.controller.plan()
    assert new is not None
    a.controller.publish(view, new)
    # the same controller, from a map it read before its own write: refused
    b.member.leave()
    view2, new2 = a.controller.plan()
    assert new2 is not None and new2.version == 2
    with pytest.raises(StaleController):
        a.controller.publish(view, new2)  # view is the old read
    a.controller.publish(view2, new2)
    # a loses its lease between reading and writing; b, the new controller, writes first
    b2 = Node(etcd_single.endpoints, "b", ttl=5).join()
    nodes.append(b2)
    view3, new3 = a.controller.plan()
    assert new3 is not None
    a.etcd.revoke(a.member.lease)
    assert b2.controller is not None and b2.controller.campaign()
    written = b2.controller.reconcile()
    assert written is not None and written.version == 3 and written.per_node() == {"b": VSHARDS}
    with pytest.raises(StaleController):
        a.controller.publish(view3, new3)
    final = read_view(a.etcd).map
    assert final == written


def test_drain_moves_about_a_third_and_empties_the_node(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    trio = [Node(etcd_single.endpoints, n, ttl=10, workers=2).join() for n in ("a", "b", "c")]
    nodes += trio
    ctl = trio[0].controller
    assert ctl is not None
    before = ctl.reconcile()
    assert before is not None and sorted(before.per_node()) == ["a", "b", "c"]
    admin.drain(trio[0].etcd, "c")
    assert ctl.reconcile() is not None
    after = read_view(trio[0].etcd).map
    assert after is not None and after.version == 2 and "c" not in after.per_node()
    moved = [v for v in range(VSHARDS) if before.vshards[v].slot != after.vshards[v].slot]
    assert all(before.vshards[v].slot.node == "c" for v in moved)  # type: ignore[union-attr]
    assert len(moved) == before.per_node()["c"]
    assert abs(len(moved) - VSHARDS / 3) < 4 * (VSHARDS / 3) ** 0.5
    assert {after.vshards[v].slot for v in moved} <= {Slot(n, w) for n in "ab" for w in (0, 1)}
    st = admin.status(trio[0].etcd)
    assert {n["node_id"]: (n["state"], n["vshards"]) for n in st["nodes"]} == {
        "a": ("up", after.per_node()["a"]), "b": ("up", after.per_node()["b"]), "c": ("draining", 0)}
    assert admin.undrain(trio[0].etcd, "c") and ctl.reconcile() is not None
    back = read_view(trio[0].etcd).map
    assert back is not None and back.per_node()["c"] == before.per_node()["c"]
    assert all(back.vshards[v].epoch == 3 for v in moved)  # back at a new epoch


def test_a_node_that_registers_again_gets_new_epochs(
        etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    a = Node(etcd_single.endpoints, "a", ttl=10).join()
    b = Node(etcd_single.endpoints, "b", ttl=10).join()
    nodes += [a, b]
    assert a.controller is not None
    first = a.controller.reconcile()
    assert first is not None and first.lease_of("b") == b.member.lease
    b.member.leave()
    b_again = Node(etcd_single.endpoints, "b", ttl=10).join()  # back before any round
    nodes.append(b_again)
    second = a.controller.reconcile()
    assert second is not None and second.lease_of("b") == b_again.member.lease
    assert [v.slot for v in second.vshards] == [v.slot for v in first.vshards]
    assert {v.epoch for v in second.vshards if v.slot is not None and v.slot.node == "b"} == {2}
    assert {v.epoch for v in second.vshards if v.slot is not None and v.slot.node == "a"} == {1}


# ------------------------------------------------------------------ the command line


def test_cluster_commands(etcd_single: EtcdCluster, nodes: list[Node],
                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = etcd_single.endpoints[0]
    code, out, err = cli(capsys, "--etcd", url, "status", "--json")
    assert code == 0 and json.loads(out) == {"nodes": [], "controller": None, "map_version": 0,
                                             "virtual_shards": None, "unassigned_vshards": 0}
    pair = [Node(etcd_single.endpoints, n, ttl=10).join() for n in ("a", "b")]
    nodes += pair
    assert pair[0].controller is not None and pair[0].controller.reconcile() is not None
    code, out, err = cli(capsys, "--etcd", url, "status", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["map_version"] == 1 and doc["controller"] == "a"
    assert doc["virtual_shards"] == VSHARDS
    assert [(n["node_id"], n["state"], n["advertise"], n["workers"]) for n in doc["nodes"]] == [
        ("a", "up", pair[0].advertise, 1), ("b", "up", pair[1].advertise, 1)]
    assert sum(n["vshards"] for n in doc["nodes"]) == VSHARDS

    config = tmp_path / "c.toml"
    config.write_text(f'[cluster]\netcd_endpoints = ["{url}"]\n')
    code, out, err = cli(capsys, "--config", str(config), "drain", "b")
    assert (code, err) == (0, "") and "node b: drained" in out
    assert pair[0].controller.reconcile() is not None
    code, out, err = cli(capsys, "--config", str(config), "status")
    assert code == 0 and out.splitlines()[0] == "map version 2, controller a, virtual shards 1024, unassigned 0"
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows == [["a", "up", pair[0].advertise, "1", "1024"], ["b", "draining", pair[1].advertise, "1", "0"]]

    code, out, err = cli(capsys, "--etcd", url, "forget", "b")
    assert code == 0 and out.strip() == "node b: registration removed (lease revoked), drain mark removed"
    assert "b" not in registered(pair[0].etcd)

    # bad input and no etcd: one line, exit 2
    for args, message in [
        (["--etcd", url, "drain", "nosuch"], "error: node 'nosuch' is not registered"),
        (["--etcd", url, "forget", "nosuch"], "error: node 'nosuch' is not known to the cluster"),
        (["status"], "error: no etcd endpoints: give --etcd URL[,URL...] or --config FILE with [cluster] etcd_endpoints"),
        (["--etcd", "ftp://x", "status"], "error: configuration: cluster.etcd_endpoints: 'ftp://x' is not an http(s)://HOST:PORT URL"),
    ]:
        code, out, err = cli(capsys, *args)
        assert (code, out, err.strip()) == (2, "", message)
    code, out, err = cli(capsys, "--etcd", "http://127.0.0.1:9", "--timeout", "1", "status")
    assert (code, err) == (2, "error: no etcd member answered (http://127.0.0.1:9: Connection refused)\n")


def test_without_the_etcd_client_the_commands_say_what_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "etcd3gw", None)  # import etcd3gw: ImportError
    for name in [m for m in sys.modules if m.startswith("shardbroker.cluster.")]:
        monkeypatch.delitem(sys.modules, name)
    code, out, err = cli(capsys, "--etcd", "http://127.0.0.1:9", "status")
    assert (code, out) == (2, "") and err == (
        "error: the cluster commands need the cluster extra (etcd3gw):"
        " pip install 'shardbroker[cluster]'\n")


# ------------------------------------------------------------------ a 3-member etcd


def test_three_member_etcd_keeps_working_with_its_leader_stopped(
        etcd_three: EtcdCluster, nodes: list[Node]) -> None:
    leader = etcd_three.leader()
    # the clients talk to the leader first: they must move to another member, and etcd
    # must elect another leader, all within the nodes' 2 s TTL
    endpoints = [leader.url] + [m.url for m in etcd_three.members if m is not leader]
    pair = [Node(endpoints, n, ttl=2).join() for n in ("a", "b")]
    nodes += pair
    for n in pair:
        n.member.start()
    ctl = pair[0].controller
    assert ctl is not None and ctl.reconcile() is not None
    etcd_three.stop(leader)
    time.sleep(3.0)  # more than a TTL: renewals went to the other members
    assert [n.lost for n in pair] == [[], []]
    assert registered(pair[0].etcd) == {"a", "b"}
    assert etcd_three.leader() is not leader
    admin.drain(pair[0].etcd, "b")
    written = wait_until(lambda: _reconcile(ctl), timeout=5, message="map write")
    assert written.version == 2 and written.per_node() == {"a": VSHARDS}
    assert read_view(pair[1].etcd).map == written


def test_etcd_quorum_lost_every_node_is_told_before_its_lease_can_expire(
        etcd_three: EtcdCluster, nodes: list[Node]) -> None:
    pair = [Node(etcd_three.endpoints, n, ttl=3).join() for n in ("a", "b")]
    nodes += pair
    for n in pair:
        n.member.start()
    time.sleep(1.2)
    for m in etcd_three.members[:2]:
        etcd_three.stop(m)
    wait_until(lambda: all(n.lost for n in pair), timeout=5, message="on_lost on both")
    for n in pair:
        left, when = n.lost[0]
        assert 0.0 < left <= 1.0 and when < n.member.deadline


def test_controller_loops_hand_over(etcd_single: EtcdCluster, nodes: list[Node]) -> None:
    """Two nodes each running the controller's loop: one writes the map; when it stops, the
    other takes over after its lease and writes the next one, without it."""
    pair = [Node(etcd_single.endpoints, n, ttl=2).join() for n in ("a", "b")]
    nodes += pair
    stops = [threading.Event(), threading.Event()]
    threads = []
    for n, stop in zip(pair, stops):
        n.member.start()
        assert n.controller is not None
        threads.append(threading.Thread(target=n.controller.run, args=(stop, 0.2), daemon=True))
    for t in threads:
        t.start()
    try:
        first = wait_until(lambda: read_view(pair[0].etcd).map, timeout=5, message="a map")
        assert set(first.per_node()) == {"a", "b"}
        leader = read_view(pair[0].etcd).controller
        index = 0 if leader == "a" else 1
        other = pair[1 - index].member.info.node_id
        stops[index].set()
        pair[index].member.stop()  # it dies: its lease runs out, its registration goes
        threads[index].join()
        last = wait_until(lambda: _map_of(pair[1 - index].etcd, {other: VSHARDS}), timeout=8,
                          message="the other controller's map")
        assert read_view(pair[0].etcd).controller == other and last.version == 2
    finally:
        for stop in stops:
            stop.set()
        for t in threads:
            t.join()


def _map_of(etcd: Etcd, per_node: dict[str, int]) -> object:
    m = read_view(etcd).map
    return m if m is not None and dict(m.per_node()) == per_node else None


def _reconcile(ctl: Controller) -> object:
    try:
        return ctl.reconcile()
    except EtcdUnavailable:
        return None  # during a leader election
