"""Timings of the cluster's coordination layer against a real etcd (one member, loopback).

    python loadtests/cluster_timings.py

Starts etcd with ``tests/cluster_fixtures.py``, registers three nodes of two workers (TTL
2 s), and times the controller's map writes, ``cluster status`` and a controller takeover.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from shardbroker.cluster import admin
from shardbroker.cluster.controller import Controller
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.membership import Membership, NodeInfo

VSHARDS = 1024


def _ms(start: float, rounds: int = 1) -> str:
    return f"{1000 * (time.perf_counter() - start) / rounds:.1f} ms"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        etcd_run = cluster_fixtures._cluster(Path(tmp), 1)
        endpoints = next(etcd_run).endpoints
        members = []
        for i, name in enumerate(("a", "b", "c")):  # registered only: no bus binds these
            member = Membership(Etcd(endpoints), NodeInfo(name, f"127.0.0.1:{7100 + 2 * i}", 2), 2,
                                lambda left: None)
            member.join()
            members.append(member)
        granted = time.monotonic()  # a's lease, never renewed: a dies with it
        for member in members[1:]:
            member.start()
        ctl = Controller(Etcd(endpoints), "a", members[0].lease, VSHARDS)
        start = time.perf_counter()
        ctl.reconcile()
        print(f"first map ({VSHARDS} virtual shards, 6 slots) written: {_ms(start)}")
        start = time.perf_counter()
        for _ in range(20):
            ctl.reconcile()
        print(f"reconcile with nothing to change: {_ms(start, 20)}")
        admin.drain(ctl.etcd, "c")
        start = time.perf_counter()
        ctl.reconcile()
        print(f"reconcile after a drain: {_ms(start)}")
        reader = Etcd(endpoints)
        start = time.perf_counter()
        for _ in range(20):
            admin.status(reader)
        print(f"cluster status: {_ms(start, 20)}")
        other = Controller(Etcd(endpoints), "b", members[1].lease, VSHARDS)
        while not other.campaign():
            time.sleep(0.05)
        print(f"b leads {time.monotonic() - granted:.2f} s after a's lease was granted (TTL 2 s)")
        for member in members[1:]:
            member.stop()
        for _ in etcd_run:
            pass


if __name__ == "__main__":
    main()
