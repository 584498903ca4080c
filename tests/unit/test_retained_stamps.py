"""The retained store's stamps (retained schema 2): last writer wins by (stamp, node), local
writes always written with a stamp above the one held, tombstones, the pages a catch-up reads,
the order-independent digest, and the migration of a schema 1 store. Tests may import ``lmdb``
to build a store as an older version wrote it."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cbor2
import lmdb
import pytest

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.batch import text_key
from shardbroker.storage.lmdb_store import RETAINED_SCHEMA_VERSION, RetainedStore
from shardbroker.storage.records import (
    StoreCorrupt,
    StoredMessage,
    StoreError,
    encode_message,
    message_topic_payload,
    pack_message,
)
from shardbroker.storage.stamps import NO_STAMP, RetainedOp, entry_digest, pack, unpack

LONG = "long/" + "x" * 500  # a topic whose key is a digest


def m(topic: str, payload: bytes = b"v", qos: int = 0) -> StoredMessage:
    return StoredMessage(topic, payload, qos, True, NO_PROPERTIES)


def remote(topic: str, payload: bytes | None, stamp: int, node: str) -> RetainedOp:
    return RetainedOp(topic, None if payload is None else m(topic, payload), stamp, node, True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RetainedStore]:
    r = RetainedStore.open(tmp_path, sync=False)
    yield r
    r.close()


# --------------------------------------------------------------------------- rows


@pytest.mark.parametrize(("stamp", "node", "topic"), [(0, "", None), (2**64 - 1, "n-ü", None), (5, "n", LONG)])
def test_stamps_row_round_trip(stamp: int, node: str, topic: str | None) -> None:
    assert unpack(pack(stamp, node, topic)) == (stamp, node, topic)


@pytest.mark.parametrize("row", [b"", b"\x00" * 9, b"\x00" * 8 + b"\x00\x05ab", b"\x00" * 8 + b"\x00\x01\xff"])
def test_a_bad_stamps_row_is_corrupt(row: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        unpack(row)


# --------------------------------------------------------------------------- last writer wins


def test_a_remote_write_is_kept_only_if_newer(store: RetainedStore) -> None:
    assert store.write([remote("t", b"first", 100, "n2")])[0].stamp == 100
    assert store.write([remote("t", b"older", 99, "n9")]) == []  # older stamp: refused
    assert store.get("t") == m("t", b"first") and store.stamp("t") == (100, "n2")
    assert store.write([remote("t", b"first", 100, "n2")]) == []  # the same write again: nothing
    assert store.write([remote("t", b"tie-lower", 100, "n1")]) == []  # tie, smaller node: refused
    written = store.write([remote("t", b"tie-higher", 100, "n3")])  # tie, greater node: kept
    assert [op.msg.payload for op in written if op.msg] == [b"tie-higher"]
    assert store.stamp("t") == (100, "n3")
    store.write([remote("t", b"newer", 101, "a")])
    assert store.get("t") == m("t", b"newer") and store.stamp("t") == (101, "a")


def test_a_local_write_always_wins_with_a_stamp_above_the_one_held(store: RetainedStore) -> None:
    store.write([remote("t", b"remote", 1_000, "n2")])
    op = RetainedOp("t", m("t", b"local"), 500, "n1")  # this node's clock is behind
    assert store.write([op]) == [op] and op.stamp == 1_001
    assert store.get("t") == m("t", b"local") and store.stamp("t") == (1_001, "n1")
    ahead = RetainedOp("t", m("t", b"later"), 5_000, "n1")
    store.write([ahead])
    assert ahead.stamp == 5_000 and store.stamp("t") == (5_000, "n1")
    assert store.write([("t", None)])[0].stamp == 5_001  # a bare pair: local, stamped (0, "") and raised
    assert store.stamp("t") == (5_001, "")


def test_a_delete_leaves_a_tombstone_that_older_writes_do_not_pass(store: RetainedStore) -> None:
    store.write([remote("t", b"v", 10, "n1"), remote(LONG, b"v", 10, "n1")])
    store.write([remote("t", None, 20, "n2"), remote(LONG, None, 20, "n2")])
    assert store.get("t") is None and store.count() == 0
    assert store.stamp("t") == (20, "n2") and store.stamp(LONG) == (20, "n2")
    assert store.write([remote("t", b"late", 15, "n3")]) == []  # sent before the delete, came after
    assert store.get("t") is None
    assert store.stats()["tombstones"] == 2 and store.check() == []
    store.write([remote("t", b"again", 21, "n1")])
    assert store.get("t") == m("t", b"again") and store.stats()["tombstones"] == 1


def test_writes_in_any_order_end_in_the_same_store(tmp_path: Path) -> None:
    """Every node applies the same writes in its own order: they hold the same messages. A
    (stamp, node) pair names one write (a node never stamps two alike); stamps tie across nodes."""
    writes = [remote(f"t/{i % 7}", None if i % 5 == 0 else f"p{i}".encode(), i // 3, f"n{i % 3}")
              for i in range(200)]
    results = []
    for n in range(3):
        shuffled = writes[:]
        random.Random(n).shuffle(shuffled)
        with RetainedStore.open(tmp_path / str(n), sync=False) as r:
            for op in shuffled:
                r.write([RetainedOp(op.topic, op.msg, op.stamp, op.node, True)])
            results.append((r.digest(), list(r.scan()), r.entries(b"", 100)[0]))
    assert results[0] == results[1] == results[2]


def test_an_unknown_topic_has_no_stamp(store: RetainedStore) -> None:
    assert store.stamp("never") == NO_STAMP


# --------------------------------------------------------------------------- pages and digest


def test_entries_come_in_pages_with_tombstones(store: RetainedStore) -> None:
    store.write([remote(f"t/{i:03d}", b"v%d" % i, i + 1, "n1") for i in range(10)])
    store.write([remote("t/004", None, 100, "n2"), remote(LONG, b"long", 7, "n3")])
    seen: list[RetainedOp] = []
    after: bytes | None = b""
    pages = 0
    while after is not None:
        page, after = store.entries(after, 3)
        assert len(page) <= 3
        seen += page
        pages += 1
    assert pages == 4  # 11 entries: 3 + 3 + 3 + 2
    assert [op.topic for op in seen] == [LONG, *(f"t/{i:03d}" for i in range(10))]
    by_topic = {op.topic: op for op in seen}
    assert by_topic["t/004"].msg is None and (by_topic["t/004"].stamp, by_topic["t/004"].node) == (100, "n2")
    assert by_topic[LONG].msg == m(LONG, b"long") and by_topic["t/007"].stamp == 8
    assert not any(op.remote for op in seen)
    assert store.entries(b"", 100)[1] is None


def test_dollar_topics_are_neither_paged_nor_digested(store: RetainedStore) -> None:
    store.write([RetainedOp("$SYS/broker/uptime", m("$SYS/broker/uptime"), 7, "n1"), RetainedOp("a", m("a"), 8, "n1")])
    assert store.stamp("$SYS/broker/uptime") == (7, "n1")  # stamped all the same
    assert [op.topic for op in store.entries()[0]] == ["a"]
    assert store.digest() == (1, entry_digest("a", 8, "n1", b"v"))


def test_the_digest_covers_live_entries_and_their_stamps(tmp_path: Path) -> None:
    with RetainedStore.open(tmp_path / "a", sync=False) as a, RetainedStore.open(tmp_path / "b", sync=False) as b:
        assert a.digest() == (0, 0)
        a.write([remote("x", b"1", 1, "n1"), remote("y", b"2", 2, "n1"), remote("z", None, 3, "n1")])
        b.write([remote("y", b"2", 2, "n1"), remote("z", b"gone", 1, "n2"), remote("x", b"1", 1, "n1")])
        assert a.digest() != b.digest()  # b has not seen the delete of z
        b.write([remote("z", None, 3, "n1")])
        assert a.digest() == b.digest() == (2, (entry_digest("x", 1, "n1", b"1")
                                                + entry_digest("y", 2, "n1", b"2")) % 2**64)
        b.write([remote("y", b"2", 9, "n1")])  # the same payload, written again later
        assert a.digest()[1] != b.digest()[1]


@pytest.mark.parametrize("row", [encode_message(m("a/b", b"\x00p")), pack_message(m("a/b", b"\x00p"))])
def test_a_rows_topic_and_payload_alone(row: bytes) -> None:
    assert message_topic_payload(row) == ("a/b", b"\x00p")


@pytest.mark.parametrize("row", [cbor2.dumps({"t": "a"}), cbor2.dumps({"t": 1, "p": b""}), cbor2.dumps([1]), b"\xff"])
def test_a_row_without_topic_or_payload_is_corrupt(row: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        message_topic_payload(row)


# --------------------------------------------------------------------------- schema 1


def _schema1_retained(data_dir: Path, topics: list[str], tag: bytes = b"") -> Path:
    """A retained store as schema 1 wrote it: meta and retained, no stamps; each payload is
    ``tag`` and the topic's first 8 bytes."""
    path = data_dir / "retained"
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 20)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn, create=True)
        retained = env.open_db(b"retained", txn=txn, create=True)
        for key, value in {"schema_version": 1, "kind": "retained", "created_at": 1.7e9}.items():
            txn.put(key.encode(), cbor2.dumps(value), db=meta)
        for t in topics:
            txn.put(text_key(t), encode_message(m(t, tag + t.encode()[:8])), db=retained)
    env.close()
    return path


