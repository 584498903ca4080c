"""Offline resharding (``storage/reshard.py`` and ``shardbroker store reshard``).

A 2-shard data directory is populated through the real ``Batch`` API (sessions
with subscriptions and wills, queues, a message shared by two sessions, inflight
rows in every state, incoming QoS 2 ids, a client id longer than an LMDB key).
It is resharded to 3, to 1 and back to 2; after each step every session must be
in ``shard_for(client_id, M)``'s store with the same record, queue (order and
messages), inflight rows (packet ids, states, messages) and QoS 2 ids, and every
store must pass ``check()``. Refusals (non-empty outbox, held broker.lock, bad
arguments) and failures injected before and during the switch, and a crash in
the middle of the switch, must leave the old data byte-for-byte as it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import shardbroker.storage.reshard as rs
from shardbroker.cli.store import app
from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.sharding import shard_for
from shardbroker.storage import vshards
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore, StoreError, data_dir_shards
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    EXPIRY_NEVER,
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
    StoredWill,
)

SMALL = 64 << 10
runner = CliRunner()


def cli(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), input=input)


def msg(topic: str, payload: bytes, qos: int = 1, **kw: Any) -> StoredMessage:
    return StoredMessage(topic, payload, qos, False, kw.pop("properties", NO_PROPERTIES), **kw)


def cid_where(prefix: str, **shards: int) -> str:
    """A client id starting with ``prefix`` whose shard is ``shards["n<N>"]`` for each N."""
    for i in range(100_000):
        cid = f"{prefix}{i}"
        if all(shard_for(cid, int(k[1:])) == v for k, v in shards.items()):
            return cid
    raise AssertionError(f"no client id for {shards}")


# a1, a2 on old shard 0 share a message and land together on one of 3 shards;
# b1, b2 on old shard 1 share a message and land on different shards of 3.
A1 = cid_where("a", n2=0, n3=2)
A2 = cid_where("aa", n2=0, n3=2)
B1 = cid_where("b", n2=1, n3=0)
B2 = cid_where("bb", n2=1, n3=1)
LONG = "long-" + "é" * 300  # 605 UTF-8 bytes: a hashed LMDB key
FILLERS = [f"filler-{i}" for i in range(24)]
PROPS = Properties(user_properties=(("k", "v"),), content_type="text/plain",
                   message_expiry_interval=600)


def populate(d: Path, shards: int = 2) -> Path:
    stores = [ShardStore.open(d, i, shards, map_size=SMALL) for i in range(shards)]
    try:
        batches = [s.batch() for s in stores]

        def b(cid: str) -> Any:
            return batches[shard_for(cid, shards)]

        b(A1).put_session(SessionRecord(
            A1, 5, 3600, 1_700_000_000.5,
            (StoredSubscription("home/#", 1, no_local=True, retain_as_published=True,
                                retain_handling=2, subscription_id=7),
             StoredSubscription("$share/g/work/+", 2)),
            StoredWill("lwt/a1", b"gone", 1, True, PROPS, 30)))
        b(A2).put_session(SessionRecord(A2, 4, EXPIRY_NEVER, 1_700_000_100.0,
                                        (StoredSubscription("home/+/temp", 2),)))
        b(B1).put_session(SessionRecord(B1, 3, EXPIRY_NEVER, None,
                                        (StoredSubscription("x/#", 1),),
                                        StoredWill("lwt/b1", b"", 0, False, NO_PROPERTIES)))
        b(B2).put_session(SessionRecord(B2, 5, 60, 1_700_000_200.0))
        b(LONG).put_session(SessionRecord(LONG, 5, 100, 1_700_000_300.0,
                                          (StoredSubscription("long/#", 1),)))
        # a message shared by a1 and a2 (queue of both, and in flight for a2)
        ba = b(A1)
        shared_a = ba.add_message(msg("home/kitchen/temp", b"21.5", 2, properties=PROPS,
                                      expires_at=1_900_000_000.0))
        ba.enqueue(A1, ba.add_message(msg("home/first", b"first")), 1)
        ba.enqueue(A1, shared_a, 2)
        ba.enqueue(A1, ba.add_message(msg("home/last", b"\x00\xff", 0)), 0)
        ba.enqueue(A2, shared_a, 2)
        ba.put_inflight(A2, 7, InflightRecord(shared_a, 2, AWAIT_PUBREC))
        # inflight in every state for a1
        ba.put_inflight(A1, 1, InflightRecord(ba.add_message(msg("home/p1", b"p1")), 1,
                                              AWAIT_PUBACK))
        ba.put_inflight(A1, 2, InflightRecord(ba.add_message(msg("home/p2", b"p2", 2)), 2,
                                              AWAIT_PUBREC))
        ba.put_inflight(A1, 65535, InflightRecord(None, 2, AWAIT_PUBCOMP))
        ba.add_qos2_incoming(A1, 3)
        ba.add_qos2_incoming(A1, 65000)
        # a message shared by b1 and b2, which go to different new shards
        bb = b(B1)
        shared_b = bb.add_message(msg("x/y", b"shared-b", 1))
        for i in range(3):
            bb.enqueue(B1, bb.add_message(msg("x/q", f"b1-{i}".encode())), 1)
        bb.enqueue(B1, shared_b, 1)
        bb.enqueue(B2, shared_b, 1)
        bb.put_inflight(B2, 9, InflightRecord(None, 2, AWAIT_PUBCOMP))
        bb.put_inflight(B2, 10, InflightRecord(shared_b, 1, AWAIT_PUBACK))
        bb.add_qos2_incoming(B2, 1)
        bl = b(LONG)
        bl.enqueue(LONG, bl.add_message(msg("long/x", b"long")), 1)
        bl.put_inflight(LONG, 4, InflightRecord(bl.add_message(msg("long/y", b"y", 2)), 2,
                                                AWAIT_PUBREC))
        for n, cid in enumerate(FILLERS):
            bf = b(cid)
            bf.put_session(SessionRecord(cid, 4, EXPIRY_NEVER, 1_700_000_000.0 + n,
                                         (StoredSubscription(f"f/{n}", 1),)))
            for k in range(n % 4):
                bf.enqueue(cid, bf.add_message(msg(f"f/{n}", f"{cid}-{k}".encode())), 1)
            if n % 3 == 0:
                bf.put_inflight(cid, 100 + n, InflightRecord(None, 2, AWAIT_PUBCOMP))
        for x in batches:
            x.commit()
        # an old dequeue leaves a gap in the seqs (queue order must still hold)
        with stores[shard_for(A1, shards)].batch() as x:
            first = stores[shard_for(A1, shards)].queue(A1)[0][0]
            x.dequeue(A1, first)
            x.enqueue(A1, x.add_message(msg("home/after-gap", b"gap")), 1)
        with stores[0].batch() as x:
            x.set_meta("handover.next.1", 42)
            x.set_meta("handover.inbox.1", 17)
    finally:
        for s in stores:
            s.close()
    with RetainedStore.open(d, map_size=SMALL) as r:
        r.write([("home/kitchen/temp", StoredMessage("home/kitchen/temp", b"21", 1, True,
                                                     NO_PROPERTIES))])
    return d


def snapshot(d: Path) -> dict[str, dict[str, Any]]:
    """Everything about every session, without store-internal ids."""
    n = data_dir_shards(d)
    assert n is not None
    out: dict[str, dict[str, Any]] = {}
    for i in range(n):
        with ShardStore.open(d, i, n, readonly=True) as s:
            assert s.check() == []
            assert list(s.outbox()) == []
            for rec in s.sessions():
                cid = rec.client_id
                assert cid not in out
                queue = s.queue(cid)
                seqs = [seq for seq, *_ in queue]
                assert seqs == sorted(seqs)
                out[cid] = {
                    "shard": i,
                    "rec": rec,
                    "queue": [(qos, m) for _seq, _mid, qos, m in queue],
                    "inflight": [(pid, r.qos, r.state, r.msg_id is None, m)
                                 for pid, r, m in s.inflight(cid)],
                    "qos2": s.qos2_incoming(cid),
                }
    return out


def without_shard(snap: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {cid: {k: v for k, v in e.items() if k != "shard"} for cid, e in snap.items()}


def retained(d: Path) -> list[tuple[str, StoredMessage]]:
    with RetainedStore.open(d, readonly=True) as r:
        return list(r.scan())


def fingerprint(d: Path) -> dict[str, str]:
    """Names in the data dir (lock file aside) and a digest of every data.mdb."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(d):
        dirs.sort()
        for name in sorted(files) + [x + "/" for x in dirs]:
            rel = os.path.relpath(os.path.join(root, name), d)
            if name == "broker.lock" or name == "lock.mdb":
                continue
            path = Path(root) / name
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest()
                        if path.is_file() else "dir")
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return populate(tmp_path / "data")


