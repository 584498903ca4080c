"""One broker over 1, 2 and 3 cluster nodes: throughput, CPU per message and losses when every
message crosses nodes.

    python -m loadtests.cluster_bus [--nodes 1,2,3] [--workers-per-node 1] [--pairs 24]
        [--qos 1] [--payload 64] [--window 100] [--duration 5] [--repeat 3] [--procs-per-node 1]

For each node count N: starts etcd (one member, ``tests/cluster_fixtures.py``) and N nodes
(``NodeProcess``: fresh data directories, ``lease_ttl`` 10, default settings otherwise; node i
advertises the bus address ``127.0.0.<i+2>:PORT``), waits until the map gives every node its
share and every worker of every node reaches the workers of the other nodes (control op
``stats``: each shard's ``remote_peers``), then runs ``--repeat`` times the checked pairs of
``loadtests.bench`` (QoS 1 or 2 publishers pipelining against PUBACK / PUBREC with a window
of unacknowledged messages each, one subscriber per publisher, every message tracked). Each
client connects to the node that serves its client ID (the map read from etcd): pair k's
publisher to node k % N, its subscriber to node (k + 1) % N, so that with N > 1 every message
crosses nodes. Each node gets ``--procs-per-node`` generator processes of its own.

Per N (medians over the repeats): delivered msg/s, acknowledged, lost (the largest; acknowledged and never
delivered: a run with a loss fails, exit status 1), end-to-end latency p50/p99 (stamped
payloads; under full load it is mostly the time spent in the windows), each node's CPU seconds
(its process tree, ``/proc``) over the measured window, CPU µs per delivered message (all
nodes), and both ratios to N = 1; beside them, the generator processes' CPU seconds (the whole
run: connects and drain included), to see whether they were the limit. All nodes and
generators share this host's cores.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from loadtests import bench
from loadtests.cluster_proc import NodeProcess
from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import vshard_for
from shardbroker.cluster.shardmap import ShardMap
from shardbroker.operations import control

VSHARDS = 1024
LEASE_TTL = 10
SETTLE_TIMEOUT = 60.0


class SetupFailed(Exception):
    """The nodes did not come up, share the map or reach each other in time."""


@dataclass
class Cluster:
    """etcd and N running nodes, the MQTT port of each."""

    etcd: cluster_fixtures.EtcdCluster
    nodes: list[NodeProcess]
    names: list[str]
    data: list[Path]
    ports: list[int]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.etcd.close()


def start_cluster(base: Path, count: int, workers: int) -> Cluster:
    """etcd (one member) and ``count`` nodes of ``workers`` workers each, under ``base``."""
    etcd = cluster_fixtures.single_etcd(base)
    cluster = Cluster(etcd, [], [f"n{i + 1}" for i in range(count)],
                      [base / f"n{i + 1}" for i in range(count)], [])
    try:
        for i, name in enumerate(cluster.names):
            advertise = cluster_fixtures.bus_address(workers, host=f"127.0.0.{i + 2}")
            cluster.nodes.append(NodeProcess(base, name, cluster.data[i], etcd.endpoints,
                                             ttl=LEASE_TTL, workers=workers,
                                             advertise=advertise, log_level="warning"))
            cluster.ports.append(cluster.nodes[-1].port())
        wait_settled(cluster, workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_settled(cluster: Cluster, workers: int) -> None:
    """Until the map gives every node its share, every node applied it, every worker of every
    node accepts a client of its own (CONNACK 0), and reaches each worker of the other nodes."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    client = Etcd(cluster.etcd.endpoints)
    try:
        while True:
            view = read_view(client)
            if (view.map is not None and set(view.map.per_node()) == set(cluster.names)
                    and all(view.applied.get(n) == view.map.version for n in cluster.names)):
                break
            if time.monotonic() > deadline:
                raise SetupFailed(f"the map did not share the virtual shards over {cluster.names}")
            time.sleep(0.1)
    finally:
        client.close()
    shard_map = read_map(cluster)
    for name, port in zip(cluster.names, cluster.ports):
        for worker in range(workers):
            cid = id_on(shard_map, name, f"ready-{worker}-", worker)
            while not bench.probe("127.0.0.1", port, cid, 4):
                if time.monotonic() > deadline:
                    raise SetupFailed(f"node {name}'s worker {worker} does not serve its clients")
                time.sleep(0.1)
    remote = workers * (len(cluster.names) - 1)
    for name, data in zip(cluster.names, cluster.data):
        while True:
            try:
                shards = control.call(str(data / "control.sock"), {"op": "stats"})["shards"]
                if shards and all(s["counters"]["remote_peers"] == remote for s in shards.values()):
                    break
            except control.ControlError:
                pass
            if time.monotonic() > deadline:
                raise SetupFailed(f"node {name}'s workers do not reach the {remote} workers "
                                  f"of the other nodes")
            time.sleep(0.1)


