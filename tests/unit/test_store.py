"""Contract tests of the durable store against real LMDB files in ``tmp_path``.

Covers every write operation read back, durability across close/reopen and a
SIGKILL right after commit, message sharing with refcounts, map growth and
StoreFull, refusal of foreign/newer/mismatched directories (which must stay
byte-for-byte unchanged), read-only opens next to a live writer, the retained
store, and ``check()``. Tests may import ``lmdb`` to damage files on purpose.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import cbor2
import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.storage.lmdb_store import (
    SCHEMA_VERSION,
    RetainedStore,
    ShardStore,
    StoreCorrupt,
    StoreError,
    StoreFull,
    data_dir_shards,
    vshard_of,
)
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    PROPERTY_IDS,
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
    StoredWill,
    decode_inflight,
    decode_message,
    decode_session,
    encode_inflight,
    encode_message,
    encode_session,
    inflight_msg_id,
    pack_inflight,
    pack_message,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = 64 << 10

FULL_PROPS = Properties(
    payload_format_indicator=1,
    message_expiry_interval=60,
    content_type="text/plain",
    response_topic="r/t",
    correlation_data=b"\x00\x01",
    subscription_identifiers=(3, 7),
    user_properties=(("a", "1"), ("a", "2"), ("b", "")),
)


def msg(topic: str = "a/b", payload: bytes = b"hello", qos: int = 1, **kw: object) -> StoredMessage:
    return StoredMessage(topic, payload, qos, bool(kw.pop("retain", False)),
                         kw.pop("properties", NO_PROPERTIES), **kw)  # type: ignore[arg-type]


def session(client_id: str, **kw: object) -> SessionRecord:
    base: dict[str, object] = {"protocol_version": 5, "expiry_interval": 3600,
                                 "disconnected_at": None}
    base.update(kw)
    return SessionRecord(client_id, **base)  # type: ignore[arg-type]


def digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path`` (lock.mdb excluded: LMDB rewrites it on open)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock.mdb"
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ShardStore]:
    s = ShardStore.open(tmp_path / "data", 0, 1, map_size=SMALL)
    yield s
    s.close()


def reopen(s: ShardStore, **kw: object) -> ShardStore:
    s.close()
    return ShardStore.open(s.data_dir, s.shard, s.shards, map_size=SMALL, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- records


def test_property_table_covers_every_properties_field() -> None:
    assert sorted(name for name, _, _ in PROPERTY_IDS) == sorted(f.name for f in fields(Properties))


def test_records_round_trip_and_defaults_are_left_out() -> None:
    m = StoredMessage("t", b"\xff\x00", 2, True, FULL_PROPS, 1.5e9)
    assert decode_message(encode_message(m)) == m
    plain = decode_message(encode_message(msg()))
    assert plain.properties is NO_PROPERTIES and plain.expires_at is None
    assert set(cbor2.loads(encode_message(msg()))) == {"t", "p", "q"}
    rec = SessionRecord(
        "c", 4, 0xFFFFFFFF, 123.25,
        (StoredSubscription("$share/g/x/#", 1, True, True, 2, 99), StoredSubscription("y", 0)),
        StoredWill("w", b"bye", 1, True, FULL_PROPS, 30),
    )
    assert decode_session(encode_session(rec)) == rec
    assert decode_session(encode_session(session("c"))) == session("c")
    for inf in (InflightRecord(5, 1, AWAIT_PUBACK), InflightRecord(None, 2, AWAIT_PUBCOMP)):
        assert decode_inflight(encode_inflight(inf)) == inf


@settings(max_examples=60, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=20),
    payload=st.binary(max_size=50),
    qos=st.integers(0, 2),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    users=st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3),
    sub_ids=st.lists(st.integers(1, 268435455), max_size=3),
)
def test_message_round_trip_property(topic: str, payload: bytes, qos: int, expiry: int | None,
                                     users: list[tuple[str, str]], sub_ids: list[int]) -> None:
    props = Properties(message_expiry_interval=expiry, user_properties=tuple(users),
                       subscription_identifiers=tuple(sub_ids))
    m = StoredMessage(topic, payload, qos, False, props, None if expiry is None else 1e9 + expiry)
    assert decode_message(encode_message(m)) == m


@pytest.mark.parametrize("data", [b"", b"\xff\xff", cbor2.dumps([1, 2]), cbor2.dumps({"t": 1}),
                                  cbor2.dumps({"t": "a", "p": "str", "q": 1})])
def test_decoding_garbage_raises_store_corrupt(data: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        decode_message(data)
    with pytest.raises(StoreCorrupt):
        decode_session(data)


# --------------------------------------------------------------------------- write ops


def test_sessions_put_replace_delete(store: ShardStore) -> None:
    will = StoredWill("w/t", b"gone", 1, False, NO_PROPERTIES, 5)
    with store.batch() as b:
        b.put_session(session("a", subscriptions=(StoredSubscription("x/+", 1),), will=will))
        b.put_session(session("b"))
        assert len(b) == 2
    assert store.session("a") == session("a", subscriptions=(StoredSubscription("x/+", 1),), will=will)
    with store.batch() as b:
        b.put_session(session("a", disconnected_at=42.0))
        b.delete_session("b")
    assert store.session("a") == session("a", disconnected_at=42.0)
    assert store.session("b") is None
    assert [r.client_id for r in store.sessions()] == ["a"]


def test_message_stored_once_refcounted_and_deleted_with_last_ref(store: ShardStore) -> None:
    b = store.batch()
    for c in "abc":
        b.put_session(session(c))
    mid = b.add_message(msg(payload=b"shared"))
    seqs = {c: b.enqueue(c, mid, 1) for c in "abc"}
    b.commit()
    assert [(i, refs) for i, refs, _ in store.messages()] == [(mid, 3)]
    assert store.queue("a") == [(seqs["a"], mid, 1, msg(payload=b"shared"))]
    assert store.stats()["messages"] == 1 and store.stats()["queued"] == 3
    with store.batch() as b:
        b.dequeue("a", seqs["a"])
        b.dequeue("b", seqs["b"])
    assert [(i, refs) for i, refs, _ in store.messages()] == [(mid, 1)]
    with store.batch() as b:
        b.dequeue("c", seqs["c"])
        b.dequeue("c", 999_999)  # unknown seq: no-op
    assert list(store.messages()) == [] and store.queue("c") == []
    assert store.check() == []


def test_queue_order_and_inflight_ref_follows_msg_id(store: ShardStore) -> None:
    b = store.batch()
    b.put_session(session("a"))
    ids = [b.add_message(msg(payload=bytes([i]))) for i in range(5)]
    seqs = [b.enqueue("a", i, 1) for i in ids]
    b.commit()
    assert [q[0] for q in store.queue("a")] == seqs == sorted(seqs)
    # Move the first from queue to inflight in one batch: refcount 1 -> 0 -> 1, never deleted.
    with store.batch() as b:
        b.dequeue("a", seqs[0])
        b.put_inflight("a", 7, InflightRecord(ids[0], 2, AWAIT_PUBREC))
    assert store.inflight("a") == [(7, InflightRecord(ids[0], 2, AWAIT_PUBREC), msg(payload=b"\x00"))]
    # PUBREC received: only PUBCOMP awaited, the message is no longer needed.
    with store.batch() as b:
        b.put_inflight("a", 7, InflightRecord(None, 2, AWAIT_PUBCOMP))
    assert store.inflight("a") == [(7, InflightRecord(None, 2, AWAIT_PUBCOMP), None)]
    assert ids[0] not in [i for i, _, _ in store.messages()]
    with store.batch() as b:
        b.put_inflight("a", 1, InflightRecord(ids[1], 1, AWAIT_PUBACK))
        b.delete_inflight("a", 7)
        b.delete_inflight("a", 8)  # unknown: no-op
    assert [p for p, _, _ in store.inflight("a")] == [1]
    assert {i: r for i, r, _ in store.messages()}[ids[1]] == 2
    assert store.check() == []


def test_unreferenced_message_does_not_survive_commit(store: ShardStore) -> None:
    with store.batch() as b:
        mid = b.add_message(msg())
    assert store.message(mid) is None and list(store.messages()) == []


def test_qos2_incoming_and_meta(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        for pid in (9, 1, 65535):
            b.add_qos2_incoming("a", pid)
        b.add_qos2_incoming("ab", 2)  # a prefix-sharing client must not leak into "a"
        b.set_meta("owner", {"x": [1, 2]})
    assert store.qos2_incoming("a") == [1, 9, 65535]
    with store.batch() as b:
        b.remove_qos2_incoming("a", 9)
    assert store.qos2_incoming("a") == [1, 65535] and store.qos2_incoming("ab") == [2]
    assert store.get_meta("owner") == {"x": [1, 2]}
    assert store.get_meta("schema_version") == SCHEMA_VERSION and store.get_meta("nope") is None
    with pytest.raises(ValueError):
        store.batch().set_meta("next_seq", 1)
    with pytest.raises(ValueError):
        store.batch().enqueue("a\x00b", 1, 1)


def test_delete_session_cleans_rows_and_refs(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        b.put_session(session("a2"))
        m1, m2 = b.add_message(msg(payload=b"1")), b.add_message(msg(payload=b"2"))
        b.enqueue("a", m1, 1)
        b.enqueue("a", m2, 1)
        b.enqueue("a2", m2, 1)
        b.put_inflight("a", 3, InflightRecord(m1, 1, AWAIT_PUBACK))
        b.add_qos2_incoming("a", 4)
    with store.batch() as b:
        b.delete_session("a")
    assert store.session("a") is None
    assert (store.queue("a"), store.inflight("a"), store.qos2_incoming("a")) == ([], [], [])
    assert [(i, r) for i, r, _ in store.messages()] == [(m2, 1)]
    assert len(store.queue("a2")) == 1
    assert store.check() == []


def test_failed_commit_leaves_store_unchanged_and_ids_are_not_reused(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
    seq0 = store.next_seq
    b = store.batch()
    mid = b.add_message(msg())
    b.enqueue("a", mid, 1)
    b.enqueue("a", 12345, 1)  # no such message
    with pytest.raises(StoreError, match="does not exist"):
        b.commit()
    assert len(b) == 3 and store.queue("a") == [] and list(store.messages()) == []
    with store.batch() as b:
        mid2 = b.add_message(msg())
        assert mid2 > mid and b.enqueue("a", mid2, 1) > seq0 + 1


def test_long_client_ids_and_prefixes(store: ShardStore) -> None:
    long_a, long_b = "é" * 300, "é" * 300 + "x"  # > 400 UTF-8 bytes: hashed keys
    with store.batch() as b:
        for c in (long_a, long_b):
            b.put_session(session(c))
            b.enqueue(c, b.add_message(msg(payload=c.encode()[-3:])), 0)
    assert store.session(long_a) == session(long_a)
    assert [m.payload for _, _, _, m in store.queue(long_b)] == [long_b.encode()[-3:]]
    assert store.check() == []


# --------------------------------------------------------------------------- durability


def test_reopen_keeps_everything_and_ids_keep_increasing(store: ShardStore) -> None:
    rec = session("a", disconnected_at=10.0, subscriptions=(StoredSubscription("t/#", 2, subscription_id=4),),
                  will=StoredWill("w", b"x", 2, True, FULL_PROPS, 9))
    with store.batch() as b:
        b.put_session(rec)
        ids = [b.add_message(msg(payload=bytes([i]), properties=FULL_PROPS)) for i in range(3)]
        seqs = [b.enqueue("a", i, 2) for i in ids]
        b.put_inflight("a", 10, InflightRecord(ids[0], 2, AWAIT_PUBREC))
        b.put_inflight("a", 11, InflightRecord(None, 2, AWAIT_PUBCOMP))
        b.add_qos2_incoming("a", 77)
    before = (store.queue("a"), store.inflight("a"), store.qos2_incoming("a"), list(store.messages()))
    store = reopen(store)
    try:
        assert store.session("a") == rec
        assert (store.queue("a"), store.inflight("a"), store.qos2_incoming("a"),
                list(store.messages())) == before
        assert [q[0] for q in store.queue("a")] == seqs
        with store.batch() as b:
            new_id = b.add_message(msg())
            new_seq = b.enqueue("a", new_id, 1)
        assert new_id > max(ids) and new_seq > max(seqs)
        # ids stay monotonic even after every message is gone
        with store.batch() as b:
            b.delete_session("a")
        store = reopen(store)
        with store.batch() as b:
            assert b.add_message(msg()) > new_id
    finally:
        store.close()


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


CHILD_PRELUDE = """
    import sys
    from pathlib import Path
    from shardbroker.protocol.packets import NO_PROPERTIES
    from shardbroker.storage.lmdb_store import ShardStore
    from shardbroker.storage.records import SessionRecord, StoredMessage
    store = ShardStore.open(Path(sys.argv[1]), 0, 1, map_size=64 << 10, sync=True)
    def fill(n, tag):
        b = store.batch()
        b.put_session(SessionRecord(tag, 5, 60, None))
        for i in range(n):
            b.enqueue(tag, b.add_message(StoredMessage(tag, bytes(2000), 1, False, NO_PROPERTIES)), 1)
        b.commit()
