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


def _forward_left_undelivered(data: Path) -> tuple[str, str]:
    """Shard 1 holds the persistent session of a subscriber of ``t/#`` (offline); shard 0 took
    a QoS 1 publish to ``t/x`` from a client (PUBACK sent), forwarded durably to shard 1 (its
    outbox row committed), and stopped before shard 1 applied it. Returns (subscriber, payload)."""
    from core_harness import Harness

    from shardbroker.protocol.packets import Disconnect, PubAck, Publish, Subscribe, Subscription

    sub = next(f"sub{i}" for i in range(1000) if shard_for(f"sub{i}", 2) == 1)
    h1 = Harness(data, shard=1, shards=2, peers=[0])
    c = h1.connect(sub, clean=False)
    c.send(Subscribe(1, (Subscription("t/#", 1),)))
    c.send(Disconnect())
    h1.close()
    pub = next(f"pub{i}" for i in range(1000) if shard_for(f"pub{i}", 2) == 0)
    h0 = Harness(data, shard=0, shards=2, peers=[1])
    p = h0.connect(pub)
    p.send(Publish("t/x", b"kept", qos=1, packet_id=7))
    assert any(isinstance(pkt, PubAck) and pkt.packet_id == 7 for pkt in p.packets())
    h0.close()
    with ShardStore.open(data, 0, 2, readonly=True) as s0:
        assert [peer for peer, _seq, _row in s0.outbox()] == [1]
    return sub, "kept"


def test_a_forward_left_undelivered_reaches_its_session_when_the_layout_changes(tmp_path: Path) -> None:
    """The layout moves the subscriber's session from worker 1 to worker 0; the forward shard 0
    holds for shard 1 is applied by shard 1's core offline first, so the message moves with the
    session (without that step, shard 1 would get it at the next start and find no session)."""
    from shardbroker.config import load_config
    from shardbroker.process.drain import deliver_pending, undelivered

    sub, payload = _forward_left_undelivered(tmp_path)
    config = load_config(None, {"server.data_dir": str(tmp_path)})
    table = [0] * 1024  # every client to worker 0
    seen: list[int] = []

    def before(stores: Any) -> list[str]:
        seen.append(sum(len(v) for v in undelivered(stores).values()))
        return deliver_pending(config, tmp_path, stores)

    done = arrange(tmp_path, 2, "test:all-on-0", table, before_moving=before, **SIZES)  # type: ignore[arg-type]
    assert seen == [1]
    assert any("applied 1 durable forwards from shards 0" in line for line in done.lines), done.lines
    with ShardStore.open(tmp_path, 0, 2, readonly=True) as s0, \
            ShardStore.open(tmp_path, 1, 2, readonly=True) as s1:
        assert s0.has_session(sub) and not s1.has_session(sub)
        assert [m.payload for _seq, _id, _qos, m in s0.queue(sub)] == [payload.encode()]
        assert undelivered([s0, s1]) == {}  # applied: at the next start only acknowledged


def test_without_the_offline_step_the_moved_session_would_miss_the_forward(tmp_path: Path) -> None:
    """The case the step is for, shown: arranged with no ``before_moving``, the session moves
    without the message, and the forward is still pending for a shard that no longer holds it."""
    from shardbroker.process.drain import undelivered

    sub, _payload = _forward_left_undelivered(tmp_path)
    arrange(tmp_path, 2, "test:all-on-0", [0] * 1024, **SIZES)  # type: ignore[arg-type]
    with ShardStore.open(tmp_path, 0, 2, readonly=True) as s0, \
            ShardStore.open(tmp_path, 1, 2, readonly=True) as s1:
        assert s0.has_session(sub) and s0.queue(sub) == []
        assert [len(v) for v in undelivered([s0, s1]).values()] == [1]