@pytest.fixture
def small_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit after every 2 sessions or 5 operations (mid-session commits)."""
    monkeypatch.setattr(rs, "SESSIONS_PER_COMMIT", 2)
    monkeypatch.setattr(rs, "OPS_PER_COMMIT", 5)


def old_dirs(d: Path) -> list[Path]:
    return sorted(d.glob(rs.OLD_PREFIX + "*"))


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".reshard"))


# --------------------------------------------------------------------------- migration


@pytest.mark.parametrize("commits", ["default", "small"])
def test_reshard_3_then_1_then_back_to_2(data: Path, request: pytest.FixtureRequest,
                                         commits: str) -> None:
    if commits == "small":
        request.getfixturevalue("small_commits")
    before = snapshot(data)
    assert {e["shard"] for e in before.values()} == {0, 1}
    kept_retained = retained(data)
    for m in (3, 1, 2):
        lines: list[str] = []
        result = rs.reshard(data, m, progress=lines.append)
        assert result is not None
        assert data_dir_shards(data) == m
        after = snapshot(data)
        for cid, entry in after.items():
            assert entry["shard"] == shard_for(cid, m), cid
        assert without_shard(after) == without_shard(before)
        assert result.totals.rows() == result.plan.totals.rows()
        assert result.old_dir is not None and result.old_dir.is_dir()
        assert sorted(p.name for p in result.old_dir.iterdir()) == [
            f"shard-{i:03d}" for i in range(result.plan.old_shards)]
        assert leftovers(data) == sorted(p.name for p in old_dirs(data))
        assert sum(1 for x in lines if x.startswith("copied shard-")) == result.plan.old_shards
        assert sum(1 for x in lines if x.startswith("verified new shard-")) == m
        assert retained(data) == kept_retained
    assert snapshot(data) == before  # same shards as at the start, too
    assert len(old_dirs(data)) == 3


def test_shared_message_stored_once_per_new_shard(data: Path) -> None:
    rs.reshard(data, 3)
    with ShardStore.open(data, 2, 3, readonly=True) as s:  # a1 and a2
        a1 = {m.topic: mid for _seq, mid, _q, m in s.queue(A1)}
        a2 = {m.topic: mid for _seq, mid, _q, m in s.queue(A2)}
        inflight_a2 = {pid: r.msg_id for pid, r, _m in s.inflight(A2)}
        shared = a1["home/kitchen/temp"]
        assert a2["home/kitchen/temp"] == shared == inflight_a2[7]
        refs = {mid: n for mid, n, _m in s.messages()}
        assert refs[shared] == 3
    copies = []
    for shard, cid in ((0, B1), (1, B2)):
        with ShardStore.open(data, shard, 3, readonly=True) as s:
            ids = [mid for _seq, mid, _q, m in s.queue(cid) if m.topic == "x/y"]
            assert len(ids) == 1
            copies.append({mid: (n, m) for mid, n, m in s.messages()}[ids[0]])
    assert copies[0][1] == copies[1][1]  # the same message, stored in both new shards
    assert copies[0][0] == 1 and copies[1][0] == 2  # b2 also has it in flight


def test_inflight_states_and_packet_ids_kept(data: Path) -> None:
    rs.reshard(data, 3)
    with ShardStore.open(data, shard_for(A1, 3), 3, readonly=True) as s:
        rows = {pid: (r.state, r.qos, None if m is None else m.payload)
                for pid, r, m in s.inflight(A1)}
        assert rows == {1: (AWAIT_PUBACK, 1, b"p1"), 2: (AWAIT_PUBREC, 2, b"p2"),
                        65535: (AWAIT_PUBCOMP, 2, None)}
        assert s.qos2_incoming(A1) == [3, 65000]
        assert [m.payload for _s, _i, _q, m in s.queue(A1)] == [b"21.5", b"\x00\xff", b"gap"]


def test_no_handover_meta_copied_and_counters_fresh(data: Path) -> None:
    rs.reshard(data, 3)
    for i in range(3):
        with ShardStore.open(data, i, 3, readonly=True) as s:
            keys = {k for k, _ in s.meta_items()}
            assert not {k for k in keys if k.startswith("handover.")}
            assert s.get_meta("shards") == 3 and s.get_meta("shard") == i


def test_session_saved_while_connected_gets_alive_at(data: Path) -> None:
    with ShardStore.open(data, 1, 2) as s, s.batch() as b:
        b.set_meta("alive_at", 1_750_000_000.0)
    result = rs.reshard(data, 3)
    assert result is not None and result.pinned == 1  # b1 (disconnected_at None) on shard 1
    with ShardStore.open(data, shard_for(B1, 3), 3, readonly=True) as s:
        rec = s.session(B1)
        assert rec is not None and rec.disconnected_at == 1_750_000_000.0


def test_delete_old(data: Path) -> None:
    result = rs.reshard(data, 3, delete_old=True)
    assert result is not None and result.old_dir is None
    assert leftovers(data) == []


def test_same_count_is_nothing_to_do(data: Path) -> None:
    before = fingerprint(data)
    assert rs.reshard(data, 2) is None
    assert fingerprint(data) == before and leftovers(data) == []


# --------------------------------------------------------------------------- refusals


def test_refuses_non_empty_outbox(data: Path) -> None:
    with ShardStore.open(data, 1, 2) as s, s.batch() as b:
        b.put_outbox(0, 5, b"\x80")
    before = fingerprint(data)
    with pytest.raises(rs.ReshardRefused, match="start the broker once with 2 workers"):
        rs.reshard(data, 3)
    assert fingerprint(data) == before and leftovers(data) == []
    result = cli("reshard", "--data-dir", str(data), "--workers", "3", "--yes")
    assert result.exit_code == 2
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: shard-001 has 1 cross-shard hand-over(s) not yet acknowledged")
    assert fingerprint(data) == before


def hold_lock(d: Path) -> int:
    fd = os.open(d / "broker.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_refuses_while_broker_lock_is_held(data: Path) -> None:
    fd = hold_lock(data)
    try:
        before = fingerprint(data)
        with pytest.raises(rs.ReshardRefused, match="in use by a running broker"):
            rs.reshard(data, 3)
        result = cli("reshard", "--data-dir", str(data), "--workers", "3", "--yes")
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and "stop the broker first" in result.stderr
        assert fingerprint(data) == before and leftovers(data) == []
    finally:
        os.close(fd)
    assert rs.reshard(data, 3) is not None  # once the lock is free


@pytest.mark.parametrize("workers", ["257", "-1"])
def test_refuses_bad_worker_count(data: Path, workers: str) -> None:
    result = cli("reshard", "--data-dir", str(data), "--workers", workers, "--yes")
    assert result.exit_code == 2
    assert result.stderr == f"error: --workers must be between 0 (one per core) and 256, got {workers}\n"


def test_workers_0_is_one_per_core_as_in_serve(data: Path) -> None:
    cores = max(1, os.cpu_count() or 1)
    result = cli("reshard", "--data-dir", str(data), "--workers", "0", "--yes")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"--workers 0: one per core, {cores}\n")
    assert data_dir_shards(data) == cores


def test_refuses_missing_or_empty_dir(tmp_path: Path) -> None:
    missing = cli("reshard", "--data-dir", str(tmp_path / "nope"), "--workers", "2", "--yes")
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    assert not (tmp_path / "nope").exists()
    empty = cli("reshard", "--data-dir", str(tmp_path), "--workers", "2", "--yes")
    assert empty.exit_code == 2 and "not a ShardBroker data directory" in empty.stderr


def test_refuses_missing_shard_dir(data: Path) -> None:
    (data / "shard-001").rename(data / "elsewhere")
    with pytest.raises(rs.ReshardRefused, match="shard-001 is missing"):
        rs.reshard(data, 3)


def test_cli_same_count_says_nothing_to_do(data: Path) -> None:
    result = cli("reshard", "--data-dir", str(data), "--workers", "2")
    assert result.exit_code == 0 and "nothing to do" in result.stdout


# --------------------------------------------------------------------------- CLI flow


def test_cli_asks_and_declining_changes_nothing(data: Path) -> None:
    before = fingerprint(data)
    result = cli("reshard", "--data-dir", str(data), "--workers", "3", input="n\n")
    assert result.exit_code == 1
    assert "2 -> 3 shards" in result.stdout and "29 sessions" in result.stdout
    assert "aborted: nothing changed" in result.stderr
    assert fingerprint(data) == before and leftovers(data) == []


def test_cli_confirm_and_yes(data: Path, tmp_path: Path) -> None:
    before = without_shard(snapshot(data))
    result = cli("reshard", "--data-dir", str(data), "--workers", "3", input="y\n")
    assert result.exit_code == 0, result.output
    assert "the old shards are kept in" in result.stdout and "--workers 3" in result.stdout
    assert "copied shard-000 (1/2)" in result.stderr
    assert "verified new shard-002 (3/3)" in result.stderr
    assert without_shard(snapshot(data)) == before
    again = cli("reshard", "--data-dir", str(data), "--workers", "1", "--yes", "--delete-old")
    assert again.exit_code == 0, again.output
    assert "the old shards were deleted" in again.stdout
    assert without_shard(snapshot(data)) == before
    assert len(old_dirs(data)) == 1


# --------------------------------------------------------------------------- failures


def _boom(*_a: Any, **_k: Any) -> Any:
    raise StoreError("injected failure")


@pytest.mark.parametrize("where", ["copy", "verify", "check", "commit"])
def test_failure_before_switch_leaves_old_data(data: Path, monkeypatch: pytest.MonkeyPatch,
                                               where: str) -> None:
    before_fp, before = fingerprint(data), snapshot(data)
    if where == "copy":
        calls = iter(range(100))
        real = vshards._copy_session

        def flaky(*a: Any) -> None:
            if next(calls) == 5:
                _boom()
            real(*a)

        monkeypatch.setattr(vshards, "_copy_session", flaky)
    elif where == "verify":
        monkeypatch.setattr(rs, "_verify", _boom)
    elif where == "check":
        real_check = ShardStore.check

        def check(self: ShardStore, progress: Any = None) -> list[str]:
            if self.path.parent.name == rs.TMP_NAME:
                return ["new shard: injected problem"]
            return real_check(self, progress)

        monkeypatch.setattr(ShardStore, "check", check)
    else:
        monkeypatch.setattr(vshards._Part, "commit", _boom)
    with pytest.raises(rs.ReshardFailed, match="old data untouched"):
        rs.reshard(data, 3)
    assert fingerprint(data) == before_fp
    assert leftovers(data) == []
    monkeypatch.undo()
    assert snapshot(data) == before
    result = cli("reshard", "--data-dir", str(data), "--workers", "3", "--yes")
    assert result.exit_code == 0  # and it works afterwards


def test_failure_cli_exit_1(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rs, "_verify", _boom)
    result = cli("reshard", "--data-dir", str(data), "--workers", "3", "--yes")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: reshard failed, old data untouched: injected failure")


def test_old_store_written_during_copy_is_detected(data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that should not exist (a worker that outlived its supervisor) is noticed."""
    real = rs._copy_shard

    def copy_then_someone_writes(old: ShardStore, *a: Any) -> Any:
        out = real(old, *a)
        if old.shard == 1:  # the old stores are open here: write from another process
            subprocess.run([sys.executable, "-c", WRITE_ALIVE_AT, str(data)], check=True,
                           cwd=ROOT, timeout=60)
        return out

    monkeypatch.setattr(rs, "_copy_shard", copy_then_someone_writes)
    with pytest.raises(rs.ReshardFailed, match="shard-000 was written during the reshard"):
        rs.reshard(data, 3)
    assert leftovers(data) == [] and data_dir_shards(data) == 2