"""


def test_sigkill_right_after_commit_loses_nothing(tmp_path: Path) -> None:
    child = _run_child(CHILD_PRELUDE + """
    fill(50, "first")
    fill(100, "second")
    print("committed", flush=True)
    sys.stdin.readline()
    """, str(tmp_path))
    try:
        assert child.stdout is not None and child.stdout.readline() == "committed\n"
        os.kill(child.pid, 9)
    finally:
        child.wait(10)
    assert child.returncode == -9
    s = ShardStore.open(tmp_path, 0, 1)
    try:
        assert len(s.queue("first")) == 50 and len(s.queue("second")) == 100
        assert s.check() == []
        with s.batch() as b:  # the killed writer's lock is recovered
            b.put_session(session("after"))
    finally:
        s.close()


def test_readonly_open_sees_commits_of_a_live_writer_even_after_map_growth(tmp_path: Path) -> None:
    child = _run_child(CHILD_PRELUDE + """
    fill(1, "first")
    print("1", flush=True)
    sys.stdin.readline()
    fill(200, "second")   # grows the map well past the reader's mapping
    print("2", flush=True)
    sys.stdin.readline()
    store.close()
    """, str(tmp_path))
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "1\n"
        ro = ShardStore.open(tmp_path, 0, 1, readonly=True)
        try:
            assert len(ro.queue("first")) == 1
            with pytest.raises(StoreError):
                ro.batch()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "2\n"
            assert len(ro.queue("second")) == 200
            assert ro.stats()["messages"] == 201
        finally:
            ro.close()
        child.stdin.write("go\n")
        child.stdin.flush()
    finally:
        assert child.wait(10) == 0


# --------------------------------------------------------------------------- map size


def test_map_grows_when_full(store: ShardStore) -> None:
    start = store.stats()["map_size"]
    with store.batch() as b:
        b.put_session(session("a"))
        for _ in range(300):
            b.enqueue("a", b.add_message(msg(payload=bytes(1000))), 1)
    stats = store.stats()
    assert stats["map_size"] > start and stats["queued"] == 300
    assert stats["used_bytes"] > SMALL


def test_store_full_at_max_map_size_leaves_store_readable_and_unchanged(tmp_path: Path) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL, max_map_size=256 << 10)
    try:
        with s.batch() as b:
            b.put_session(session("a"))
            b.enqueue("a", b.add_message(msg(payload=b"keep")), 1)
        before = (list(s.sessions()), s.queue("a"), list(s.messages()))
        b = s.batch()
        for _ in range(400):
            b.enqueue("a", b.add_message(msg(payload=bytes(1000))), 1)
        with pytest.raises(StoreFull):
            b.commit()
        assert (list(s.sessions()), s.queue("a"), list(s.messages())) == before
        assert s.stats()["map_size"] == 256 << 10
        with s.batch() as b:  # small work still fits
            b.put_session(session("b"))
        assert s.session("b") is not None and s.check() == []
    finally:
        s.close()


def test_reopen_with_map_size_smaller_than_file(tmp_path: Path) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL)
    with s.batch() as b:
        b.put_session(session("a"))
        for _ in range(200):
            b.enqueue("a", b.add_message(msg(payload=bytes(1000))), 1)
    s.close()
    size = (tmp_path / "shard-000" / "data.mdb").stat().st_size
    s = ShardStore.open(tmp_path, 0, 1, map_size=16 << 10)
    try:
        assert s.stats()["map_size"] >= size and len(s.queue("a")) == 200
        with s.batch() as b:
            b.enqueue("a", b.add_message(msg()), 1)
    finally:
        s.close()


# --------------------------------------------------------------------------- refusing directories


def _set_meta_raw(env_dir: Path, key: bytes, value: object) -> None:
    env = lmdb.open(str(env_dir), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, cbor2.dumps(value), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    ShardStore.open(tmp_path, 0, 1, map_size=SMALL).close()
    _set_meta_raw(tmp_path / "shard-000", b"schema_version", SCHEMA_VERSION + 1)
    before = digest(tmp_path)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="newer"):
            ShardStore.open(tmp_path, 0, 1, map_size=1 << 30, readonly=readonly)
    assert digest(tmp_path) == before


def test_foreign_files_are_refused_and_left_untouched(tmp_path: Path) -> None:
    shard_dir = tmp_path / "shard-000"
    shard_dir.mkdir()
    (shard_dir / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a ShardBroker store"):
        ShardStore.open(tmp_path, 0, 1)
    assert sorted(os.listdir(shard_dir)) == ["notes.txt"]


@pytest.mark.parametrize("content", [b"garbage" * 2000, b"x"])
def test_garbage_data_mdb_is_refused_and_left_untouched(tmp_path: Path, content: bytes) -> None:
    shard_dir = tmp_path / "shard-000"
    shard_dir.mkdir()
    (shard_dir / "data.mdb").write_bytes(content)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not an LMDB"):
            ShardStore.open(tmp_path, 0, 1, readonly=readonly)
    assert os.listdir(shard_dir) == ["data.mdb"]
    assert (shard_dir / "data.mdb").read_bytes() == content
    with pytest.raises(StoreError):
        data_dir_shards(tmp_path)


@pytest.mark.parametrize("key", [b"meta", b"other"])
def test_lmdb_file_that_is_not_ours_is_refused(tmp_path: Path, key: bytes) -> None:
    env = lmdb.open(str(tmp_path / "retained"))
    with env.begin(write=True) as txn:
        txn.put(key, b"someone else's")
    env.close()
    before = digest(tmp_path)
    with pytest.raises(StoreError, match="without ShardBroker metadata"):
        RetainedStore.open(tmp_path)
    with pytest.raises(StoreError):
        RetainedStore.open(tmp_path, readonly=True)
    assert digest(tmp_path) == before


def test_wrong_shard_count_is_refused(tmp_path: Path) -> None:
    for shard in (0, 1):
        ShardStore.open(tmp_path, shard, 2, map_size=SMALL).close()
    assert data_dir_shards(tmp_path) == 2
    with pytest.raises(StoreError, match="created with 2 workers"):
        ShardStore.open(tmp_path, 0, 4)
    with pytest.raises(StoreError, match="created with 2 workers"):
        ShardStore.open(tmp_path, 0, 1, readonly=True)
    other = tmp_path / "other"
    ShardStore.open(other, 3, 4, map_size=SMALL).close()
    with pytest.raises(StoreError, match="more than 2 workers"):
        ShardStore.open(other, 0, 2)  # a new shard next to shard-003
    assert sorted(os.listdir(other)) == ["shard-003"]


def test_readonly_and_create_false_never_create(tmp_path: Path) -> None:
    assert data_dir_shards(tmp_path / "nothing") is None
    with pytest.raises(StoreError, match="no store"):
        ShardStore.open(tmp_path / "nothing", 0, 1, readonly=True)
    with pytest.raises(StoreError, match="no store"):
        ShardStore.open(tmp_path / "nothing", 0, 1, create=False)
    with pytest.raises(StoreError, match="no store"):
        RetainedStore.open(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------------------- retained


def test_retained_put_replace_delete_scan(tmp_path: Path) -> None:
    long_topic = "long/" + "x" * 500
    r = RetainedStore.open(tmp_path, map_size=SMALL)
    try:
        r.write([("a/b", msg("a/b", b"1", retain=True)), ("a/c", msg("a/c", b"2", retain=True)),
                 ("b", msg("b", b"3", retain=True)), (long_topic, msg(long_topic, b"4", retain=True))])
        r.write([("a/b", msg("a/b", b"new", retain=True, properties=FULL_PROPS)), ("b", None),
                 ("missing", None)])
        assert r.get("a/b") == msg("a/b", b"new", retain=True, properties=FULL_PROPS)
        assert r.get("b") is None and r.count() == 3
        assert [t for t, _ in r.scan("a/")] == ["a/b", "a/c"]
        assert [t for t, _ in r.scan()] == ["a/b", "a/c", long_topic]
        assert [m.payload for _, m in r.scan("long/" + "x" * 450)] == [b"4"]
        assert r.get(long_topic) == msg(long_topic, b"4", retain=True)
        assert r.stats()["retained"] == 3 and r.check() == []
        r.write([(f"bulk/{i}", msg(f"bulk/{i}", bytes(1000))) for i in range(200)])  # grows the map
        assert r.count() == 203
    finally:
        r.close()
    r = RetainedStore.open(tmp_path, readonly=True)
    try:
        assert r.count() == 203 and r.get("a/c") == msg("a/c", b"2", retain=True)
    finally:
        r.close()


def test_retained_find_reads_every_head_of_a_subscribe_at_once(tmp_path: Path) -> None:
    long_topic = "long/" + "x" * 500
    topics = ["a/b", "a/c", "ab", long_topic, *(f"bulk/{i:04d}" for i in range(600))]
    r = RetainedStore.open(tmp_path, map_size=SMALL)
    try:
        r.write([(t, msg(t, b"v", retain=True)) for t in topics])
        pages = r.find([("a/b", True), ("a/", False), ("a/x", True), ("", False), (long_topic, True),
                        ("long/" + "x" * 450, False), ("bulk/", False), ("zzz", False)])
        found = [rows for rows, _after in pages]
        assert [[t for t, _ in rows] for rows in found[:3]] == [["a/b"], ["a/b", "a/c"], []]
        ordered = sorted(topics, key=lambda t: t.encode())
        assert [t for t, _ in found[3]] == ordered[:512]  # a page of rows, and where to go on
        rest, after = [], pages[3][1]
        while after is not None:  # the rest, a page at a time
            rows, after = r.page("", after, 100)
            assert len(rows) <= 100
            rest += [t for t, _ in rows]
        assert rest == ordered[512:]
        assert found[4] == [(long_topic, msg(long_topic, b"v", retain=True))]
        assert [t for t, _ in found[5]] == [long_topic]
        assert [t for t, _ in found[6]] == [f"bulk/{i:04d}" for i in range(512)] and pages[6][1] is not None
        rows, after = r.page("bulk/", pages[6][1], 1000)
        assert [t for t, _ in rows] == [f"bulk/{i:04d}" for i in range(512, 600)] and after is None
        assert found[7] == [] and pages[7][1] is None
        assert [after for _rows, after in pages[:3]] == [None, None, None]
        assert r.find([]) == []
    finally:
        r.close()


def test_retained_store_opened_by_several_processes_at_first_start(tmp_path: Path) -> None:
    code = """
    import sys
    from pathlib import Path
    from shardbroker.protocol.packets import NO_PROPERTIES
    from shardbroker.storage.lmdb_store import RetainedStore
    from shardbroker.storage.records import StoredMessage
    sys.stdin.readline()
    r = RetainedStore.open(Path(sys.argv[1]), map_size=64 << 10)
    r.write([(sys.argv[2], StoredMessage(sys.argv[2], b"x", 0, True, NO_PROPERTIES))])
    r.close()
    """
    children = [_run_child(code, str(tmp_path), f"t/{i}") for i in range(3)]
    for child in children:  # start together: all race to create the environment
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    assert [c.wait(20) for c in children] == [0, 0, 0]
    r = RetainedStore.open(tmp_path, readonly=True)
    try:
        assert [t for t, _ in r.scan()] == ["t/0", "t/1", "t/2"]
    finally:
        r.close()


# --------------------------------------------------------------------------- check / compact


def test_check_finds_injected_damage(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        mid = b.add_message(msg())
        b.enqueue("a", mid, 1)
        b.enqueue("a", mid, 1)
    assert store.check() == []
    path = store.path
    store.close()
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put((0).to_bytes(8, "big"), encode_message(msg()), db=env.open_db(b"messages", txn=txn))
        txn.put(b"ghost\x00" + (1).to_bytes(2, "big"), b"", db=env.open_db(b"qos2in", txn=txn))
        txn.put(b"bad", b"\xff\xfe", db=env.open_db(b"sessions", txn=txn))
    env.close()
    s = ShardStore.open(path.parent, 0, 1, readonly=True)
    try:
        problems = s.check()
    finally:
        s.close()
    text = "\n".join(problems)
    assert "message 0 is named by no queue or inflight row" in text
    assert "orphan qos2_incoming row of client 'ghost'" in text
    assert "session 'bad'" in text and "corrupt" in text
    assert len(problems) == 3


def test_copy_compacted(store: ShardStore, tmp_path: Path) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        for _ in range(100):
            b.enqueue("a", b.add_message(msg(payload=bytes(500))), 1)
    with store.batch() as b:
        for seq, *_ in store.queue("a")[:90]:
            b.dequeue("a", seq)
    dest = tmp_path / "copy"
    store.copy_compacted(dest / "shard-000")
    with pytest.raises(StoreError, match="not empty"):
        store.copy_compacted(dest / "shard-000")
    copy = ShardStore.open(dest, 0, 1, readonly=True)
    try:
        assert copy.queue("a") == store.queue("a") and copy.check() == []
        assert (dest / "shard-000" / "data.mdb").stat().st_size < (store.path / "data.mdb").stat().st_size
    finally:
        copy.close()


# --------------------------------------------------------------------------- schema 1 stores


def _schema1_store(data_dir: Path) -> Path:
    """A shard store as schema 1 wrote it: CBOR rows and a refs table.

    alice: queue seq 1 -> m1, inflight 7 -> m1 (AWAIT_PUBACK), inflight 8 -> m2 (AWAIT_PUBREC),
    inflight 9 (AWAIT_PUBCOMP, no message); bob: queue seq 2 -> m2. So m1 and m2 have 2 refs each.
    """
    path = data_dir / "shard-000"
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=8, map_size=1 << 20)
    with env.begin(write=True) as txn:
        dbs = {n: env.open_db(n.encode(), txn=txn, create=True)
               for n in ("meta", "sessions", "messages", "refs", "queue", "inflight", "qos2in", "outbox")}
        for key, value in {"schema_version": 1, "kind": "shard", "shard": 0, "shards": 1,
                           "created_at": 1.7e9, "next_msg_id": 3, "next_seq": 3}.items():
            txn.put(key.encode(), cbor2.dumps(value), db=dbs["meta"])
        for cid in ("alice", "bob"):
            txn.put(cid.encode(), encode_session(session(cid)), db=dbs["sessions"])
        for mid, m in ((1, msg("t/1", b"one")), (2, msg("t/2", b"two", 2, properties=FULL_PROPS))):
            txn.put(mid.to_bytes(8, "big"), encode_message(m), db=dbs["messages"])
            txn.put(mid.to_bytes(8, "big"), (2).to_bytes(8, "big"), db=dbs["refs"])
        txn.put(b"alice\x00" + (1).to_bytes(8, "big"), (1).to_bytes(8, "big") + b"\x01", db=dbs["queue"])
        txn.put(b"bob\x00" + (2).to_bytes(8, "big"), (2).to_bytes(8, "big") + b"\x02", db=dbs["queue"])
        for pid, row in ((7, {"m": 1, "q": 1, "s": AWAIT_PUBACK}), (8, {"m": 2, "q": 2, "s": AWAIT_PUBREC}),
                         (9, {"q": 2, "s": AWAIT_PUBCOMP})):
            txn.put(b"alice\x00" + pid.to_bytes(2, "big"), cbor2.dumps(row), db=dbs["inflight"])
    env.close()
    return path


def _tables(path: Path) -> set[bytes]:
    env = lmdb.open(str(path), max_dbs=8, readonly=True)
    try:
        with env.begin() as txn:
            return {key for key, _ in txn.cursor()}
    finally:
        env.close()


def test_schema1_store_is_read_as_is_read_only(tmp_path: Path) -> None:
    path = _schema1_store(tmp_path)
    before = digest(tmp_path)
    s = ShardStore.open(tmp_path, 0, 1, readonly=True)
    try:
        assert s.get_meta("schema_version") == 1
        assert [(seq, mid, m.topic) for seq, mid, _q, m in s.queue("alice")] == [(1, 1, "t/1")]
        assert [(pid, rec, None if m is None else m.payload) for pid, rec, m in s.inflight("alice")] == [
            (7, InflightRecord(1, 1, AWAIT_PUBACK), b"one"), (8, InflightRecord(2, 2, AWAIT_PUBREC), b"two"),
            (9, InflightRecord(None, 2, AWAIT_PUBCOMP), None)]
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(1, 2), (2, 2)]
        assert s.message(2) == msg("t/2", b"two", 2, properties=FULL_PROPS)
        assert s.check() == []
    finally:
        s.close()
    assert digest(tmp_path) == before and b"refs" in _tables(path)


def test_schema1_refs_table_is_checked_read_only(tmp_path: Path) -> None:
    path = _schema1_store(tmp_path)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put((1).to_bytes(8, "big"), (5).to_bytes(8, "big"), db=env.open_db(b"refs", txn=txn))
    env.close()
    s = ShardStore.open(tmp_path, 0, 1, readonly=True)
    try:
        assert s.check() == ["shard 0: message 1 has refcount 5 but 2 references"]
    finally:
        s.close()


def test_schema1_store_is_migrated_by_a_writable_open(tmp_path: Path) -> None:
    path = _schema1_store(tmp_path)
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL)
    try:
        assert s.get_meta("schema_version") == SCHEMA_VERSION == 6
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(1, 2), (2, 2)] and s.check() == []
        # the old CBOR rows release their messages like new ones
        with s.batch() as b:
            b.delete_inflight("alice", 7)
            b.put_inflight("alice", 8, InflightRecord(None, 2, AWAIT_PUBCOMP))
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(1, 1), (2, 1)] and s.check() == []
        s = reopen(s)
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(1, 1), (2, 1)] and s.check() == []
        with s.batch() as b:
            b.dequeue("alice", 1)
            b.delete_session("bob")
            b.enqueue("alice", b.add_message(msg("t/3")), 1)
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(3, 1)] and s.check() == []
    finally:
        s.close()
    assert b"refs" not in _tables(path)
    s = ShardStore.open(tmp_path, 0, 1, readonly=True)
    try:
        assert s.check() == [] and [m.topic for _, _, _, m in s.queue("alice")] == ["t/3"]
    finally:
        s.close()


def test_reference_counts_are_rebuilt_at_open(store: ShardStore) -> None:
    with store.batch() as b:
        for cid in ("a", "b"):
            b.put_session(session(cid))
        shared = b.add_message(msg())
        seq_a = b.enqueue("a", shared, 1)
        b.put_inflight("b", 1, InflightRecord(shared, 1, AWAIT_PUBACK))
    store = reopen(store)
    try:
        assert [(mid, refs) for mid, refs, _ in store.messages()] == [(shared, 2)]
        with store.batch() as b:
            b.dequeue("a", seq_a)
        assert store.message(shared) is not None and store.check() == []
        store = reopen(store)
        with store.batch() as b:
            b.delete_inflight("b", 1)
        assert store.message(shared) is None and list(store.messages()) == [] and store.check() == []
    finally:
        store.close()


def test_writable_open_deletes_messages_no_row_names(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        kept = b.add_message(msg("kept"))
        b.enqueue("a", kept, 1)
    path = store.path
    store.close()
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put((0).to_bytes(8, "big"), encode_message(msg("leaked")), db=env.open_db(b"messages", txn=txn))
    env.close()
    s = ShardStore.open(path.parent, 0, 1, readonly=True)
    try:
        assert [mid for mid, _, _ in s.messages()] == [0, kept] and len(s.check()) == 1
    finally:
        s.close()
    s = ShardStore.open(path.parent, 0, 1, map_size=SMALL)
    try:
        assert [(mid, refs) for mid, refs, _ in s.messages()] == [(kept, 1)] and s.check() == []
    finally:
        s.close()


def test_a_failed_commit_leaves_the_counts_alone(tmp_path: Path) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL, max_map_size=256 << 10)
    try:
        with s.batch() as b:
            b.put_session(session("a"))
            mid = b.add_message(msg())
            b.enqueue("a", mid, 1)
        b = s.batch()
        b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
        for _ in range(400):
            b.enqueue("a", b.add_message(msg(payload=bytes(1000))), 1)
        with pytest.raises(StoreFull):
            b.commit()
        assert [(m, refs) for m, refs, _ in s.messages()] == [(mid, 1)] and s.check() == []
        with s.batch() as b:
            b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
        assert [(m, refs) for m, refs, _ in s.messages()] == [(mid, 2)] and s.check() == []
    finally:
        s.close()


def test_packed_rows_round_trip_and_old_rows_still_decode() -> None:
    for m in (msg(), msg("t", b"", 0, retain=True), StoredMessage("t/ü", b"\xff\x00", 2, True, FULL_PROPS, 1.5e9)):
        data = pack_message(m)
        assert data[0] == 1 and decode_message(data) == m
        assert decode_message(encode_message(m)) == m
    for inf in (InflightRecord(5, 1, AWAIT_PUBACK), InflightRecord(None, 2, AWAIT_PUBCOMP)):
        data = pack_inflight(inf)
        assert len(data) == 11 and decode_inflight(data) == inf and inflight_msg_id(data) == inf.msg_id
        old = encode_inflight(inf)
        assert decode_inflight(old) == inf and inflight_msg_id(old) == inf.msg_id
    for bad in (b"\x01", b"\x01\x00\x01\x00\x00\x00\x09ab", b"\x01\x08\x01\x00\x00\x00\x00",
                pack_message(msg())[:-7]):
        with pytest.raises(StoreCorrupt):
            decode_message(bad)
    for bad in (b"\x01\x01", pack_inflight(InflightRecord(1, 1, 1)) + b"x"):
        with pytest.raises(StoreCorrupt):
            decode_inflight(bad)


# --------------------------------------------------------------------------- held messages


def _raw_rows(store: ShardStore) -> dict[str, list[bytes]]:
    """Values of the messages, queue and inflight tables, read through the store's own environment."""
    env = store._env
    with env.env.begin() as txn:
        return {name: [v for _, v in txn.cursor(db=env.dbs[name])] for name in ("messages", "queue", "inflight")}


