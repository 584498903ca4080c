"""What a node's identity on the bus between nodes costs (one etcd member on loopback).

    python loadtests/cluster_identity.py

Starts etcd with ``tests/cluster_fixtures.py`` and times: claiming a new node number (a range
read and a transaction), confirming a remembered one (one read), making and reading the
identity file; then the grant of a node of three (two workers each, 1024 virtual shards) with
its bus fields: its size as the control message and the time to build and encode it (done
every 0.2 to 1 s by the node).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.fence import Fence
from shardbroker.cluster.grant import from_fence
from shardbroker.cluster.membership import NodeInfo
from shardbroker.cluster.numbers import claim_number, ensure_identity
from shardbroker.cluster.placement import place, slots_of
from shardbroker.cluster.shardmap import next_map
from shardbroker.peer.bus import curve_keypair

ROUNDS = 20


def _ms(start: float, rounds: int = 1) -> str:
    return f"{1000 * (time.perf_counter() - start) / rounds:.2f} ms"


def grant_figures() -> None:
    names = ("n1", "n2", "n3")
    shard_map = next_map(None, place(1024, slots_of(dict.fromkeys(names, 2))),
                         {n: i for i, n in enumerate(names, 1)})
    assert shard_map is not None
    fence = Fence("n1", 1)
    fence.apply(shard_map)
    fence.renewed(1e18)
    nodes = {n: NodeInfo(n, f"10.0.0.{i}:7100", 2, clients=f"10.0.0.{i}:1883", number=i,
                         key="K" * 40) for i, n in enumerate(names, 1)}
    leases = {n: i for i, n in enumerate(names, 1)}

    def build() -> str:
        grant = from_fence(fence, 1, 2, 0.0, nodes=nodes, leases=leases, number=1)
        return json.dumps({"op": "fence", "grant": grant.to_value()})

    value = json.loads(build())["grant"]
    bare = {k: v for k, v in value.items() if k not in ("number", "nodes", "peer_of")}
    print(f"grant as a control message: {len(build())} bytes"
          f" ({len(json.dumps({'op': 'fence', 'grant': bare}))} without the bus fields)")
    start = time.perf_counter()
    for _ in range(1000):
        build()
    print(f"grant built and encoded: {_ms(start, 1000)}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        etcd_run = cluster_fixtures._cluster(Path(tmp), 1)
        etcd = Etcd(next(etcd_run).endpoints)
        try:
            etcd.get("/warm")
            start = time.perf_counter()
            for i in range(ROUNDS):
                claim_number(etcd, f"n{i}")
            print(f"a new node number claimed (1..{ROUNDS} in turn): {_ms(start, ROUNDS)}")
            start = time.perf_counter()
            for _ in range(ROUNDS):
                claim_number(etcd, "n5", remembered=6)
            print(f"a remembered node number confirmed: {_ms(start, ROUNDS)}")
        finally:
            etcd.close()
            for _ in etcd_run:  # stops etcd
                pass
        data = Path(tmp) / "data"
        data.mkdir()
        start = time.perf_counter()
        ensure_identity(data, "n1", curve_keypair)
        print(f"identity file made (keypair, fsync, rename): {_ms(start)}")
        start = time.perf_counter()
        ensure_identity(data, "n1", curve_keypair)
        print(f"identity file read: {_ms(start)}")
    grant_figures()


if __name__ == "__main__":
    main()
