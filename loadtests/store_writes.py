"""Bulk writes to one shard store: a session, a message and a queue row per client.

    python loadtests/store_writes.py [--clients 200000] [--rounds 3]

Writes ``--clients`` new clients in commits of 1,000 (sync off), ``--rounds`` times into the
same store (so later rounds insert into a large tree), once with client IDs that sort in
the order they are written (``c0000001``, ...) and once with random ones; prints the time
per client of each round. Only the ``ShardStore`` and ``Batch`` API is used, so the same
script measures any schema's code.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.lmdb_store import ShardStore
from shardbroker.storage.records import SessionRecord, StoredMessage


def run(ids: list[str], rounds: int) -> list[float]:
    per_client: list[float] = []
    msg = StoredMessage("t", b"x" * 32, 1, False, NO_PROPERTIES)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, \
            ShardStore.open(Path(tmp), 0, 1, sync=False, max_map_size=8 << 30) as store:
        for rnd in range(rounds):
            started = time.perf_counter()
            for start in range(0, len(ids), 1000):
                b = store.batch()
                for cid in ids[start:start + 1000]:
                    cid = f"{cid}-{rnd}"
                    b.put_session(SessionRecord(cid, 5, 60, None))
                    b.enqueue(cid, b.add_message(msg), 1)
                b.commit()
            per_client.append((time.perf_counter() - started) / len(ids))
    return per_client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(5)
    for name, ids in (("sorted IDs", [f"c{i:07d}" for i in range(args.clients)]),
                      ("random IDs", [f"{rng.getrandbits(64):016x}" for _ in range(args.clients)])):
        rounds = run(ids, args.rounds)
        print(f"{name}: " + ", ".join(f"{1e6 * x:.1f} us" for x in rounds) + " per client")


if __name__ == "__main__":
    main()