def test_a_message_only_one_inflight_row_names_is_held_by_it(store: ShardStore) -> None:
    m = msg("held", b"payload", 2, properties=FULL_PROPS, expires_at=2e9)
    with store.batch() as b:
        b.put_session(session("a"))
        mid = b.add_message(m)
        b.put_inflight("a", 1, InflightRecord(mid, 2, AWAIT_PUBREC))
    assert store.inflight("a") == [(1, InflightRecord(mid, 2, AWAIT_PUBREC), m)]
    assert store.message(mid) == m and list(store.messages()) == [(mid, 1, m)]
    assert store.counts()["messages"] == 1 and store.check() == []
    path = store.path
    store = reopen(store)
    raw = _raw_rows(store)
    assert raw["messages"] == [] and raw["inflight"][0][0] == 2
    assert store.inflight("a") == [(1, InflightRecord(mid, 2, AWAIT_PUBREC), m)] and store.check() == []
    with store.batch() as b:  # PUBREC: the message goes with the row
        b.put_inflight("a", 1, InflightRecord(None, 2, AWAIT_PUBCOMP))
    assert store.message(mid) is None and list(store.messages()) == []
    assert store.counts()["messages"] == 0 and store.check() == []
    store.close()
    s = ShardStore.open(path.parent, 0, 1, readonly=True)
    try:
        assert s.check() == [] and s.inflight("a") == [(1, InflightRecord(None, 2, AWAIT_PUBCOMP), None)]
    finally:
        s.close()


