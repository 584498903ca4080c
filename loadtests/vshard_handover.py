"""The pause while virtual shards move with their persistent sessions to a joining node.

    python -m loadtests.vshard_handover [--sessions 1000] [--queued 10]

Starts etcd (one member, ``tests/cluster_fixtures.py``) and node n1 (one worker), makes
SESSIONS persistent 3.1.1 sessions on n1 whose virtual shards go to n2 once it joins, each
subscribed (QoS 1) to its own topic and offline with QUEUED QoS 1 messages (64 bytes)
queued, then starts n2 (one worker) and reports:

* from n1's log, per virtual shard that moved: the time from closing its clients to n2's
  acknowledgement of its sessions (``core/moves.py``), median and largest, and the sessions;
* from n2's log, per shard a client asked for before its sessions arrived: the time from
  that first ask (refused) to its sessions committed there;
* from the clients: the time from n2's ``ready`` line until every session has reconnected to
  n2 with session present and received its queued messages (connects in order, one client
  at a time, each retried while refused as "server unavailable");
* then, with QUEUED messages queued again on n2, n2 is drained (both nodes up and reaching
  each other: the move between live nodes alone) and the same is reported for the way back.
"""

from __future__ import annotations

import argparse
import re
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
from shardbroker.cluster import admin
from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import Slot, place, vshard_for

OUT = re.compile(r"moved out to peer \d+: (\d+) sessions, ([\d.]+) s")
IN = re.compile(r"moved in from peer \d+: (\d+) sessions, ([\d.]+) s")


def wait_map(endpoints: list[str], nodes: set[str]) -> None:
    client = Etcd(endpoints)
    deadline = time.monotonic() + 60
    try:
        while True:
            view = read_view(client)
            if (view.map is not None and set(view.map.per_node()) == nodes
                    and all(view.applied.get(n) == view.map.version for n in nodes)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the map did not settle on {sorted(nodes)}")
            time.sleep(0.1)
    finally:
        client.close()


def served(port: int, cid: str, queued: int) -> None:
    """Reconnect ``cid`` until accepted with its session, and take its queued messages."""
    deadline = time.monotonic() + 60
    while True:
        c = Wire(port, cid, clean=False, timeout=10, refuse=False)
        if c.connack[1] == 0:
            break
        c.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cid} refused for 60 s")
        time.sleep(0.05)
    if c.connack[0] & 1 != 1:
        raise RuntimeError(f"{cid}: no session present on n2")
    for _ in range(queued):
        first, body = c.packet()
        if first >> 4 != 3:
            raise RuntimeError(f"{cid}: {first:#x} instead of a PUBLISH")
        topic_len = int.from_bytes(body[:2], "big")
        c.sock.sendall(mqttwire.puback(int.from_bytes(body[2 + topic_len:4 + topic_len], "big")))
    c.close()


def publish_all(port: int, publisher: str, ids: list[str], queued: int) -> None:
    """``queued`` QoS 1 messages to each of ``ids``' topics, each round acknowledged."""
    pub = Wire(port, publisher, timeout=10)
    pid = 0
    for round_ in range(queued):
        for cid in ids:
            pid = pid % 65535 + 1
            pub.sock.sendall(mqttwire.publish(f"h/{cid}", b"%063d" % round_, qos=1, packet_id=pid))
        for _ in ids:
            pub.packet()  # PUBACK
    pub.close()


def report(what: str, giver: list[str], taker: list[str]) -> None:
    outs = [(int(m.group(1)), float(m.group(2))) for line in giver if (m := OUT.search(line))]
    ins = [(int(m.group(1)), float(m.group(2))) for line in taker if (m := IN.search(line))]
    if outs:
        pauses = [t for _, t in outs]
        print(f"{what}: {len(outs)} virtual shards moved out with {sum(n for n, _ in outs)} sessions;"
              f" closing their clients to the acknowledgement: median {statistics.median(pauses):.3f} s,"
              f" largest {max(pauses):.3f} s")
    if ins:
        waits = [t for _, t in ins]
        print(f"{what}: {len(ins)} shards a client asked for early moved in with"
              f" {sum(n for n, _ in ins)} sessions; first ask to sessions committed:"
              f" median {statistics.median(waits):.3f} s, largest {max(waits):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=10)
    args = parser.parse_args()
    both = place(1024, [Slot("n1", 0), Slot("n2", 0)])
    ids = [c for c in (f"hand{i}" for i in range(args.sessions * 4))
           if both[vshard_for(c, 1024)] == Slot("n2", 0)][:args.sessions]
    publisher = next(c for c in (f"pub{i}" for i in range(1000)) if both[vshard_for(c, 1024)] == Slot("n1", 0))
    with tempfile.TemporaryDirectory(prefix="handover-bench-") as tmp:
        base = Path(tmp)
        etcd = cluster_fixtures.single_etcd(base)
        nodes: list[NodeProcess] = []
        try:
            n1 = NodeProcess(base, "n1", base / "n1", etcd.endpoints, ttl=5, workers=1,
                             advertise=cluster_fixtures.bus_address(1), log_level="info")
            nodes.append(n1)
            p1 = n1.port()
            wait_map(etcd.endpoints, {"n1"})
            time.sleep(1.5)
            for cid in ids:
                c = Wire(p1, cid, clean=False, timeout=10, refuse=False)
                c.sock.sendall(mqttwire.subscribe(1, [(f"h/{cid}", 1)]))
                c.packet()  # SUBACK
                c.close()
            publish_all(p1, publisher, ids, args.queued)
            started = time.monotonic()
            n2 = NodeProcess(base, "n2", base / "n2", etcd.endpoints, ttl=5, workers=1,
                             advertise=cluster_fixtures.bus_address(1), log_level="info")
            nodes.append(n2)
            p2 = n2.port()
            ready = time.monotonic()
            for cid in ids:
                served(p2, cid, args.queued)
            done = time.monotonic()
            time.sleep(0.5)
            print(f"{len(ids)} sessions x {args.queued} queued QoS 1 messages; n2 started"
                  f" {ready - started:.2f} s before its listening line")
            report("n2 joins", n1.lines, n2.lines)
            print(f"clients: every session back with its messages {done - ready:.2f} s after n2's"
                  " listening line")
            marks = (len(n1.lines), len(n2.lines))
            publish_all(p1, publisher, ids, args.queued)  # through n1's outbox toward n2
            time.sleep(1.0)
            client = Etcd(etcd.endpoints)
            drained = time.monotonic()
            admin.drain(client, "n2")
            client.close()
            for cid in ids:
                served(p1, cid, args.queued)
            done = time.monotonic()
            time.sleep(0.5)
            report("n2 drained", n2.lines[marks[1]:], n1.lines[marks[0]:])
            print(f"clients: every session back on n1 with its messages {done - drained:.2f} s after"
                  " the drain mark")
        finally:
            for node in nodes:
                node.stop()
            etcd.close()


if __name__ == "__main__":
    main()
