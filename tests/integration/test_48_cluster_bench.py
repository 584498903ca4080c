"""The benchmark of one broker over several nodes (``python -m loadtests.cluster_bus``), CI
size: two nodes under a real etcd, a one-second run of four QoS 1 pairs. Each client is on
the node that serves its client ID, every publisher's subscriber on the other node; nothing
acknowledged is lost, each delivery came over the bus between the nodes, and the figures the
table is made of (throughput, latency, CPU of each node) are there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import skip_unless_shardbroker

from loadtests import bench, cluster_bus
from shardbroker.cluster.placement import vshard_for
from shardbroker.operations import control


def bus_received(data: Path) -> int:
    shards = control.call(str(data / "control.sock"), {"op": "stats"})["shards"]
    return sum(int(s["counters"]["bus_received"]) for s in shards.values())


def test_every_message_crosses_nodes_and_none_acknowledged_is_lost(tmp_path: Path) -> None:
    skip_unless_shardbroker()
    args = cluster_bus.parse_args(["--nodes", "2", "--pairs", "4", "--duration", "1", "--repeat", "1"])
    bargs = bench.parse_args(["--duration", "1"])
    cluster = cluster_bus.start_cluster(tmp_path, 2, args.workers_per_node)
    try:
        shard_map = cluster_bus.read_map(cluster)
        plans, expect = cluster_bus.build_plans(cluster, shard_map, args, bargs)
        node_of_port = {port: name for name, port in zip(cluster.names, cluster.ports)}
        placed: dict[str, str] = {}
        for plan in plans:
            for cid, _ in plan.pubs + plan.subs:
                slot = shard_map.vshards[vshard_for(cid, 1024)].slot
                assert slot is not None and slot.node == node_of_port[plan.port], cid
                placed[cid] = slot.node
        pubs = {gid: cid for plan in plans for gid, (cid, _) in zip(plan.pub_gids, plan.pubs)}
        assert sorted(pubs) == sorted(expect) == [0, 1, 2, 3]
        for k, pub in pubs.items():
            assert placed[pub] == cluster.names[k % 2]
            assert placed[expect[k][0]] == cluster.names[(k + 1) % 2]

        before = [bus_received(d) for d in cluster.data]
        out: dict[str, Any] = cluster_bus.run(cluster, args, bargs)
        after = [bus_received(d) for d in cluster.data]
    finally:
        cluster.stop()
    assert out["_verdict"] == [], out
    assert out["acked"] > 0 and out["lost"] == 0 and out["delivered"] >= out["acked"], out
    # each delivery came in a peer message from the other node (one per publish at least)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) - sum(before) >= out["delivered"], (before, after, out["delivered"])
    assert out["delivered msg/s"] > 0 and out["p50 ms"] is not None and out["p99 ms"] >= out["p50 ms"]
    assert set(out["_cpu_s"]) == {"n1", "n2"} and all(s > 0 for s in out["_cpu_s"].values())
    assert out["cpu us/msg"] > 0


@pytest.mark.parametrize("argv", [["--nodes", "0"], ["--nodes", "1,x"], ["--qos", "0"], ["--pairs", "0"],
                                  ["--duration", "0"]])
def test_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cluster_bus.parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err