def test_a_held_message_named_again_gets_its_own_row(store: ShardStore) -> None:
    with store.batch() as b:
        for cid in ("a", "b", "c"):
            b.put_session(session(cid))
        same = b.add_message(msg("same batch"))
        b.put_inflight("a", 1, InflightRecord(same, 1, AWAIT_PUBACK))
        b.enqueue("b", same, 1)
        later = b.add_message(msg("later batch"))
        b.put_inflight("a", 2, InflightRecord(later, 1, AWAIT_PUBACK))
    assert [(i, r) for i, r, _ in store.messages()] == [(same, 2), (later, 1)] and store.check() == []
    with store.batch() as b:
        b.put_inflight("c", 1, InflightRecord(later, 1, AWAIT_PUBACK))
    assert [(i, r) for i, r, _ in store.messages()] == [(same, 2), (later, 2)] and store.check() == []
    assert [row[0] for row in _raw_rows(store)["inflight"]] == [1, 1, 1]
    store = reopen(store)
    try:
        assert [(i, r) for i, r, _ in store.messages()] == [(same, 2), (later, 2)] and store.check() == []
        with store.batch() as b:
            b.delete_inflight("a", 2)
            b.delete_inflight("c", 1)
        assert [(i, r) for i, r, _ in store.messages()] == [(same, 2)] and store.check() == []
    finally:
        store.close()


