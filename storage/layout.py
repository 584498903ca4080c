"""Which worker's store holds which client: the layout of a data directory, and changing it.

A broker on one host gives a client to worker ``shard_for(client_id, workers)`` (the *hash*
layout, which every store had before clustering). A cluster node gives it to the worker the
shard map names for its virtual shard, which is a fixed table per node (``cluster.grant.
local_owners``): the *table* layout, named ``rendezvous:<node>``. Before its workers start,
the supervisor makes the stores follow the layout it is about to serve with (``arrange``), so
that a session stored before is where its client will be sent.

Each shard store keeps the name of its layout in its meta (``layout``; absent: hash). A
change moves, from each store, the sessions the new layout gives to another worker, with
``vshards.transfer`` (crash-safe: marks, recovery), and only then writes the new name into
every store; a kill before that leaves the old name, and the next start recovers the moves
that were under way (``vshards.recover``) and arranges again, which moves what is left.
Arranging for the layout the stores already have moves nothing and opens them read-only
only (a meta read and a look for move marks per store).

Outbox rows stay where they are: a durable forward between workers is matched by its
receiver against the receiver's own sessions, so one that a stop left unapplied must be
applied *before* the sessions move. ``arrange`` calls ``before_moving`` with the open stores
for that (the supervisor passes ``process/drain.deliver_pending``, which runs each receiver's
broker core offline); forwards already applied are only acknowledged at the next start. It
runs before the workers start, never under them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from shardbroker.storage.lmdb_store import VIRTUAL_SHARDS, ShardStore, shard_dir_name
from shardbroker.storage.vshards import Selection, pending, recover, transfer

__all__ = ["LAYOUT_KEY", "Arranged", "arrange", "layouts"]

LAYOUT_KEY: Final = "layout"


class Arranged:
    """What ``arrange`` did: lines for the log, and how many sessions moved."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.moved = 0


def layouts(data_dir: Path, shards: int) -> list[str | None]:
    """The layout name each existing shard store records (None: hash), read-only."""
    out: list[str | None] = []
    for i in range(shards):
        if not (Path(data_dir) / shard_dir_name(i) / "data.mdb").exists():
            continue
        with ShardStore.open(Path(data_dir), i, shards, readonly=True) as s:
            value = s.get_meta(LAYOUT_KEY)
            out.append(value if isinstance(value, str) else None)
    return out


def _selection(table: Sequence[int] | None, shards: int, worker: int) -> Selection:
    if table is None:
        return Selection(None, shards, worker)
    return Selection(frozenset(v for v, w in enumerate(table) if w == worker))


def arrange(data_dir: Path, shards: int, name: str | None, table: Sequence[int] | None, *,
            map_size: int, max_map_size: int, sync: bool,
            before_moving: Callable[[Sequence[ShardStore]], list[str]] | None = None) -> Arranged:
    """Make every shard store of ``data_dir`` follow a layout: ``table`` (the worker of each of
    the store's 1024 virtual shards) named ``name``, or the hash layout (both None). Creates the
    stores that do not exist yet, so that they record the layout too. The caller holds the
    data directory's lock and no worker runs. ``before_moving(stores)``, when the layout does
    change, runs before any session moves (after the recovery of interrupted moves) and returns
    lines for the log."""
    if (name is None) != (table is None):
        raise ValueError("a table layout has a name; the hash layout neither")
    if table is not None and (len(table) != VIRTUAL_SHARDS
                              or any(not 0 <= w < shards for w in table)):
        raise ValueError(f"a layout table gives each of {VIRTUAL_SHARDS} virtual shards a worker")
    done = Arranged()
    found = layouts(data_dir, shards)
    if len(found) == shards and all(f == name for f in found) and not pending(data_dir, shards):
        return done  # as it should be: read-only opens only
    stores: list[ShardStore] = []
    try:
        for i in range(shards):
            stores.append(ShardStore.open(Path(data_dir), i, shards, map_size=map_size,
                                          max_map_size=max_map_size, sync=sync, moves=True))
        done.lines += recover(stores)
        if all(s.get_meta(LAYOUT_KEY) == name for s in stores):
            return done
        if before_moving is not None:
            done.lines += before_moving(stores)
        for source in stores:
            parts = [(target, _selection(table, shards, target.shard)) for target in stores
                     if target is not source]
            for moved in transfer(source, parts):
                done.moved += moved.sessions
        for s in stores:
            with s.batch() as b:
                if name is None:
                    b.delete_meta(LAYOUT_KEY)
                else:
                    b.set_meta(LAYOUT_KEY, name)
        done.lines.append(f"stores arranged for the {name or 'hash'} layout: {done.moved} sessions"
                          " moved between workers")
        return done
    finally:
        for s in stores:
            s.close()