def test_a_schema1_store_is_read_as_it_is_read_only(tmp_path: Path) -> None:
    _schema1_retained(tmp_path, ["a", "b"])
    with RetainedStore.open(tmp_path, readonly=True) as r:
        assert r.get_meta("schema_version") == 1
        assert r.stamp("a") == NO_STAMP and r.count() == 2
        assert r.digest() == (2, (entry_digest("a", 0, "", b"a") + entry_digest("b", 0, "", b"b")) % 2**64)
        assert r.stats()["tombstones"] == 0
        assert r.entries() == ([], None) and r.check() == []


def test_a_schema1_store_is_migrated_by_a_writable_open(tmp_path: Path) -> None:
    _schema1_retained(tmp_path, ["a", "b/c", LONG])
    with RetainedStore.open(tmp_path, sync=False) as r:
        assert r.get_meta("schema_version") == RETAINED_SCHEMA_VERSION == 2
        assert [r.stamp(t) for t in ("a", "b/c", LONG)] == [NO_STAMP] * 3
        page, after = r.entries()
        assert [(op.topic, op.stamp, op.node) for op in page] == [("a", 0, ""), ("b/c", 0, ""), (LONG, 0, "")]
        assert after is None and r.check() == []
        # any stamped write is newer than what the migration stamped
        assert r.write([remote("a", b"new", 1, "")]) != []
        assert r.get("a") == m("a", b"new")
    with RetainedStore.open(tmp_path, sync=False) as r:  # opened again: nothing more to do
        assert r.stamp("a") == (1, "") and r.count() == 3