def test_a_held_message_whose_row_goes_can_be_named_again_in_the_batch(store: ShardStore) -> None:
    with store.batch() as b:
        for cid in ("a", "b"):
            b.put_session(session(cid))
        fresh = b.add_message(msg("fresh"))
        b.put_inflight("a", 1, InflightRecord(fresh, 1, AWAIT_PUBACK))
        b.delete_inflight("a", 1)
        b.put_inflight("b", 1, InflightRecord(fresh, 1, AWAIT_PUBACK))
        kept = b.add_message(msg("kept"))
        b.put_inflight("a", 2, InflightRecord(kept, 1, AWAIT_PUBACK))
    assert [(i, r) for i, r, _ in store.messages()] == [(fresh, 1), (kept, 1)] and store.check() == []
    with store.batch() as b:  # the row holding ``kept`` is replaced, then ``kept`` is named again
        b.put_inflight("a", 2, InflightRecord(None, 2, AWAIT_PUBCOMP))
        b.enqueue("b", kept, 1)
        b.delete_session("b")
        b.enqueue("a", kept, 1)
    assert [(i, r, m.topic) for i, r, m in store.messages()] == [(kept, 1, "kept")] and store.check() == []
    assert store.queue("a")[0][1:3] == (kept, 1)
    store.close()


