"""A data directory's layout (``storage/layout.py``): the stores follow a cluster node's table
of virtual shard -> worker, and back to the hash of the client ID, with every session's state
kept (``vshard_data.model``); arranging again moves nothing; a kill in the middle of arranging
is recovered by the next one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vshard_data import model, populate

import shardbroker.storage.vshards as vs
from shardbroker.cluster.grant import local_owners
from shardbroker.sharding import shard_for
from shardbroker.storage.layout import arrange, layouts
from shardbroker.storage.lmdb_store import ShardStore, vshard_of

SIZES = {"map_size": 64 << 20, "max_map_size": 1 << 30, "sync": False}


def read(data: Path, shards: int = 2) -> tuple[Any, dict[str, int]]:
    stores = [ShardStore.open(data, i, shards, readonly=True) for i in range(shards)]
    try:
        return model(stores)
    finally:
        for s in stores:
            s.close()


class Crash(BaseException):
    """A kill: nothing in the move catches it."""


def test_stores_follow_a_table_and_come_back_to_the_hash(tmp_path: Path) -> None:
    populate(tmp_path, sync=False)
    before, _ = read(tmp_path)
    table = local_owners("n1", 2, 1024)
    done = arrange(tmp_path, 2, "rendezvous:n1", table, **SIZES)  # type: ignore[arg-type]
    after, where = read(tmp_path)
    assert after == before and done.moved > 0
    assert all(where[cid] == table[vshard_of(cid)] for cid in where)
    assert layouts(tmp_path, 2) == ["rendezvous:n1", "rendezvous:n1"]
    again = arrange(tmp_path, 2, "rendezvous:n1", table, **SIZES)  # type: ignore[arg-type]
    assert again.moved == 0 and again.lines == []

    back = arrange(tmp_path, 2, None, None, **SIZES)  # type: ignore[arg-type]
    after, where = read(tmp_path)
    assert after == before and back.moved > 0
    assert all(where[cid] == shard_for(cid, 2) for cid in where)
    assert layouts(tmp_path, 2) == [None, None]


def test_a_kill_while_arranging_is_recovered_by_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(tmp_path, sync=False)
    before, _ = read(tmp_path)
    table = local_owners("n7", 2, 1024)
    calls = iter(range(10_000))
    real = vs._copy_session

    def killed(*a: Any) -> None:
        if next(calls) == 30:
            raise Crash
        real(*a)

    monkeypatch.setattr(vs, "_copy_session", killed)
    with pytest.raises(Crash):
        arrange(tmp_path, 2, "rendezvous:n7", table, **SIZES)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert layouts(tmp_path, 2) == [None, None]  # the new layout is not recorded yet
    with pytest.raises(Exception, match="did not finish"):
        ShardStore.open(tmp_path, 0, 2, sync=False)  # a worker would refuse the store
    done = arrange(tmp_path, 2, "rendezvous:n7", table, **SIZES)  # type: ignore[arg-type]
    assert any("interrupted move" in line for line in done.lines)
    after, where = read(tmp_path)
    assert after == before
    assert all(where[cid] == table[vshard_of(cid)] for cid in where)
