"""The store's part of QoS 1 to persistent sessions, alone: CPU microseconds per message.

    python -m loadtests.store_inflight [--sessions 50] [--per-commit 200] [--commits 2000]
    python -m loadtests.store_inflight --lmdb-store /tmp/old_lmdb_store.py   # another version

What a worker's store does for each message of ``persistent-qos1``, through the ``Batch``
API as the core calls it: the message added and put in flight to a session (one
``StoredMessage`` and one ``InflightRecord`` made per message, as ``core/delivery.py``
does), the batch committed, and the inflight row deleted in the next commit (the PUBACK).
With ``--queued`` each message is queued first and put in flight by the next commit, as
when the subscriber's window is full (most messages of one of the two workers in the bench).
``--per-commit`` messages per commit (the bench's workers commit about 200 per event-loop
turn), spread over ``--sessions`` sessions, sync off (the fsync is the disk's time, not the
process's). Prints the process CPU time per message of each of ``--rounds`` rounds.
``--lmdb-store FILE`` loads ``ShardStore`` from FILE instead (e.g. the module of an
earlier commit, ``git show REV:storage/lmdb_store.py > FILE``) to compare versions in
the same interpreter and build.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.records import AWAIT_PUBACK, InflightRecord, SessionRecord, StoredMessage


def load_store(path: str | None) -> Any:
    """``ShardStore`` from ``shardbroker.storage.lmdb_store``, or from the file ``path``."""
    if path is None:
        from shardbroker.storage.lmdb_store import ShardStore
        return ShardStore
    spec = importlib.util.spec_from_file_location("store_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.ShardStore


def run(store_cls: Any, data: Path, sessions: int, per_commit: int, commits: int, queued: bool) -> float:
    """CPU seconds per message over ``commits`` commits."""
    ids = [f"bs{i}-persist-0" for i in range(sessions)]
    with store_cls.open(data, 0, 1, sync=False) as store:
        b = store.batch()
        for cid in ids:
            b.put_session(SessionRecord(cid, 4, 3600, None))
        b.commit()
        pids = [0] * sessions
        waiting: list[tuple[str, int, int]] = []  # queued by the previous turn: client, seq, msg_id
        acked: list[tuple[str, int]] = []  # put in flight by the previous turn
        payload = b"x" * 64
        started = time.process_time()
        for _ in range(commits):
            b = store.batch()
            for cid, pid in acked:  # their PUBACKs
                b.delete_inflight(cid, pid)
            acked = []
            for cid, seq, msg_id in waiting:  # room in the window: out of the queue, in flight
                i = int(cid[2:cid.index("-")])
                pid = pids[i] = pids[i] % 65535 + 1
                b.dequeue(cid, seq)
                b.put_inflight(cid, pid, InflightRecord(msg_id, 1, AWAIT_PUBACK))
                acked.append((cid, pid))
            waiting = []
            for k in range(per_commit):
                i = k % sessions
                cid = ids[i]
                msg = StoredMessage(f"bench/persist/{i}", payload, 1, False, NO_PROPERTIES, None)
                msg_id = b.add_message(msg)
                if queued:
                    waiting.append((cid, b.enqueue(cid, msg_id, 1), msg_id))
                else:
                    pid = pids[i] = pids[i] % 65535 + 1
                    b.put_inflight(cid, pid, InflightRecord(msg_id, 1, AWAIT_PUBACK))
                    acked.append((cid, pid))
            b.commit()
        spent = time.process_time() - started
    return spent / (commits * per_commit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--per-commit", type=int, default=200)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queued", action="store_true",
                    help="each message queued first, put in flight by the next commit (a full window)")
    ap.add_argument("--lmdb-store", default=None, help="load ShardStore from this file")
    args = ap.parse_args(argv)
    store_cls = load_store(args.lmdb_store)
    for rnd in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="store-inflight-") as tmp:
            per = run(store_cls, Path(tmp), args.sessions, args.per_commit, args.commits, args.queued)
        print(f"round {rnd + 1}: {per * 1e6:.2f} µs of CPU per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