def test_deleting_a_session_drops_the_messages_its_rows_hold(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(session("a"))
        for pid in (1, 2):
            b.put_inflight("a", pid, InflightRecord(b.add_message(msg()), 1, AWAIT_PUBACK))
    assert store.counts()["messages"] == 2
    with store.batch() as b:
        b.delete_session("a")
    assert store.counts()["messages"] == 0 and list(store.messages()) == [] and store.check() == []
    store.close()


def test_a_failed_commit_leaves_held_messages_alone(tmp_path: Path) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL, max_map_size=256 << 10)
    try:
        with s.batch() as b:
            b.put_session(session("a"))
            mid = b.add_message(msg())
            b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
        b = s.batch()
        b.enqueue("a", mid, 1)  # would give it a row of its own
        for _ in range(400):
            b.enqueue("a", b.add_message(msg(payload=bytes(1000))), 1)
        with pytest.raises(StoreFull):
            b.commit()
        assert list(s.messages()) == [(mid, 1, msg())] and s.check() == []
        with s.batch() as b:
            b.enqueue("a", mid, 1)
        assert [(m, refs) for m, refs, _ in s.messages()] == [(mid, 2)] and s.check() == []
    finally:
        s.close()


def as_older_schema(env_dir: Path, version: int) -> None:
    """Rewrite a schema 6 store as schemas 2 to 5 wrote it: no ``vshards`` table (the index
    of virtual shard -> client), and that version in meta."""
    env = lmdb.open(str(env_dir), max_dbs=10,
                    map_size=(env_dir / "data.mdb").stat().st_size + (64 << 20))
    try:
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(b"vshards", txn=txn), delete=True)
            txn.put(b"schema_version", cbor2.dumps(version), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_schema2_to_5_stores_are_migrated_to_6(tmp_path: Path, version: int) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL)
    with s.batch() as b:
        b.put_session(session("a"))
        for _ in range(2):  # a message of its own, as 2 and 3 wrote it
            b.enqueue("a", b.add_message(msg()) if _ == 0 else s.next_msg_id - 1, 1)
    s.close()
    as_older_schema(tmp_path / "shard-000", version)
    s = ShardStore.open(tmp_path, 0, 1, readonly=True)
    try:
        assert s.get_meta("schema_version") == version and s.check() == []
        assert len(s.queue("a")) == 2 and s.vshard_counts() == {vshard_of("a"): 1}
    finally:
        s.close()
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL)
    try:
        assert s.get_meta("schema_version") == 6 and len(s.queue("a")) == 2 and s.check() == []
    finally:
        s.close()


