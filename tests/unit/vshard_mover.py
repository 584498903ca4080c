"""Moves virtual shards back and forth between the 2 shard stores of a data directory until
killed (the subprocess of ``test_vshards.test_sigkill_during_moves``).

Usage: ``python vshard_mover.py DATA_DIR SEED``. It opens both stores through
``open_shards`` (so it recovers what the previous, killed, mover left), prints ``ready``,
then moves random sets of virtual shards from one store to the other with small batches
(many commits, so a kill lands between any two of them), printing ``moved N`` after each,
and ``copied`` when a move passes its point of no return (its target's mark set to copied,
its source's rows about to be deleted), so that the test can kill it there however slow
the machine is.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import shardbroker.storage.vshards as vs


def main() -> None:
    data_dir, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    vs.SESSIONS_PER_COMMIT = 3  # type: ignore[misc]
    vs.OPS_PER_COMMIT = 10  # type: ignore[misc]
    finish = vs._finish

    def announced_finish(*args: Any) -> None:
        print("copied", flush=True)
        finish(*args)

    vs._finish = announced_finish  # type: ignore[assignment]
    said: list[str] = []
    with vs.open_shards(data_dir, 2, sync=False, said=said) as stores:
        print("ready", *said, sep="\n", flush=True)
        for n in range(1, 1_000_000):
            source = stores[n % 2]
            counts = source.vshard_counts()
            if not counts:
                continue
            chosen = rng.sample(sorted(counts), max(1, len(counts) // 3))
            vs.move_vshards(source, stores[1 - n % 2], chosen)
            print(f"moved {n}", flush=True)


if __name__ == "__main__":
    main()
