"""What keying the shard store by virtual shard costs and buys (``storage/vshards.py``).

    python loadtests/vshard_move.py [--sessions 100000]

Fills shard 0 of a 2-shard data directory (in a temporary directory) with SESSIONS
persistent sessions, each with one subscription and two queued QoS 1 messages, every
tenth with an inflight row; then times:

* finding the sessions of one virtual shard: a range of the ``vshards`` index (schema 6)
  against a scan of every session hashing its client ID (what a store without the index,
  or an index kept in memory from such a scan, pays);
* moving one virtual shard, and 64 of them, to shard 1 (``move_vshards``, sync on);
* the upgrade of the same store from schema 5 (a writable open building the index).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from test_store import as_older_schema

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.lmdb_store import ShardStore, vshard_of
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
)
from shardbroker.storage.vshards import move_vshards


def fill(data: Path, sessions: int) -> None:
    with ShardStore.open(data, 0, 2, sync=False, max_map_size=8 << 30) as s:
        b = s.batch()
        for n in range(sessions):
            cid = f"device-{n:07d}"
            b.put_session(SessionRecord(cid, 5, 86400, 1.75e9, (StoredSubscription(
                f"fleet/{n % 1000}/cmd/#", 1),), None))
            for q in range(2):
                b.enqueue(cid, b.add_message(StoredMessage(
                    f"fleet/{n % 1000}/cmd/x", bytes(64), 1, False, NO_PROPERTIES)), 1)
            if n % 10 == 0:
                b.put_inflight(cid, 1, InflightRecord(b.add_message(StoredMessage(
                    "fleet/x", bytes(64), 1, False, NO_PROPERTIES)), 1, AWAIT_PUBACK))
            if len(b) >= 20_000:
                b.commit()
        b.commit()
    ShardStore.open(data, 1, 2, sync=False).close()


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--no-sync", action="store_true", help="moves without fsync")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        fill(data, args.sessions)
        size = (data / "shard-000" / "data.mdb").stat().st_size
        print(f"filled {args.sessions} sessions in {time.perf_counter() - started:.1f} s; "
              f"shard-000 is {size / 2**20:.0f} MiB")
        sync = not args.no_sync
        with ShardStore.open(data, 0, 2, sync=sync) as s0, \
                ShardStore.open(data, 1, 2, sync=sync) as s1:
            counts = s0.vshard_counts()
            vshards = sorted(counts)
            print(f"{len(counts)} virtual shards, {min(counts.values())}.."
                  f"{max(counts.values())} sessions each")
            ranges, scans = [], []
            for v in vshards[:5]:
                t = time.perf_counter()
                got = [r.client_id for r in s0.vshard_sessions([v])]
                ranges.append(time.perf_counter() - t)
                t = time.perf_counter()
                scanned = [r.client_id for r in s0.sessions() if vshard_of(r.client_id) == v]
                scans.append(time.perf_counter() - t)
                assert got == scanned
            ids = [f"device-{n:07d}" for n in range(args.sessions)]
            t = time.perf_counter()
            for cid in ids:
                vshard_of(cid)
            hashing = time.perf_counter() - t
            print(f"sessions of one virtual shard: index range {ms(statistics.median(ranges))}, "
                  f"scan of every session {ms(statistics.median(scans))} (medians); hashing "
                  f"every client ID alone {ms(hashing)}")
            moves = []
            for v in vshards[100:110]:
                t = time.perf_counter()
                moved = move_vshards(s0, s1, [v])
                moves.append(time.perf_counter() - t)
            print(f"move one virtual shard (the last: {moved.sessions} sessions, {moved.queued} "
                  f"queued, {moved.inflight} inflight): median {ms(statistics.median(moves))}, "
                  f"max {ms(max(moves))} (10 moves, sync {'on' if sync else 'off'})")
            t = time.perf_counter()
            moved = move_vshards(s0, s1, vshards[200:264])
            print(f"move 64 virtual shards ({moved.sessions} sessions): "
                  f"{ms(time.perf_counter() - t)}")
        as_older_schema(data / "shard-000", 5)
        t = time.perf_counter()
        with ShardStore.open(data, 0, 2) as s0:
            assert s0.get_meta("schema_version") == 6
            left = s0.counts()["sessions"]
        print(f"upgrade from schema 5 at open ({left} sessions): "
              f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