_OPS = st.lists(st.tuples(st.sampled_from("NQIRDXPS"), st.integers(0, 2), st.integers(0, 3)),
                min_size=1, max_size=12)


@settings(max_examples=120, deadline=None)
@given(batches=st.lists(st.tuples(_OPS, st.booleans()), min_size=1, max_size=8))
def test_store_keeps_counts_and_held_messages_right_under_any_sequence(
        tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[list[tuple[str, int, int]], bool]]) -> None:
    """Random batches against a model of the rows; check() after each commit, and reopens."""
    data = tmp_path_factory.mktemp("seq")
    clients = ("a", "b", "c")
    queue: dict[tuple[str, int], int] = {}  # (client, seq) -> msg_id
    inflight: dict[tuple[str, int], int | None] = {}  # (client, pid) -> msg_id
    store = ShardStore.open(data, 0, 1, map_size=SMALL)
    try:
        with store.batch() as b:
            for cid in clients:
                b.put_session(session(cid))
        for ops, reopen_after in batches:
            live = sorted(set(queue.values()) | {m for m in inflight.values() if m is not None})
            b = store.batch()
            for op, c, n in ops:
                cid = clients[c]
                target = live[n % len(live)] if live and op in "QI" else None
                if op == "N" or (op in "QI" and target is None):
                    # n == 3: too large to be held by its row
                    target = b.add_message(msg(f"m{store.next_msg_id}", bytes(600 if n == 3 else 5)))
                    live.append(target)
                    op = "I" if n % 2 else "Q"
                if op == "Q":
                    assert target is not None
                    queue[(cid, b.enqueue(cid, target, 1))] = target
                elif op == "I":
                    b.put_inflight(cid, n + 1, InflightRecord(target, 1, AWAIT_PUBACK))
                    inflight[(cid, n + 1)] = target
                elif op == "R":
                    b.put_inflight(cid, n + 1, InflightRecord(None, 2, AWAIT_PUBCOMP))
                    inflight[(cid, n + 1)] = None
                elif op == "D":
                    b.delete_inflight(cid, n + 1)
                    inflight.pop((cid, n + 1), None)
                elif op == "P":
                    seqs = sorted(seq for (qc, seq) in queue if qc == cid)
                    if seqs:
                        b.dequeue(cid, seqs[0])
                        del queue[(cid, seqs[0])]
                elif op == "X":
                    b.delete_session(cid)
                    b.put_session(session(cid))
                    queue = {k: v for k, v in queue.items() if k[0] != cid}
                    inflight = {k: v for k, v in inflight.items() if k[0] != cid}
            b.commit()
            if reopen_after:
                store = reopen(store)
            want: dict[int, int] = {}
            for m in [*queue.values(), *inflight.values()]:
                if m is not None:
                    want[m] = want.get(m, 0) + 1
            assert {m: r for m, r, _ in store.messages()} == want
            assert store.counts()["messages"] == len(want)
            assert store.check() == []
            for cid in clients:
                assert {seq: m for seq, m, _q, _msg in store.queue(cid)} == {
                    seq: m for (qc, seq), m in queue.items() if qc == cid}
                got = {pid: (rec.msg_id, None if m is None else m.topic) for pid, rec, m in store.inflight(cid)}
                assert got == {pid: (m, None if m is None else f"m{m}")
                               for (ic, pid), m in inflight.items() if ic == cid}
    finally:
        store.close()


def test_held_messages_are_read_by_a_read_only_open(tmp_path: Path) -> None:
    s = ShardStore.open(tmp_path, 0, 1, map_size=SMALL)
    with s.batch() as b:
        b.put_session(session("a"))
        own = b.add_message(msg("own"))
        b.enqueue("a", own, 1)
        held = b.add_message(msg("held"))
        b.put_inflight("a", 3, InflightRecord(held, 1, AWAIT_PUBACK))
    s.close()
    s = ShardStore.open(tmp_path, 0, 1, readonly=True)
    try:
        assert [(i, r, m.topic) for i, r, m in s.messages()] == [(own, 1, "own"), (held, 1, "held")]
        assert s.counts()["messages"] == 2 and s.message(held) == msg("held") and s.check() == []
        assert s.inflight("a") == [(3, InflightRecord(held, 1, AWAIT_PUBACK), msg("held"))]
        assert list(s.inflight_rows()) == [("a", 3, InflightRecord(held, 1, AWAIT_PUBACK))]
    finally:
        s.close()


