"""A broker node under etcd: what its first start under ``[cluster]`` costs, and how fast the
fence acts when etcd goes away and comes back.

    python -m loadtests.cluster_node [--sessions 20000] [--clients 200] [--ttl 3]

1. Fills a 2-worker data directory in the hash layout (``shard_for(id, 2)``) with SESSIONS
   persistent sessions (a subscription and two queued QoS 1 messages each) and times
   ``storage.layout.arrange`` to the node's layout (what ``serve`` runs before its workers
   start) and back, on copies of it.
2. Starts etcd (one member, ``tests/cluster_fixtures.py``) and ``shardbroker serve`` with
   ``[cluster]`` on the arranged data directory; times the start until a CONNECT is accepted.
3. Connects CLIENTS MQTT 3.1.1 clients, stops etcd (SIGSTOP: it answers nothing, as behind a
   cut link) and times until the node has closed every one of them, against the TTL; a new
   CONNECT's return code during the outage.
4. Resumes etcd (SIGCONT) and times until a CONNECT is accepted again.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from loadtests import mqttwire
from loadtests.cluster_proc import NodeProcess
from shardbroker.cluster.grant import local_owners
from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.sharding import shard_for
from shardbroker.storage.layout import arrange
from shardbroker.storage.lmdb_store import VIRTUAL_SHARDS, ShardStore
from shardbroker.storage.records import SessionRecord, StoredMessage, StoredSubscription

NODE = "n1"
WORKERS = 2
SIZES = {"map_size": 64 << 20, "max_map_size": 8 << 30, "sync": True}


def fill(data: Path, sessions: int) -> None:
    stores = [ShardStore.open(data, i, WORKERS, sync=False, max_map_size=8 << 30)
              for i in range(WORKERS)]
    batches = [s.batch() for s in stores]
    for n in range(sessions):
        cid = f"device-{n:07d}"
        b = batches[shard_for(cid, WORKERS)]
        b.put_session(SessionRecord(cid, 4, 86400, 1.75e9, (StoredSubscription(
            f"fleet/{n % 1000}/cmd/#", 1),), None))
        for _ in range(2):
            b.enqueue(cid, b.add_message(StoredMessage(
                f"fleet/{n % 1000}/cmd/x", bytes(64), 1, False, NO_PROPERTIES)), 1)
        if len(b) >= 20_000:
            b.commit()
            batches[shard_for(cid, WORKERS)] = stores[shard_for(cid, WORKERS)].batch()
    for b, s in zip(batches, stores, strict=True):
        b.commit()
        s.close()


def connack(port: int, client_id: str, timeout: float = 3.0) -> int | None:
    """The CONNACK return code, or None when the connection closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(mqttwire.connect(client_id))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
        return data[3]


def until(pred: object, timeout: float, step: float = 0.01) -> float:
    """Seconds until ``pred()`` holds (RuntimeError after ``timeout``)."""
    start = time.monotonic()
    while not pred():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise RuntimeError("timed out")
        time.sleep(step)
    return time.monotonic() - start


def accepted(port: int) -> bool:
    try:
        return connack(port, "probe-accepted") == 0
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--ttl", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        base = Path(tmp)
        data = base / "data"
        started = time.perf_counter()
        fill(data, args.sessions)
        print(f"filled {args.sessions} sessions (2 queued messages each) over {WORKERS} workers"
              f" in {time.perf_counter() - started:.1f} s")
        table = local_owners(NODE, WORKERS, VIRTUAL_SHARDS)
        name = f"rendezvous:{NODE}"
        start = time.perf_counter()
        done = arrange(data, WORKERS, name, table, **SIZES)  # type: ignore[arg-type]
        print(f"arrange to the node's layout: {done.moved} sessions moved in"
              f" {time.perf_counter() - start:.2f} s (fsync on)")
        start = time.perf_counter()
        again = arrange(data, WORKERS, name, table, **SIZES)  # type: ignore[arg-type]
        print(f"arrange again ({again.moved} to move): "
              f"{1000 * (time.perf_counter() - start):.1f} ms")
        start = time.perf_counter()
        back = arrange(data, WORKERS, None, None, **SIZES)  # type: ignore[arg-type]
        print(f"arrange back to the hash layout: {back.moved} sessions moved in"
              f" {time.perf_counter() - start:.2f} s")
        arrange(data, WORKERS, name, table, **SIZES)  # type: ignore[arg-type]

        etcd_run = cluster_fixtures._cluster(base, 1)
        cluster = next(etcd_run)
        member = cluster.members[0]
        assert member.proc is not None
        spawned = time.monotonic()
        node = NodeProcess(base, NODE, data, cluster.endpoints, ttl=args.ttl, workers=WORKERS,
                           advertise=cluster_fixtures.bus_address(WORKERS),
                           log_level="info")
        try:
            port = node.port()
            until(lambda: accepted(port), 60)
            print(f"serve (layout already arranged) to the first CONNACK 0:"
                  f" {time.monotonic() - spawned:.2f} s")
            socks = []
            for i in range(args.clients):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(mqttwire.connect(f"live-{i}"))
                assert sock.recv(4)[3] == 0
                sock.setblocking(False)
                socks.append(sock)
            time.sleep(args.ttl / 2)
            os.kill(member.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            open_ = set(range(len(socks)))

            def all_closed() -> bool:
                for i in list(open_):
                    try:
                        if socks[i].recv(4096) == b"":
                            open_.discard(i)
                    except BlockingIOError:
                        pass
                    except OSError:
                        open_.discard(i)
                return not open_

            closed = until(all_closed, args.ttl * 3)
            print(f"etcd stopped: {args.clients} clients closed {closed:.2f} s later"
                  f" (lease TTL {args.ttl} s); a new CONNECT gets return code"
                  f" {connack(port, 'during-outage')}")
            time.sleep(1.0)
            os.kill(member.proc.pid, signal.SIGCONT)
            back_at = until(lambda: accepted(port), 30, 0.05)
            print(f"etcd resumed after {time.monotonic() - stopped - back_at:.1f} s stopped:"
                  f" serving again {back_at:.2f} s later")
            for sock in socks:
                sock.close()
        finally:
            node.stop()
            with_errors = [line for line in node.lines if "Traceback" in line]
            if with_errors:
                print("\n".join(node.lines[-40:]))
            etcd_run.close()


if __name__ == "__main__":
    main()