ROOT = Path(__file__).resolve().parents[2]
WRITE_ALIVE_AT = """
import sys
from shardbroker.storage.lmdb_store import ShardStore
with ShardStore.open(sys.argv[1], 0, 2) as s, s.batch() as b:
    b.set_meta("alive_at", 1.0)
"""

N_STEPS = len(rs._steps(2, 3, "x"))


def _fail_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Make switch step ``k`` fail; with k == N_STEPS, the fsync right after the last step."""
    real_do, real_fsync = rs._do, rs._fsync_dir
    calls = iter(range(N_STEPS))
    all_done = False

    def do(data_dir: Path, step: Any, text: str) -> None:
        nonlocal all_done
        n = next(calls)
        if n == k:
            raise OSError(28, "No space left on device (injected)")
        real_do(data_dir, step, text)
        all_done = n == N_STEPS - 1

    def fsync_dir(path: Path) -> None:
        nonlocal all_done
        if all_done:  # once
            all_done = False
            raise OSError(5, "I/O error (injected after the last step)")
        real_fsync(path)

    monkeypatch.setattr(rs, "_do", do)
    monkeypatch.setattr(rs, "_fsync_dir", fsync_dir)


@pytest.mark.parametrize("k", range(N_STEPS + 1))
def test_failure_during_switch_is_undone(data: Path, monkeypatch: pytest.MonkeyPatch,
                                         k: int) -> None:
    before_fp = fingerprint(data)
    _fail_at(monkeypatch, k)
    with pytest.raises(rs.ReshardFailed, match="undone, old data in place"):
        rs.reshard(data, 3)
    assert fingerprint(data) == before_fp
    assert leftovers(data) == []


@pytest.mark.parametrize("k", range(N_STEPS + 1))
def test_crash_during_switch_recovered_by_next_run(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                   k: int) -> None:
    """The process dies at switch step k (simulated: undoing fails too, the journal stays)."""
    before = without_shard(snapshot(data))
    _fail_at(monkeypatch, k)

    def undo_fails(*_a: Any) -> None:
        raise OSError(5, "I/O error (the process died here)")

    monkeypatch.setattr(rs, "_undo", undo_fails)
    with pytest.raises(rs.ReshardFailed, match="run the same reshard command again"):
        rs.reshard(data, 3)
    assert (data / rs.JOURNAL_NAME).exists()
    if 2 <= k <= N_STEPS - 2:  # shard-000 is a plain file: a broker refuses to start
        with pytest.raises(StoreError, match="is not a directory"):
            data_dir_shards(data)
    monkeypatch.undo()
    lines: list[str] = []
    result = rs.reshard(data, 3, progress=lines.append)
    if k == N_STEPS:
        assert result is None and lines[0].startswith("finished an interrupted reshard")
    else:
        assert result is not None and lines[0].startswith("undid an interrupted reshard")
    assert data_dir_shards(data) == 3
    assert without_shard(snapshot(data)) == before
    assert not (data / rs.JOURNAL_NAME).exists() and not (data / rs.TMP_NAME).exists()


def test_recovery_refuses_when_disk_does_not_match_journal(data: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash with shard-000 absent, then a broker with 3 workers creates an empty shard-000."""
    _fail_at(monkeypatch, N_STEPS - 1)
    monkeypatch.setattr(rs, "_undo", _boom)
    with pytest.raises(rs.ReshardFailed):
        rs.reshard(data, 3)
    monkeypatch.undo()
    ShardStore.open(data, 0, 3, map_size=SMALL).close()
    before = fingerprint(data)
    with pytest.raises(rs.ReshardRefused, match="do not match its journal"):
        rs.reshard(data, 3)
    result = cli("reshard", "--data-dir", str(data), "--workers", "2", "--yes")
    assert result.exit_code == 2 and "inspect the directory by hand" in result.stderr
    assert fingerprint(data) == before


def test_journal_states_are_all_different() -> None:
    for old_n, new_n in ((1, 2), (2, 1), (2, 3), (3, 2), (4, 4)):
        states = rs._states(old_n, new_n, rs.OLD_PREFIX + "x")
        assert len(states) == len(rs._steps(old_n, new_n, "x")) + 1
        assert len({tuple(sorted(s.items())) for s in states}) == len(states)