def test_a_queued_message_moves_with_its_row_into_flight(store: ShardStore) -> None:
    m = msg("queued", b"q", 1, properties=FULL_PROPS)
    with store.batch() as b:
        b.put_session(session("a"))
        mid = b.add_message(m)
        seq = b.enqueue("a", mid, 1)
    raw = _raw_rows(store)
    assert raw["messages"] == [] and len(raw["queue"]) == 1 and len(raw["queue"][0]) > 9
    assert store.queue("a") == [(seq, mid, 1, m)] and list(store.messages()) == [(mid, 1, m)]
    assert store.check() == []
    store = reopen(store)
    with store.batch() as b:  # as the broker moves it into the window: dequeue, then put in flight
        b.dequeue("a", seq)
        b.put_inflight("a", 7, InflightRecord(mid, 1, AWAIT_PUBACK))
    raw = _raw_rows(store)
    assert raw["messages"] == [] and raw["queue"] == [] and raw["inflight"][0][0] == 2
    assert store.inflight("a") == [(7, InflightRecord(mid, 1, AWAIT_PUBACK), m)] and store.check() == []
    with store.batch() as b:
        b.delete_inflight("a", 7)
    assert list(store.messages()) == [] and store.counts()["messages"] == 0 and store.check() == []
    store.close()


def test_a_row_queued_and_dequeued_in_one_batch_is_never_written(store: ShardStore) -> None:
    """The window opens in the turn that queued a message: straight into flight, no queue row."""
    m, other = msg("passing"), msg("other")
    with store.batch() as b:
        b.put_session(session("a"))
        b.put_session(session("b"))
        mid = b.add_message(m)
        seq = b.enqueue("a", mid, 1)
        kept = b.enqueue("b", mid, 1)  # named by another row as well
        b.dequeue("a", seq)
        b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
        gone = b.add_message(other)
        b.dequeue("b", b.enqueue("b", gone, 1))  # dropped in the same turn: nothing names it
    raw = _raw_rows(store)
    assert len(raw["queue"]) == 1 and len(raw["messages"]) == 1 and len(raw["inflight"]) == 1
    assert store.queue("a") == [] and store.queue("b") == [(kept, mid, 1, m)]
    assert store.inflight("a") == [(1, InflightRecord(mid, 1, AWAIT_PUBACK), m)]
    assert [(i, r) for i, r, _ in store.messages()] == [(mid, 2)] and store.check() == []
    assert store.next_seq == kept + 2  # the seqs were used all the same
    store = reopen(store)
    assert store.queue("b") == [(kept, mid, 1, m)] and store.check() == []
    with store.batch() as b:
        b.delete_inflight("a", 1)
        b.dequeue("b", kept)
    assert _raw_rows(store)["messages"] == [] and store.counts()["messages"] == 0 and store.check() == []
    store.close()


def test_a_large_message_gets_a_row_of_its_own(store: ShardStore) -> None:
    big = msg("big", bytes(600))
    with store.batch() as b:
        b.put_session(session("a"))
        mid = b.add_message(big)
        seq = b.enqueue("a", mid, 1)
    raw = _raw_rows(store)
    assert len(raw["messages"]) == 1 and [len(v) for v in raw["queue"]] == [9]
    with store.batch() as b:
        b.dequeue("a", seq)
        b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
    raw = _raw_rows(store)
    assert len(raw["messages"]) == 1 and [len(v) for v in raw["inflight"]] == [11]
    assert store.inflight("a") == [(1, InflightRecord(mid, 1, AWAIT_PUBACK), big)] and store.check() == []
    with store.batch() as b:
        b.delete_inflight("a", 1)
    assert _raw_rows(store)["messages"] == [] and store.check() == []
    store.close()


def test_a_batch_that_holds_nothing(store: ShardStore) -> None:
    with store.batch(hold=False) as b:
        b.put_session(session("a"))
        mid = b.add_message(msg())
        b.put_inflight("a", 1, InflightRecord(mid, 1, AWAIT_PUBACK))
    raw = _raw_rows(store)
    assert len(raw["messages"]) == 1 and [len(v) for v in raw["inflight"]] == [11]
    with store.batch() as b:
        b.enqueue("a", mid, 1)
    assert [(m, r) for m, r, _ in store.messages()] == [(mid, 2)] and store.check() == []
    store.close()


def test_schema5_directory_is_upgraded_to_a_virtual_shard_index_without_loss(
        tmp_path: Path) -> None:
    """A data directory as schema 5 wrote it (no index of virtual shard -> client) is read as
    it is read-only, and a writable open builds the index in one transaction: the same
    sessions, queues (order), inflight rows, QoS 2 ids and counts, ``check()`` clean."""
    from vshard_data import LONG_ID, model, populate

    populate(tmp_path, sessions=80, shards=1)
    with ShardStore.open(tmp_path, 0, 1) as s:
        before, _ = model([s])
        counts = s.counts()
        per_vshard = s.vshard_counts()
    as_older_schema(tmp_path / "shard-000", 5)
    with ShardStore.open(tmp_path, 0, 1, readonly=True) as s:
        assert s.get_meta("schema_version") == 5 and s.check() == []
        assert model([s])[0] == before and s.vshard_counts() == per_vshard
    with ShardStore.open(tmp_path, 0, 1) as s:
        assert s.get_meta("schema_version") == 6 and s.check() == []
        assert model([s])[0] == before and s.counts() == counts
        assert s.vshard_counts() == per_vshard
        assert [r.client_id for r in s.vshard_sessions([vshard_of(LONG_ID)])] == [LONG_ID]
    env = lmdb.open(str(tmp_path / "shard-000"), max_dbs=10, readonly=True)
    try:
        with env.begin() as txn:
            index = list(txn.cursor(db=env.open_db(b"vshards", txn=txn)).iternext(values=False))
            sessions = list(txn.cursor(db=env.open_db(b"sessions", txn=txn)).iternext(values=False))
        assert sorted(k[2:] for k in index) == sessions and len(sessions) == 80
    finally:
        env.close()


def test_a_broken_virtual_shard_index_is_reported(store: ShardStore) -> None:
    with store.batch() as b:
        for cid in ("a", "b"):
            b.put_session(session(cid))
    path = store.path
    store.close()
    env = lmdb.open(str(path), max_dbs=10)
    with env.begin(write=True) as txn:
        index = env.open_db(b"vshards", txn=txn)
        txn.delete(vshard_of("a").to_bytes(2, "big") + b"a", db=index)
        txn.put((vshard_of("z") + 1).to_bytes(2, "big") + b"b", b"", db=index)
    env.close()
    with ShardStore.open(path.parent, 0, 1, readonly=True) as s:
        assert sorted(s.check()) == [
            "shard 0: session 'a' is missing from the virtual shard index",
            f"shard 0: virtual shard index row {vshard_of('z') + 1:04x} 'b' names no session of it",
        ]


def test_newer_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    ShardStore.open(tmp_path, 0, 1, map_size=SMALL).close()
    _set_meta_raw(tmp_path / "shard-000", b"schema_version", 7)
    with pytest.raises(StoreError) as err:
        ShardStore.open(tmp_path, 0, 1)
    assert str(err.value).endswith("written by a newer ShardBroker (schema 7, this version reads 6); "
                                   "refusing to touch it") and "\n" not in str(err.value)
