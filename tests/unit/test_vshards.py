"""Moving virtual shards between shard stores (``storage/vshards.py``).

A store of 2 shards, shard 0 filled by ``vshard_data.populate`` (sessions in many virtual
shards with queues, shared and held messages, inflight rows in every state, QoS 2 ids, a
hashed client key). A move must leave the same ``model`` (every client once, queues in
order, inflight and QoS 2 ids the same) with exactly the clients of the moved virtual
shards in the target, and ``check()`` clean in both stores (reference counts equal to the
rows naming each message), before and after a reopen. A crash is simulated at every
commit of a move (an exception that nothing catches, as a kill); the stores opened again
are refused by a plain open and recovered by ``open_shards``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from vshard_data import LONG_ID, model, populate

import shardbroker.storage.vshards as vs
from shardbroker.storage.lmdb_store import ShardStore, StoreError, vshard_of
from shardbroker.storage.vshards import Selection, move_vshards, open_shards, pending, transfer


@pytest.fixture
def data(tmp_path: Path) -> Path:
    populate(tmp_path, sync=False)
    return tmp_path


def open_both(data: Path) -> list[ShardStore]:
    return [ShardStore.open(data, i, 2, sync=False) for i in range(2)]


def close(stores: list[ShardStore]) -> None:
    for s in stores:
        s.close()


def rows_are_consistent(data: Path) -> None:
    """Read-only, as the rows are (a writable open would delete an unreferenced message):
    every message row named by a queue or inflight row and every named message there, in
    each store, whatever the state of a move; its marks aside."""
    for i in range(2):
        with ShardStore.open(data, i, 2, readonly=True) as s:
            assert [p for p in s.check() if "did not finish" not in p] == [], i


def chosen(data: Path, k: int = 5) -> list[int]:
    """Some virtual shards that shard 0 holds, the long client id's among them."""
    with ShardStore.open(data, 0, 2, readonly=True) as s:
        counts = s.vshard_counts()
    picked = sorted(counts)[::max(1, len(counts) // k)][:k]
    return sorted({*picked, vshard_of(LONG_ID)})


def test_enumeration_by_virtual_shard(data: Path) -> None:
    with ShardStore.open(data, 0, 2, readonly=True) as s:
        counts = s.vshard_counts()
        everyone = {rec.client_id for rec in s.sessions()}
        assert sum(counts.values()) == len(everyone) == 120
        for v in list(counts)[:20]:
            got = [rec.client_id for rec in s.vshard_sessions([v])]
            assert len(got) == counts[v] and {vshard_of(c) for c in got} == {v}
        assert {rec.client_id for rec in s.vshard_sessions(counts)} == everyone


def test_move_takes_exactly_the_chosen_virtual_shards(data: Path) -> None:
    vshards = chosen(data)
    stores = open_both(data)
    before, _ = model(stores)
    moving = {c for c in before if vshard_of(c) in vshards}
    try:
        moved = move_vshards(stores[0], stores[1], vshards)
        assert moved.sessions == len(moving) and moved.queued > 0 and moved.inflight > 0
        after, where = model(stores)
        assert after == before
        assert {c for c, shard in where.items() if shard == 1} == moving
        assert stores[0].check() == [] and stores[1].check() == []
        assert set(stores[1].vshard_counts()) == set(vshards)
        assert not set(stores[0].vshard_counts()) & set(vshards)
    finally:
        close(stores)
    assert not pending(data, 2)
    stores = open_both(data)  # reference counts rebuilt from the rows
    try:
        assert model(stores)[0] == before
        assert stores[0].check() == [] and stores[1].check() == []
        move_vshards(stores[1], stores[0], vshards)  # and back
        after, where = model(stores)
        assert after == before and set(where.values()) == {0}
        assert stores[0].check() == [] and stores[1].check() == [] and stores[1].counts() == {
            "sessions": 0, "queued": 0, "inflight": 0, "qos2_incoming": 0, "messages": 0,
            "outbox": 0}
    finally:
        close(stores)


def test_a_shared_message_is_stored_once_per_target_and_counted(data: Path) -> None:
    stores = open_both(data)
    try:
        transfer(stores[0], [(stores[1], Selection())])
        refs = {m.topic: n for _, n, m in stores[1].messages()}
        queued = sum(1 for _, _, _, m in (row for c in model(stores)[0]
                                          for row in stores[1].queue(c)) if m.topic == "t/shared")
        inflight = sum(1 for c in model(stores)[0] for _, _, m in stores[1].inflight(c)
                       if m is not None and m.topic == "t/shared")
        assert refs["t/shared"] == queued + inflight > 2
        assert stores[1].check() == []
    finally:
        close(stores)


def test_a_selection_by_worker_count_splits_a_store(data: Path) -> None:
    stores = [ShardStore.open(data, i, 2, sync=False) for i in range(2)]
    before, _ = model(stores)
    try:
        transfer(stores[0], [(stores[1], Selection(workers=3, worker=1))])
        after, where = model(stores)
        assert after == before
        from shardbroker.sharding import shard_for
        assert all((shard == 1) == (shard_for(c, 3) == 1) for c, shard in where.items())
    finally:
        close(stores)


def test_a_client_in_both_stores_is_refused_before_any_write(data: Path) -> None:
    stores = open_both(data)
    try:
        rec = next(iter(stores[0].sessions()))
        with stores[1].batch() as b:
            b.put_session(rec)
        before = model([stores[0]])[0], model([stores[1]])[0]
        with pytest.raises(StoreError, match="already; refusing to move it"):
            move_vshards(stores[0], stores[1], [vshard_of(rec.client_id)])
        assert (model([stores[0]])[0], model([stores[1]])[0]) == before
        assert not [k for k, _ in stores[0].meta_items() if k.startswith("move.")]
    finally:
        close(stores)


def test_a_failure_while_copying_is_taken_back_at_once(data: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    vshards = frozenset(chosen(data))
    stores = open_both(data)
    before, _ = model(stores)
    calls = iter(range(1000))
    real = vs._copy_session

    def flaky(*a: Any) -> None:
        if next(calls) == 4:
            raise StoreError("injected failure")
        real(*a)

    monkeypatch.setattr(vs, "_copy_session", flaky)
    try:
        with pytest.raises(StoreError, match="injected"):
            transfer(stores[0], [(stores[1], Selection(vshards))],
                     sessions_per_commit=1)
        after, where = model(stores)
        assert after == before and set(where.values()) == {0}
        assert stores[1].check() == [] and stores[1].counts()["messages"] == 0
    finally:
        close(stores)
    assert not pending(data, 2)


class Crash(BaseException):
    """A kill: nothing in the move catches it."""


def _commits_of_a_move(data: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    n = 0
    real = ShardStore._commit

    def counting(self: ShardStore, *a: Any) -> None:
        nonlocal n
        n += 1
        real(self, *a)

    monkeypatch.setattr(ShardStore, "_commit", counting)
    vshards = chosen(data, 15)
    stores = open_both(data)
    try:
        move_vshards(stores[0], stores[1], vshards)  # a dry run on a copy of the data
    finally:
        close(stores)
    monkeypatch.undo()
    return n


def test_a_crash_at_every_commit_of_a_move_is_recovered(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vs, "SESSIONS_PER_COMMIT", 2)
    monkeypatch.setattr(vs, "OPS_PER_COMMIT", 6)
    populate(tmp_path / "dry", sessions=40, sync=False)
    total = _commits_of_a_move(tmp_path / "dry", monkeypatch)
    monkeypatch.setattr(vs, "SESSIONS_PER_COMMIT", 2)
    monkeypatch.setattr(vs, "OPS_PER_COMMIT", 6)
    assert total > 15
    outcomes: set[str] = set()
    real = ShardStore._commit
    for k in range(total):
        data = tmp_path / f"k{k}"
        populate(data, sessions=40, sync=False)
        vshards = chosen(data, 15)
        stores = open_both(data)
        before, _ = model(stores)
        moving = {c for c in before if vshard_of(c) in vshards}
        n = 0

        def crashing(self: ShardStore, *a: Any, stop: int = k) -> None:
            nonlocal n
            if n == stop:
                raise Crash
            n += 1
            real(self, *a)

        monkeypatch.setattr(ShardStore, "_commit", crashing)
        with pytest.raises(Crash):
            move_vshards(stores[0], stores[1], vshards)
        monkeypatch.setattr(ShardStore, "_commit", real)
        close(stores)
        rows_are_consistent(data)
        if pending(data, 2):
            with pytest.raises(StoreError, match="a move of virtual shards that did not finish"):
                ShardStore.open(data, 0, 2).close()
        said: list[str] = []
        with open_shards(data, 2, sync=False, said=said) as reopened:
            after, where = model(reopened)
            assert after == before, k
            held = {c for c, shard in where.items() if shard == 1}
            assert held in (set(), moving), k  # all or nothing
            assert reopened[0].check() == [] and reopened[1].check() == [], k
            outcomes.add("moved" if held else "not moved")
            outcomes.update(line.split()[0] for line in said)
        assert not pending(data, 2)
        rows_are_consistent(data)
    assert outcomes == {"moved", "not moved", "finished", "undid"}


def test_a_partial_copy_is_never_recovered(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stores = open_both(data)
    real = vs._copy_session
    calls = iter(range(1000))

    def crash(*a: Any) -> None:
        if next(calls) == 3:
            raise Crash
        real(*a)

    monkeypatch.setattr(vs, "_copy_session", crash)
    with pytest.raises(Crash):
        transfer(stores[0], [(stores[1], Selection())], keep_source=True, sessions_per_commit=1)
    close(stores)
    with pytest.raises(StoreError, match="partial copy of another store; discard it"), \
            open_shards(data, 2, sync=False):
        pass


MOVER = Path(__file__).with_name("vshard_mover.py")
KILLS = 30


def _start_mover(data: Path, seed: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(MOVER.parent), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.Popen([sys.executable, str(MOVER), str(data), str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_moves(tmp_path: Path) -> None:
    """A process moving virtual shards back and forth is killed (SIGKILL) after a random
    delay, KILLS times (every third time right after a move passed its point of no return,
    so that kills land after a copy as well as during one on a slow machine). Each time the rows are read as the kill left them (every message row
    named, every named message there); then, every other time, both stores are opened
    (recovering) and checked: every session exactly once and as it was, the reference
    counts equal to the rows, no mark left. The other times recovery is left to the next
    mover, which may be killed in turn."""
    populate(tmp_path, sessions=150, sync=False)
    with ShardStore.open(tmp_path, 0, 2, readonly=True) as s0, \
            ShardStore.open(tmp_path, 1, 2, readonly=True) as s1:
        before, _ = model([s0, s1])
    rng = random.Random(1234)
    recovered: list[str] = []
    killed_after: list[int] = []
    for i in range(KILLS):
        mover = _start_mover(tmp_path, i)
        assert mover.stdout is not None
        lines = [mover.stdout.readline().strip()]
        while lines[-1] != "ready":
            assert lines[-1], f"mover ended: {mover.stderr.read() if mover.stderr else ''}"
            lines.append(mover.stdout.readline().strip())
        recovered += [x for x in lines if x and x not in ("ready", "copied")]  # copied: recovery finishing
        seen = ""
        if i % 3 == 2:
            while (line := mover.stdout.readline()) and line.strip() != "copied":
                seen += line
            assert line, f"mover ended: {mover.stderr.read() if mover.stderr else ''}"
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        mover.send_signal(signal.SIGKILL)
        out, _err = mover.communicate(timeout=30)
        assert mover.returncode == -signal.SIGKILL
        killed_after.append((seen + out).count("moved"))
        rows_are_consistent(tmp_path)
        if i % 2 and i != KILLS - 1:
            continue
        said: list[str] = []
        with open_shards(tmp_path, 2, sync=False, said=said) as stores:
            recovered += said
            after, _where = model(stores)
            assert after == before, f"kill {i}"
            assert stores[0].check() == [] and stores[1].check() == [], f"kill {i}"
        assert not pending(tmp_path, 2)
        rows_are_consistent(tmp_path)
    assert sum(killed_after) > KILLS, killed_after  # the movers did move between kills
    assert len(set(killed_after)) > 3, killed_after  # killed at different points
    kinds = {line.split()[0] for line in recovered}
    assert kinds == {"finished", "undid"}, recovered  # kills both before and after the copy


def test_store_reshard_recovers_an_interrupted_move(data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A move killed after its copy: the store refuses a plain writable open, ``check()`` names
    the mark, and ``store reshard`` with the same worker count finishes the move."""
    from typer.testing import CliRunner

    from shardbroker.cli.store import app

    vshards = chosen(data)
    stores = open_both(data)
    before, _ = model(stores)

    def crash(*_a: Any) -> None:
        raise Crash

    monkeypatch.setattr(vs, "_finish", crash)
    with pytest.raises(Crash):
        move_vshards(stores[0], stores[1], vshards)
    monkeypatch.undo()
    close(stores)
    with ShardStore.open(data, 1, 2, readonly=True) as s:
        assert [p for p in s.check() if "did not finish" in p]
    result = CliRunner().invoke(app, ["reshard", "--data-dir", str(data), "--workers", "2",
                                      "--yes", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "finished an interrupted move from shard-000 to shard-001" in result.stderr
    assert f"{data} already has 2 shard(s): nothing to do" in result.stdout
    with open_shards(data, 2, sync=False) as reopened:
        after, where = model(reopened)
        assert after == before
        assert {c for c, shard in where.items() if shard == 1} == {
            c for c in before if vshard_of(c) in vshards}
        assert reopened[0].check() == [] and reopened[1].check() == []
