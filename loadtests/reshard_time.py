"""How long ``store reshard`` takes (wall clock and CPU of this process): a 2-shard data
directory of SESSIONS sessions (one subscription and two queued QoS 1 messages each)
resharded to 3 workers.

    python loadtests/reshard_time.py [--sessions 50000]

Only the ``ShardStore``/``Batch`` API and ``storage/reshard.py`` are used, so the same script
times the code of any schema.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.sharding import shard_for
from shardbroker.storage import reshard
from shardbroker.storage.lmdb_store import ShardStore
from shardbroker.storage.records import SessionRecord, StoredMessage, StoredSubscription


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50_000)
    args = parser.parse_args()
    msg = StoredMessage("t", bytes(64), 1, False, NO_PROPERTIES)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        data = Path(tmp) / "data"
        stores = [ShardStore.open(data, i, 2, sync=False) for i in range(2)]
        batches = [s.batch() for s in stores]
        for n in range(args.sessions):
            cid = f"device-{n:07d}"
            b = batches[shard_for(cid, 2)]
            b.put_session(SessionRecord(cid, 5, 86400, 1.75e9,
                                        (StoredSubscription("fleet/#", 1),), None))
            for _ in range(2):
                b.enqueue(cid, b.add_message(msg), 1)
            if len(b) > 20_000:
                b.commit()
        for b in batches:
            b.commit()
        for s in stores:
            s.close()
        started, cpu = time.perf_counter(), time.process_time()
        result = reshard.reshard(data, 3)
        assert result is not None
        print(f"reshard 2 -> 3 workers: {time.perf_counter() - started:.2f} s, "
              f"{time.process_time() - cpu:.2f} s of CPU ({result.totals.describe()})")


if __name__ == "__main__":
    main()
