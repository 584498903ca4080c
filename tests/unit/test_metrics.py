"""The arithmetic behind $SYS/broker and /metrics: Mosquitto's load averages, counters carried
over a worker's restart, histograms, the exposition of one gathering and the readiness reasons."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from shardbroker.operations.admin import Gathered
from shardbroker.operations.histogram import Histogram
from shardbroker.operations.metrics import cluster_families, families, not_ready
from shardbroker.operations.sys_tree import Carry, LoadAverage, SysTree


def test_load_average_of_a_steady_rate_approaches_it_like_mosquitto() -> None:
    load = LoadAverage()
    load.update(0, 0.0)  # the starting point
    counter = 0
    for second in range(1, 61):  # one minute, 10 messages a second, an update a second
        counter += 10
        values = load.update(counter, float(second))
    rate = 600.0  # per minute
    for window, seconds in (("1min", 60.0), ("5min", 300.0), ("15min", 900.0)):
        # the closed form of new = rate + exp(-dt/T) * (old - rate), from 0, after 60 s
        assert values[window] == pytest.approx(rate * (1 - math.exp(-60.0 / seconds)))
    assert values["1min"] > values["5min"] > values["15min"]


def test_load_average_decays_when_idle() -> None:
    load = LoadAverage()
    load.update(0, 0.0)
    before = load.update(600, 60.0)  # 600 in one minute
    after = load.update(600, 120.0)  # then nothing for a minute
    for window, seconds in (("1min", 60.0), ("5min", 300.0), ("15min", 900.0)):
        assert after[window] == pytest.approx(before[window] * math.exp(-60.0 / seconds))


def test_load_average_follows_the_interval_length() -> None:
    """Ten messages over 10 s and over 20 s are 60 and 30 per minute."""
    a, b = LoadAverage(), LoadAverage()
    a.update(0, 0.0)
    b.update(0, 0.0)
    fast, slow = a.update(10, 10.0), b.update(10, 20.0)  # both began at 0
    assert fast["1min"] == pytest.approx(60 * (1 - math.exp(-10 / 60)))
    assert slow["1min"] == pytest.approx(30 * (1 - math.exp(-20 / 60)))


def test_carry_keeps_what_a_restarted_shard_had_counted() -> None:
    carry = Carry()
    assert carry.total({"0": {"received": 5}, "1": {"received": 7}}, "received") == 12
    assert carry.total({"0": {"received": 6}, "1": {"received": 2}}, "received") == 6 + 7 + 2  # 1 restarted
    assert carry.total({"0": {"received": 6}, "1": {"received": 3}}, "received") == 6 + 7 + 3
    assert carry.total({"0": {"received": 6}, "1": {"received": 3}}, "sent") == 0  # counters apart


def test_histogram_snapshot_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        h.observe(value)
    assert h.snapshot() == {"bounds": [0.1, 1.0], "cumulative": [2, 3], "sum": pytest.approx(2.65), "count": 4}
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def _shard(received: int, **over: Any) -> dict[str, Any]:
    counters = {"received": received, "received_qos0": 0, "received_qos1": received, "received_qos2": 0,
                "delivered": 0, "received_bytes": 3 * received, "delivered_bytes": 0, "dropped_queue_full": 0,
                "connections": 2, "sessions_offline": 1, "subscriptions": 4, "queued": 1, "inflight": 2,
                "queued_bytes": 10, "inflight_bytes": 20}
    h = Histogram((0.01,))
    h.observe(0.001)
    answer = {"counters": counters, "values": {"flow_held_seconds": 0.5, "store_fill": 0.1, "retained": 9},
              "histograms": {"commit_seconds": h.snapshot(), "commit_ops": h.snapshot()},
              "ready": {"unsynced": [], "store_writable": True}}
    answer.update(over)
    return answer


def _acceptor() -> dict[str, Any]:
    return {"counters": {"handed_off": 4, "accepted": 5}, "histograms": {"handoff_seconds": Histogram((1.0,)).snapshot()}}


def test_sys_tree_totals_and_what_changed() -> None:
    tree = SysTree(started=100.0)
    got = Gathered({"0": _shard(3), "1": _shard(4)}, {}, _acceptor(), None)
    values = tree.values(got, 110.0)
    assert values is not None
    assert values["$SYS/broker/messages/received"] == "7"
    assert values["$SYS/broker/publish/bytes/received"] == "21"
    assert values["$SYS/broker/clients/connected"] == "4"
    assert values["$SYS/broker/clients/total"] == "6"
    assert values["$SYS/broker/retained messages/count"] == "9"  # one store for both: not summed
    assert values["$SYS/broker/store/messages/count"] == "6"
    assert values["$SYS/broker/store/messages/bytes"] == "60"
    assert values["$SYS/broker/uptime"] == "10 seconds"
    assert values["$SYS/broker/version"].startswith("shardbroker ")
    tree.published(values)
    again = tree.values(Gathered({"0": _shard(3), "1": _shard(5)}, {}, _acceptor(), None), 111.0)
    assert again is not None
    changed = tree.changed(again)
    assert changed["$SYS/broker/messages/received"] == "8"
    assert "$SYS/broker/version" not in changed and "$SYS/broker/clients/connected" not in changed
    assert changed["$SYS/broker/uptime"] == "11 seconds"
    # a shard that did not answer: no round (totals would go back)
    assert tree.values(Gathered({"0": _shard(3)}, {"1": "no answer within 2 s"}, _acceptor(), None), 112.0) is None


def test_exposition_names_a_missing_shard_and_parses() -> None:
    got = Gathered({"0": _shard(3)}, {"1": "no answer within 2 s"}, None, "not reachable")

    class Once:
        def collect(self):  # type: ignore[no-untyped-def]
            return list(families(got, 2, 1.0, 0.01))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Once())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("shardbroker_shard_up", (("shard", "0"),))] == 1
    assert samples[("shardbroker_shard_up", (("shard", "1"),))] == 0
    assert samples[("shardbroker_messages_received_total", (("qos", "1"), ("shard", "0")))] == 3
    assert samples[("shardbroker_store_commit_duration_seconds_bucket", (("le", "0.01"), ("shard", "0")))] == 1
    assert samples[("shardbroker_acceptor_up", ())] == 0
    assert samples[("shardbroker_retained_messages", ())] == 9


def test_readiness_reasons() -> None:
    ok = Gathered({"0": _shard(0), "1": _shard(0)}, {}, _acceptor(), None)
    assert not_ready(ok, 2) == []
    bad = Gathered({"0": _shard(0, ready={"unsynced": [1], "store_writable": False})},
                   {"1": "no answer within 1 s"}, None, "not reachable: No such file or directory")
    assert not_ready(bad, 2) == [
        "shard 0: routes not synced with shards [1]",
        "shard 0: store not writable (full)",
        "shard 1: no answer within 1 s",
        "acceptor: not reachable: No such file or directory",
    ]


def _cluster(**over: object) -> dict[str, object]:
    status: dict[str, object] = {"node_id": "n1", "member": True, "lease_seconds": 4.5, "controller": True,
                                 "map_version": 7, "served": 1000, "held_back": 24, "virtual_shards": 1024}
    status.update(over)
    return status


def test_a_cluster_node_is_not_ready_without_a_lease_or_a_shard() -> None:
    def reasons(**over: object) -> list[str]:
        return not_ready(Gathered({"0": _shard(0)}, {}, _acceptor(), None, _cluster(**over)), 1)

    assert reasons() == []
    assert reasons(member=False, served=0) == [
        "cluster: node n1 holds no lease (etcd not reached, or its lease was lost)"]
    assert reasons(served=0) == ["cluster: node n1 serves no virtual shard (map version 7)"]


def test_cluster_families_say_what_the_node_holds() -> None:
    class Once:
        def collect(self) -> Iterable[Metric]:
            return list(cluster_families(_cluster(controller=False)))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Once())  # type: ignore[arg-type]
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples == {
        ("shardbroker_cluster_member", ()): 1, ("shardbroker_cluster_lease_remaining_seconds", ()): 4.5,
        ("shardbroker_cluster_controller", ()): 0, ("shardbroker_cluster_map_version", ()): 7,
        ("shardbroker_cluster_virtual_shards", ("served",)): 1000,
        ("shardbroker_cluster_virtual_shards", ("held_back",)): 24}
