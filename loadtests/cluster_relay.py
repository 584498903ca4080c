"""The cost of a client relayed by a cluster node against one connected to its owner directly.

    python -m loadtests.cluster_relay [--connects 500] [--rounds 5000] [--repeat 3] [--redirect]

Starts etcd (one member, ``tests/cluster_fixtures.py``) and two nodes, n1 and n2 (one worker
each, their own data directories, on loopback), waits until the map shares the virtual
shards between them, then, for a client ID whose virtual shard n2 serves, alternately direct
(to n2) and relayed (to n1, which relays it to n2), ``--repeat`` times:

* connect latency: CONNECTS times a TCP connect, CONNECT (3.1.1, clean), CONNACK, then
  DISCONNECT and close; median and 90th percentile;
* QoS 1 round trip: one client subscribed to its own topic publishes QoS 1 and waits for both
  the PUBACK and the message back (its PUBACK sent), ROUNDS times; median, 90th percentile and
  round trips per second;
* the CPU (user + system, from ``/proc``) of n1's acceptor during the relayed round trips,
  per round trip (4 packets through the relay: PUBLISH and PUBACK each way).

With ``--redirect`` n1 has ``[cluster] redirect = true``, and the connect latency is also
measured for MQTT 5.0: direct (to n2) and redirected (to n1, CONNACK 0x9C, then to the Server
Reference it names, CONNACK 0), with n1's acceptor CPU per connect for the relayed (3.1.1) and
the redirected ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from loadtests import mqttwire
from loadtests.cluster_proc import NodeProcess
from loadtests.mqttwire import Wire
from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import Slot, place, vshard_for

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def connect_times(port: int, client_id: str, n: int, proto: int = 4) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        w = Wire(port, client_id, proto)
        if w.connack[1] != 0:
            raise RuntimeError(f"CONNACK {w.connack!r}")
        out.append(time.perf_counter() - t0)
        w.close()
    return out


def server_reference(connack: bytes) -> str:
    """The Server Reference (0x1C) of a 5.0 CONNACK that says 0x9C with it alone."""
    if connack[1] != 0x9C:
        raise RuntimeError(f"CONNACK {connack!r}: no redirect")
    _length, at = mqttwire.read_varint(connack, 2)
    if connack[at] != 0x1C:
        raise RuntimeError(f"CONNACK {connack!r}: no Server Reference first")
    size = int.from_bytes(connack[at + 1:at + 3], "big")
    return connack[at + 3:at + 3 + size].decode()


def redirected_connect_times(port: int, client_id: str, n: int) -> list[float]:
    """5.0 connects to a node that redirects: CONNACK 0x9C, then to the reference, CONNACK 0."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        first = Wire(port, client_id, 5)
        host, _, there = server_reference(first.connack).rpartition(":")
        first.sock.close()
        w = Wire(int(there), client_id, 5, host.strip("[]"))
        if w.connack[1] != 0:
            raise RuntimeError(f"CONNACK {w.connack!r} at the reference")
        out.append(time.perf_counter() - t0)
        w.close()
    return out


def round_trips(port: int, client_id: str, n: int, on_ready: list[float] | None = None) -> list[float]:
    w = Wire(port, client_id)
    topic = f"relay/{client_id}"
    w.sock.sendall(mqttwire.subscribe(1, [(topic, 1)]))
    first, _ = w.packet()
    assert first >> 4 == 9
    out = []
    payload = bytes(64)
    if on_ready is not None:
        on_ready.append(time.perf_counter())
    for i in range(n):
        pid = i % 65000 + 1
        t0 = time.perf_counter()
        w.sock.sendall(mqttwire.publish(topic, payload, qos=1, packet_id=pid))
        acked = received = False
        while not (acked and received):
            first, body = w.packet()
            kind = first >> 4
            if kind == 4:
                acked = True
            elif kind == 3:
                received = True
                w.sock.sendall(mqttwire.puback(int.from_bytes(body[len(topic) + 2:len(topic) + 4], "big")))
        out.append(time.perf_counter() - t0)
    w.close()
    return out


def ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redirect", action="store_true", help="n1 redirects 5.0 clients; measure that too")
    args = parser.parse_args()
    both = place(1024, [Slot("n1", 0), Slot("n2", 0)])
    cid = next(c for c in (f"bench{i}" for i in range(10_000)) if both[vshard_for(c, 1024)] == Slot("n2", 0))
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        base = Path(tmp)
        etcd = cluster_fixtures.single_etcd(base)
        nodes: list[NodeProcess] = []
        try:
            n1 = NodeProcess(base, "n1", base / "n1", etcd.endpoints, ttl=5, workers=1,
                             advertise=cluster_fixtures.bus_address(1), log_level="warning",
                             extra="redirect = true\n" if args.redirect else "")
            nodes.append(n1)
            p1 = n1.port()
            n2 = NodeProcess(base, "n2", base / "n2", etcd.endpoints, ttl=5, workers=1,
                             advertise=cluster_fixtures.bus_address(1), log_level="warning")
            nodes.append(n2)
            p2 = n2.port()
            client = Etcd(etcd.endpoints)
            deadline = time.monotonic() + 30
            while True:
                view = read_view(client)
                if (view.map is not None and set(view.map.per_node()) == {"n1", "n2"}
                        and view.applied == {"n1": view.map.version, "n2": view.map.version}):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the nodes did not share the map")
                time.sleep(0.1)
            client.close()
            time.sleep(1.5)  # every child holds the grant with the other's address
            acceptor = n1.acceptor_pid()
            results: dict[str, dict[str, list[float]]] = {k: {"connect": [], "rtt": [], "cpu": []}
                                                         for k in ("direct", "relayed")}
            connects: dict[str, list[float]] = {k: [] for k in ("direct 3.1.1", "relayed 3.1.1", "direct 5.0",
                                                                 "redirected 5.0")}
            connect_cpu: dict[str, list[float]] = {k: [] for k in connects}
            for _ in range(args.repeat):
                for kind, port in (("direct", p2), ("relayed", p1)):
                    before = cpu_seconds(acceptor)
                    results[kind]["connect"] += connect_times(port, cid, args.connects)
                    connects[f"{kind} 3.1.1"] += results[kind]["connect"][-args.connects:]
                    connect_cpu[f"{kind} 3.1.1"].append((cpu_seconds(acceptor) - before) / args.connects)
                    started: list[float] = []
                    before = cpu_seconds(acceptor)
                    rtts = round_trips(port, cid, args.rounds, started)
                    used = cpu_seconds(acceptor) - before
                    results[kind]["rtt"] += rtts
                    results[kind]["cpu"].append(used / args.rounds)
                if args.redirect:
                    for kind, measure in (("direct 5.0", lambda: connect_times(p2, cid, args.connects, 5)),
                                          ("redirected 5.0", lambda: redirected_connect_times(p1, cid, args.connects))):
                        before = cpu_seconds(acceptor)
                        connects[kind] += measure()
                        connect_cpu[kind].append((cpu_seconds(acceptor) - before) / args.connects)
            print(f"client {cid!r} (n2's); {args.repeat} x {args.connects} connects, "
                  f"{args.repeat} x {args.rounds} QoS 1 round trips (64-byte payload)")
            print("| path | connect median ms | connect p90 ms | QoS 1 round trip median ms | p90 ms |"
                  " round trips/s | n1 acceptor CPU µs per round trip |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for kind in ("direct", "relayed"):
                r = results[kind]
                rate = len(r["rtt"]) / sum(r["rtt"])
                print(f"| {kind} | {ms(r['connect'], 0.5):.3f} | {ms(r['connect'], 0.9):.3f} | "
                      f"{ms(r['rtt'], 0.5):.3f} | {ms(r['rtt'], 0.9):.3f} | {rate:.0f} | "
                      f"{1e6 * statistics.median(r['cpu']):.1f} |")
            if args.redirect:
                print("\n| connect | median ms | p90 ms | n1 acceptor CPU µs per connect |")
                print("| --- | --- | --- | --- |")
                for kind, times in connects.items():
                    print(f"| {kind} | {ms(times, 0.5):.3f} | {ms(times, 0.9):.3f} | "
                          f"{1e6 * statistics.median(connect_cpu[kind]):.0f} |")
        finally:
            for node in nodes:
                node.stop()
            etcd.close()


if __name__ == "__main__":
    main()