def test_two_migrated_stores_converge_on_messages_stamped_alike(tmp_path: Path) -> None:
    """Two nodes upgraded with different messages for one topic, both stamped (0, ""): each
    sends the other its own, and both keep the same one (the payload decides the tie)."""
    _schema1_retained(tmp_path / "a", ["t/x", "t/y"], b"a:")
    _schema1_retained(tmp_path / "b", ["t/x", "t/z"], b"b:")
    with RetainedStore.open(tmp_path / "a", sync=False) as a, RetainedStore.open(tmp_path / "b", sync=False) as b:
        assert a.stamp("t/x") == b.stamp("t/x") == NO_STAMP and a.get("t/x") != b.get("t/x")
        for _ in range(2):  # each sends the other everything it holds, twice over
            from_a, from_b = a.entries()[0], b.entries()[0]
            b.write([RetainedOp(o.topic, o.msg, o.stamp, o.node, True) for o in from_a])
            a.write([RetainedOp(o.topic, o.msg, o.stamp, o.node, True) for o in from_b])
        assert a.digest() == b.digest() and a.entries() == b.entries()
        assert a.digest()[0] == 3 and a.get("t/x") == b.get("t/x")


def test_several_processes_open_a_schema1_store_at_once(tmp_path: Path) -> None:
    """Every worker opens the shared store at start: one migrates, the others find it done."""
    _schema1_retained(tmp_path, [f"t/{i}" for i in range(50)])
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from shardbroker.storage.lmdb_store import RetainedStore
        sys.stdin.readline()
        with RetainedStore.open(Path(sys.argv[1]), sync=False) as r:
            print(r.get_meta("schema_version"), r.stamp("t/7"), r.count())
    """)
    children = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [c.communicate("go\n", timeout=60) for c in children]
    assert [c.returncode for c in children] == [0, 0, 0], outs
    assert {out for out, _ in outs} == {"2 (0, '') 50\n"}
    with RetainedStore.open(tmp_path, readonly=True) as r:
        assert r.check() == [] and r.stats()["tombstones"] == 0


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    RetainedStore.open(tmp_path, sync=False).close()
    env = lmdb.open(str(tmp_path / "retained"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", cbor2.dumps(3), db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreError, match="newer ShardBroker"):
        RetainedStore.open(tmp_path, sync=False)
