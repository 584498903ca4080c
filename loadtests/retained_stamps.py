"""What stamping retained messages costs the retained store (``storage/stamps.py``).

    python -m loadtests.retained_stamps [--messages 100000] [--writes 20000]

In a temporary directory, without fsync (the store's own work, not the disk's):

* a retained write in a transaction of its own (a turn of the loop with one retained
  PUBLISH), and 100 per transaction, over 1,000 topics: each write now also reads and writes
  the topic's stamps row;
* with MESSAGES retained messages (64-byte payloads): the digest (``RetainedStore.digest``, a
  scan of the store), and reading every entry in the pages of a catch-up (``entries``, 256 a
  page), per page.

The write figures run against any version of the store (the digest and pages only where
they exist), so the same command compares a checkout from before the stamps.

    python -m loadtests.retained_stamps --catch-up 100000

Two nodes' worker 0 cores over the real bus (``tests/unit/test_retained_bus.py``: loopback
``tcp://`` with CURVE, one event loop): the time from ``peer_added`` until the second node's
store holds every message of the first, and the worker's loop turns it took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.lmdb_store import RetainedStore
from shardbroker.storage.records import StoredMessage

PAYLOAD = bytes(64)


def message(topic: str) -> StoredMessage:
    return StoredMessage(topic, PAYLOAD, 1, True, NO_PROPERTIES)


def writes(data: Path, count: int, per_txn: int) -> float:
    """Seconds per retained write."""
    with RetainedStore.open(data, sync=False, max_map_size=8 << 30) as r:
        r.write([(f"warm/{i}", message(f"warm/{i}")) for i in range(1000)])
        start = time.perf_counter()
        for n in range(0, count, per_txn):
            r.write([(f"bench/{i % 1000}", message(f"bench/{i % 1000}")) for i in range(n, n + per_txn)])
        return (time.perf_counter() - start) / count


def catch_up(count: int) -> None:
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
    from test_retained_bus import Member, run_until

    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Member(Path(tmp), "n1", 1, loop), Member(Path(tmp), "n2", 2, loop)
        try:
            for n in range(0, count, 10_000):
                a.retained.write([(f"fleet/{i:07d}/state", message(f"fleet/{i:07d}/state"))
                                  for i in range(n, min(n + 10_000, count))])
            to_b, to_a = a.reach(b), b.reach(a)
            start = time.perf_counter()
            a.broker.peers.peer_added(to_b)
            b.broker.peers.peer_added(to_a)
            done = run_until(loop, lambda: not a.broker.retained_sync.catching_up
                             and b.retained.count() == count, timeout=600)
            took = time.perf_counter() - start
            same = a.retained.digest() == b.retained.digest()
            print(f"catch-up of {count} retained messages over the bus: {took:.2f} s "
                  f"({count / took:,.0f}/s), complete {done}, digests equal {same}")
        finally:
            a.close()
            b.close()
            loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--catch-up", type=int, default=0, metavar="N",
                        help="instead: N messages caught up between two nodes over the bus")
    args = parser.parse_args()
    if args.catch_up:
        catch_up(args.catch_up)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for per_txn in (1, 100):
            best = min(writes(root / f"w{per_txn}-{k}", args.writes, per_txn) for k in range(3))
            print(f"retained write, {per_txn} per transaction: {best * 1e6:.1f} us (best of 3)")
        with RetainedStore.open(root / "big", sync=False, max_map_size=8 << 30) as r:
            for n in range(0, args.messages, 10_000):
                r.write([(f"fleet/{i:07d}/state", message(f"fleet/{i:07d}/state"))
                         for i in range(n, min(n + 10_000, args.messages))])
            if not hasattr(r, "digest"):
                return
            start = time.perf_counter()
            count, digest = r.digest()
            took = time.perf_counter() - start
            print(f"digest of {count} retained messages: {took * 1e3:.0f} ms ({digest:016x})")
            start = time.perf_counter()
            after: bytes | None = b""
            pages = entries = 0
            while after is not None:
                page, after = r.entries(after, 256)
                pages += 1
                entries += len(page)
            took = time.perf_counter() - start
            print(f"catch-up pages: {entries} entries in {pages} pages of 256, {took * 1e3:.0f} ms "
                  f"({took / pages * 1e3:.2f} ms a page)")


if __name__ == "__main__":
    main()