def read_map(cluster: Cluster) -> ShardMap:
    client = Etcd(cluster.etcd.endpoints)
    try:
        view = read_view(client)
    finally:
        client.close()
    if view.map is None:
        raise SetupFailed("no shard map in etcd")
    return view.map


def id_on(shard_map: ShardMap, node: str, prefix: str, worker: int | None = None) -> str:
    """The first ``prefix<k>`` whose virtual shard the map gives ``node`` (and ``worker``)."""
    for k in range(100_000):
        cid = f"{prefix}{k}"
        slot = shard_map.vshards[vshard_for(cid, VSHARDS)].slot
        if slot is not None and slot.node == node and worker in (None, slot.worker):
            return cid
    raise SetupFailed(f"no client ID of node {node} among 100,000")


def build_plans(cluster: Cluster, shard_map: ShardMap, args: argparse.Namespace,
                bargs: argparse.Namespace) -> tuple[list[bench.Plan], dict[int, list[str]]]:
    """``--procs-per-node`` plans per node, each on that node's port; pair k's publisher on
    node k % N, its subscriber on node (k + 1) % N."""
    count = len(cluster.names)
    tag = secrets.token_hex(3)
    plans: list[list[bench.Plan]] = [
        [bench.Plan(index=node * args.procs_per_node + j, host="127.0.0.1", port=cluster.ports[node],
                    qos=args.qos, payload=args.payload, window=args.window, track=True, pairs=True,
                    stamp=True, stamp_paced=False, coalesce_ms=bargs.read_coalesce_ms,
                    connect_concurrency=bargs.connect_concurrency, timeout=bargs.timeout)
         for j in range(args.procs_per_node)]
        for node in range(count)]
    expect: dict[int, list[str]] = {}
    for k in range(args.pairs):
        pub_node, sub_node = k % count, (k + 1) % count
        pub = id_on(shard_map, cluster.names[pub_node], f"cbp{k}-{tag}-")
        sub = id_on(shard_map, cluster.names[sub_node], f"cbs{k}-{tag}-")
        topic = f"bench/cluster/{tag}/{k}"
        pub_plan = plans[pub_node][k // count % args.procs_per_node]
        pub_plan.pubs.append((pub, topic))
        pub_plan.pub_gids.append(k)
        plans[sub_node][k // count % args.procs_per_node].subs.append((sub, topic))
        expect[k] = [sub]
    return [p for per_node in plans for p in per_node if p.pubs or p.subs], expect


def run(cluster: Cluster, args: argparse.Namespace, bargs: argparse.Namespace) -> dict[str, Any]:
    """One checked run over ``cluster``: bench's metrics, its verdict, CPU per node and message."""
    plans, expect = build_plans(cluster, read_map(cluster), args, bargs)
    scn = f"pairs-qos{args.qos}"
    roots: dict[str, int | None] = {name: node.proc.pid for name, node in zip(cluster.names, cluster.nodes)}
    try:
        out = bench.run_plans(scn, plans, expect, bargs, roots)
    except bench.RunError as exc:
        out = {"_failed": str(exc)}
    out["_verdict"] = bench.verdict(scn, out)
    cpu = out.get("_cpu_s")
    if cpu and out.get("delivered msg/s"):
        out["cpu us/msg"] = 1e6 * sum(cpu.values()) / (out["delivered msg/s"] * out["_cpu_wall_s"])
    return out


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(count: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one node count (``lost``: the largest)."""
    names = sorted({n for r in runs for n in r.get("_cpu_s", {})})
    return {
        "nodes": count,
        "delivered msg/s": median(runs, "delivered msg/s"),
        "acked": median(runs, "acked"),
        "lost": max((r.get("lost", 0.0) for r in runs), default=0.0),
        "p50 ms": median(runs, "p50 ms"),
        "p99 ms": median(runs, "p99 ms"),
        "cpu s": {n: statistics.median(r["_cpu_s"][n] for r in runs if n in r.get("_cpu_s", {}))
                  for n in names},
        "cpu us/msg": median(runs, "cpu us/msg"),
        "generator cpu s": median(runs, "_gen_cpu"),
        "failed": [f"run {i + 1}: {'; '.join(r['_verdict'])}" for i, r in enumerate(runs) if r["_verdict"]],
    }


def number(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def ratio(v: float | None, base: float | None) -> str:
    return "n/a" if v is None or not base else f"{v / base:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["nodes"] == 1), {})
    print("| nodes | delivered msg/s | ratio to 1 | acknowledged | lost | p50 ms | p99 ms "
          "| CPU s per node | CPU µs per message | ratio to 1 | generators' CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cpu = ", ".join(f"{n} {s:.2f}" for n, s in r["cpu s"].items()) or "n/a"
        print(f"| {r['nodes']} | {number(r['delivered msg/s'])} "
              f"| {ratio(r['delivered msg/s'], base.get('delivered msg/s'))} "
              f"| {number(r['acked'])} | {number(r['lost'])} | {number(r['p50 ms'], 1)} "
              f"| {number(r['p99 ms'], 1)} | {cpu} | {number(r['cpu us/msg'])} "
              f"| {ratio(r['cpu us/msg'], base.get('cpu us/msg'))} "
              f"| {number(r['generator cpu s'], 2)} |")


def node_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of node counts: {text!r}") from None
    if not counts or any(not 1 <= c <= 9 for c in counts):
        raise argparse.ArgumentTypeError(f"node counts must be 1 to 9: {text!r}")
    return counts


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cluster_bus",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=node_counts, default=[1, 2, 3],
                        help="node counts to run, comma-separated (default 1,2,3)")
    parser.add_argument("--workers-per-node", type=positive, default=1)
    parser.add_argument("--pairs", type=positive, default=24, help="publisher/subscriber pairs")
    parser.add_argument("--qos", type=int, choices=(1, 2), default=1)
    parser.add_argument("--payload", type=positive, default=64, help="payload bytes")
    parser.add_argument("--window", type=positive, default=100,
                        help="unacknowledged messages per publisher")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    parser.add_argument("--repeat", type=positive, default=3, help="runs per node count (medians)")
    parser.add_argument("--procs-per-node", type=positive, default=1,
                        help="generator processes per node")
    args = parser.parse_args(argv)
    if not args.duration > 0:
        parser.error("--duration must be more than 0")
    if args.payload < 16:
        parser.error("--payload must be 16 bytes or more (the tracked header and the stamp)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return measure(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def measure(args: argparse.Namespace) -> int:
    """Every node count in turn, the table, and 1 when a run failed."""
    if not os.access(cluster_fixtures.ETCD_BIN, os.X_OK) and shutil.which("etcd") is None:
        print(f"error: etcd not installed ({cluster_fixtures.ETCD_BIN}; apt-get install etcd-server)",
              file=sys.stderr)
        return 2
    bargs = bench.parse_args(["--duration", str(args.duration)])
    rows: list[dict[str, Any]] = []
    broken = ""
    for count in args.nodes:
        with tempfile.TemporaryDirectory(prefix="cluster-bus-bench-") as tmp:
            try:
                cluster = start_cluster(Path(tmp), count, args.workers_per_node)
            except (SetupFailed, RuntimeError) as exc:
                broken = f"{count} node(s): {exc}"
                break
            try:
                runs = []
                for i in range(args.repeat):
                    runs.append(run(cluster, args, bargs))
                    bench.log(f"{count} node(s), run {i + 1}: "
                              f"{number(runs[-1].get('delivered msg/s'))} msg/s delivered, "
                              f"lost {number(runs[-1].get('lost'))}")
            finally:
                cluster.stop()
        rows.append(summary(count, runs))
    print(f"{args.pairs} pairs QoS {args.qos}, {args.payload}-byte payloads, window {args.window}, "
          f"{args.duration:g} s x {args.repeat}, {args.workers_per_node} worker(s) per node, "
          f"{args.procs_per_node} generator process(es) per node")
    print_table(rows)
    failed = [f"{r['nodes']} node(s), {why}" for r in rows for why in r["failed"]]
    if broken:
        failed.append(f"setup of {broken}")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
