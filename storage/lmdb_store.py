"""The durable message store on LMDB: one environment per shard, one for retained messages.

What it does:

* ``ShardStore`` keeps everything one shard (one worker process) must survive a
  restart with: sessions (with subscriptions and will), queued messages,
  in-flight QoS 1/2 state and the packet ids of incoming QoS 2 publishes. Each
  shard has its own LMDB environment and therefore its own writer: shards commit
  in parallel.
* ``Batch`` (``batch.py``, compiled with the hot path) is the only way to write a
  shard: operations are collected in memory and ``commit()`` applies them in order
  in ONE write transaction (one fsync when ``sync=True``) - group commit. Ids
  (``msg_id``, ``seq``) are allocated when the operation is added, so callers have
  them at once. A queue row that the batch adds and then removes is not written.
* A message that fans out to many sessions of a shard is stored once, with a
  reference count: +1 per queue row and per in-flight row naming it. The counts
  live in memory (a writable open counts the rows once); only the rows are stored.
* ``RetainedStore`` is the one environment shared by all worker processes for
  retained messages (LMDB serialises writers across processes).
* When the map is full a commit grows it (doubling, up to ``max_map_size``) and
  retries the whole batch; past that, or when the disk is full, it raises
  ``StoreFull`` and the transaction is aborted, so the store is unchanged.

On-disk layout (``data_dir`` is what ``--data-dir`` names)::

    data_dir/shard-000/{data.mdb,lock.mdb}   one environment per shard (shard-001, ...)
    data_dir/retained/{data.mdb,lock.mdb}    retained messages, shared by all shards

Keys are bytes. ``CK`` (client key) is the client id in UTF-8 if that is at most
400 bytes, else its first 383 bytes + ``0xFF`` + a 16-byte BLAKE2b digest of the
whole id (``0xFF`` never occurs in UTF-8, LMDB keys are limited to 511 bytes).
Retained topics use the same scheme. Client ids never contain NUL, so
``CK + 0x00`` is a prefix owned by exactly one client. ``v`` is the client's
virtual shard, ``vshard_of(client_id)`` (``shard_for(client_id, 1024)``, the
cluster's); ``vshards`` indexes the sessions by it, so the clients of one virtual
shard are one key range there (``vshard_sessions``; ``storage/vshards.py`` moves
them with their rows). Integers are big-endian
so that byte order is numeric order. Shard tables (LMDB named databases):

=========  =====================================  ==========================================
table      key                                    value
=========  =====================================  ==========================================
meta       UTF-8 name                             CBOR value: ``schema_version``, ``kind``
                                                  ("shard"), ``shard``, ``shards``,
                                                  ``created_at``, ``next_msg_id``,
                                                  ``next_seq``; plus ``set_meta`` keys
sessions   CK                                     CBOR ``SessionRecord``
messages   msg_id (u64)                           packed ``StoredMessage`` (schema 1: CBOR)
queue      CK + 0x00 + seq (u64)                  msg_id (u64) + qos (u8), then possibly
                                                  the packed message it holds
inflight   CK + 0x00 + packet_id (u16)            packed ``InflightRecord``, possibly holding
                                                  its message (schema 1: CBOR)
qos2in     CK + 0x00 + packet_id (u16)            empty
vshards    v (u16) + CK                           empty: one row per session (schema 6)
outbox     peer shard (u16) + seq (u64)           hand-overs to another shard from ``seq`` on, kept
                                                  until that shard acks the last: a peer batch of
                                                  ``DurableForward`` (schema 4 and older: one, as
                                                  a peer message, or older still CBOR)
=========  =====================================  ==========================================

The packed row formats are described in ``records.py``; readers take both them
and the CBOR rows of schema 1.

The retained environment has ``meta`` (``kind`` = "retained"), ``retained``: topic key
(as CK above) -> CBOR ``StoredMessage``, and ``stamps``: topic key -> the stamp and node
of the last write of the topic (``storage/stamps.py``), written in the transaction that
writes or deletes its ``retained`` row. A delete leaves its stamps row as a tombstone,
so that an older write from another node cannot bring the message back; tombstones are
never purged (one row of about 12 bytes plus the node ID and key per topic ever deleted):
a purge would be safe only once every node had seen the delete, which no node knows.
Retained schema (``RETAINED_SCHEMA_VERSION``) 2; a writable open of a schema 1 store
(no ``stamps``) migrates it in one transaction: every row gets stamp 0 and node "", older
than any write stamped since. A read-only open of one reads every topic as (0, "").

Schema versions (``meta`` ``schema_version``; ``SCHEMA_VERSION`` is what this code
writes, a store of a higher one is refused):

* 1: CBOR message and inflight rows, and a ``refs`` table (msg_id (u64) ->
  refcount (u64)) written in every commit that changed a count.
* 2: packed message and inflight rows (CBOR ones written by 1 are read as they
  are, never rewritten), no ``refs`` table: the counts are rebuilt at open from
  the queue and inflight rows. A writable open of a schema 1 store migrates it in
  one transaction: it drops ``refs`` and sets the version to 2 (which keeps an
  older ShardBroker, which would take the missing ``refs`` rows for zero counts,
  from opening it). A read-only open changes nothing and reads it as it is.
* 3: as 2, and an inflight row may hold its message (format 0x02 in
  ``records.py``): a message added by a batch whose only reference at the end of
  that batch is one inflight row, and whose packed form is at most ``batch.HOLD_MAX``
  (512) bytes, is written into that row, not into ``messages``,
  and goes when the row goes (replaced or deleted). When a later operation names it
  too, it gets its own ``messages`` row first and the inflight row is rewritten
  without it (a row of an earlier batch is found by reading the queue and inflight
  tables: slow, and the broker does not do it, see ``ShardStore._holder``; a
  batch from ``ShardStore.batch(hold=False)`` holds nothing, for bulk loads). The version keeps a
  schema 2 reader, which does not know such rows, away.
* 4: as 3, and a queue row may hold its message in the same way (the packed
  message after its 9 bytes). A row that is removed leaves its message at hand for
  the rest of the batch: a message dequeued and put in flight in one batch moves
  from the queue row into the inflight row, and is never written on its own.
  Such a move writes the message again, and LMDB reuses the pages a transaction
  frees only in later ones: draining a nearly full store needs room for what a
  commit moves. Hence the small ``batch.HOLD_MAX``: a larger message gets its own row, as
  in schema 2, and moving it writes 11 bytes.
* 5: as 4, and an outbox row may hold several consecutive hand-overs to one peer
  (``core/outbox.py`` writes the ones of an event-loop iteration as one row); a
  schema 4 reader takes a row for one.
* 6: as 5, and the ``vshards`` table: a row per session, written and deleted in
  the commit that writes or deletes the session (a schema 5 writer would not keep
  it). A writable open of an older store builds it in the transaction of the
  migration (about 1 s per 100,000 sessions, ``loadtests/vshard_move.py``); a
  read-only open of one finds a virtual shard's sessions by reading every session.
  Meta keys ``move.in.*`` and ``move.out.*`` mark a move of virtual shards under
  way: a writable open refuses such a store unless ``moves=True``
  (``storage/vshards.py``, which finishes or undoes the move).

A writable open of a store of schema 1 to 5 migrates it to 6 as above (2 to 4 to 5
only set the version).

Invariants:

* A message row exists iff some queue or inflight row names it; a held message
  is named by its row alone. The count of ``m`` (``ShardStore._refs``, in memory)
  equals the number of those rows (about 100 bytes of memory per message with a
  row of its own; a held message costs none). Counts
  are settled at the end of each batch, in its transaction: a message whose count
  is 0 after the batch (including one added by the batch and never enqueued) is
  deleted in the same commit that removed its last row, so no crash leaves a row
  naming a deleted message. A held message and its row are one LMDB value, so a
  crash leaves both or neither, and a move between rows is in one transaction.
  The in-memory counts change only after a successful commit. Moving a message
  from the queue to in-flight within one batch therefore never deletes it.
* A writable open counts the references of every message and deletes message rows
  that nothing names (a leak: none should exist, as every commit keeps the
  invariant above; it is not done when some row cannot be read). ``check()``
  reports such a row, and a count (schema 1 ``refs`` row, or in memory) that
  differs from the rows.
* ``msg_id`` and ``seq`` are per shard, start at 1, only increase, and survive
  restarts (counters in ``meta``); ids allocated by a batch that failed are not
  reused.
* Nothing is ever written to a directory that is not recognisably ours: foreign
  files, a non-LMDB ``data.mdb``, an LMDB file without our meta, a newer schema
  or a different shard count all raise ``StoreError`` before any write.
* Reads take their own short read transaction (LMDB readers never block the
  writer). Iterators read in pages and never hold a transaction across a
  ``yield``; they see a consistent page, not a snapshot of the whole table.

What it does not do:

* No MQTT logic: expiry, delivery order and session takeover are the broker's.
* Not thread-safe, and one writing process per shard (detected on commit).
* Do not open the same environment twice in one process (LMDB forbids it; the
  second open raises ``StoreError``) - this includes ``data_dir_shards`` in a
  process that holds shard 0 open.
* Retained ``scan`` order is byte order of the key: topics longer than 400
  UTF-8 bytes sort after the shorter topics sharing their first 383 bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

import lmdb

from shardbroker.storage import stamps as stamps_row
from shardbroker.storage.batch import (
    HASHED_HEAD,
    HOLD_MAX,
    INFLIGHT_ROW,
    INFLIGHT_SIZE,
    QROW,
    SEP,
    U16,
    U64,
    VIRTUAL_SHARDS,
    Batch,
    Ids,
    Ops,
    Tables,
    apply,
    holds,
    vshard_of,
)
from shardbroker.storage.batch import client_key as _client_key
from shardbroker.storage.batch import text_key as _text_key
from shardbroker.storage.records import (
    InflightRecord,
    SessionRecord,
    StoreCorrupt,
    StoredMessage,
    StoreError,
    StoreFull,
    decode_inflight,
    decode_inflight_row,
    decode_message,
    decode_session,
    decode_value,
    encode_message,
    encode_value,
    inflight_msg_id,
    message_topic_payload,
)
from shardbroker.storage.session_state import ClientState
from shardbroker.storage.stamps import DIGEST_MOD, NO_STAMP, RetainedOp, entry_digest

__all__ = [
    "MOVE_PREFIX",
    "RETAINED_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "VIRTUAL_SHARDS",
    "Batch",
    "ClientState",
    "RetainedStore",
    "ShardStore",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "copy_together",
    "data_dir_shards",
    "shard_dir_name",
    "vshard_of",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 6
"""Shard stores (see the module docstring): 1 to 5 are still read, and migrated by a writable open."""
RETAINED_SCHEMA_VERSION: Final = 2
"""1: ``retained`` alone; 2: and ``stamps`` (see the module docstring)."""

_SHARD_TABLES: Final = ("meta", "sessions", "messages", "queue", "inflight", "qos2in", "outbox")
_SHARD_NEW_TABLES: Final = ("vshards",)  # created with a store; older ones have none until migrated
_RETAINED_TABLES: Final = ("meta", "retained")
_RETAINED_NEW_TABLES: Final = ("stamps",)  # created with a store; a schema 1 one has none until migrated
MOVE_PREFIX: Final = "move."
"""Meta keys of a move of virtual shards under way (``storage/vshards.py``)."""
_LMDB_FILES: Final = frozenset({"data.mdb", "lock.mdb"})
_LMDB_MAGIC: Final = 0xBEEFC0DE
_OS_PAGE: Final = 4096
_MAX_DBS: Final = 10
_MAX_READERS: Final = 126
_PAGE_ROWS: Final = 512
_SHARD_DIR_RE: Final = re.compile(r"shard-(\d{3,})")
_DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def shard_dir_name(shard: int) -> str:
    return f"shard-{shard:03d}"


def _key_text(key: bytes) -> str:
    """Best-effort text of a key made by ``_text_key`` (for reports on orphan rows)."""
    if b"\xff" not in key:
        return key.decode("utf-8", "surrogatepass")
    head, _, digest = key.partition(b"\xff")
    return head.decode("utf-8", "ignore") + "...#" + digest.hex()[:8]


def _vshard_prefix(vshard: int) -> bytes:
    """The first two bytes of the ``vshards`` rows of ``vshard`` (schema 6)."""
    if not 0 <= vshard < VIRTUAL_SHARDS:
        raise ValueError(f"virtual shard {vshard} out of range 0..{VIRTUAL_SHARDS - 1}")
    return U16.pack(vshard)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def _is_disk_full(exc: lmdb.Error) -> bool:
    return isinstance(exc, lmdb.DiskError) or getattr(exc, "code", None) in _DISK_FULL_ERRNOS


def _page_align(n: int) -> int:
    return -(-n // _OS_PAGE) * _OS_PAGE


# --------------------------------------------------------------------------- environment


def _check_directory(path: Path, *, readonly: bool, create: bool) -> int | None:
    """Refuse anything that is not (or not yet) one of our environments.

    Returns the size of ``data.mdb``, or ``None`` when there is none yet (after
    creating the directory if allowed).
    """
    if not path.exists():
        if readonly or not create:
            raise StoreError(f"{path}: no store here")
        try:
            path.mkdir(parents=True, exist_ok=True)  # exist_ok: concurrent first opens
        except OSError as exc:
            raise StoreError(f"{path}: cannot create directory ({exc.strerror})") from None
        return None
    if not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory")
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise StoreError(f"{path}: cannot read directory ({exc.strerror})") from None
    foreign = sorted(names - _LMDB_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(f"{path}: not a ShardBroker store (contains {shown}); refusing to touch it")
    data = path / "data.mdb"
    if "data.mdb" not in names:
        if readonly or not create:
            raise StoreError(f"{path}: no store here (no data.mdb)")
        return None
    try:
        size = data.stat().st_size
        with data.open("rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise StoreError(f"{data}: cannot read ({exc.strerror})") from None
    if size == 0 and not readonly:
        return 0  # created by a concurrent opener that has not written yet; LMDB initialises it
    if len(head) < 24 or struct.unpack_from("<II", head, 16) != (_LMDB_MAGIC, 1):
        raise StoreError(f"{data}: not an LMDB data file; refusing to touch it")
    return size


@dataclass(frozen=True, slots=True)
class _Row:
    key: bytes
    value: bytes


class _Env:
    """One open LMDB environment with its named tables; no knowledge of records."""

    __slots__ = ("dbs", "env", "max_map_size", "meta", "path", "readonly")

    def __init__(
        self,
        path: Path,
        env: lmdb.Environment,
        dbs: dict[str, lmdb._Database],
        readonly: bool,
        max_map_size: int,
        meta: dict[str, object],
    ) -> None:
        self.path = path
        self.env = env
        self.dbs = dbs
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.meta = meta

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        kind: str,
        tables: tuple[str, ...],
        init_meta: Callable[[], dict[str, object]],
        map_size: int,
        max_map_size: int,
        sync: bool,
        readonly: bool,
        create: bool,
        schema: int,
        new_tables: tuple[str, ...] = (),
    ) -> _Env:
        """Open (or create) the environment at ``path``: ``tables`` must exist, ``new_tables``
        are created with a new environment and opened when present (a migration makes them)."""
        if map_size <= 0 or max_map_size < map_size:
            raise ValueError("need 0 < map_size <= max_map_size")
        size = _check_directory(path, readonly=readonly, create=create)
        requested = _page_align(map_size)
        effective = max(requested, _page_align(size or 0))
        try:
            env = lmdb.open(
                str(path),
                map_size=0 if readonly else effective,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                metasync=sync,
                sync=sync,
                map_async=False,
                writemap=False,
                max_readers=_MAX_READERS,
                max_dbs=_MAX_DBS,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open LMDB environment ({_reason(exc)})") from None
        try:
            if not readonly:
                cls._initialise(env, path, tables + new_tables, init_meta)
                got = env.info()["map_size"]
                if got > requested:
                    log.info(
                        "%s: existing data (%d bytes) is larger than map_size %d; map set to %d",
                        path, size or 0, requested, got,
                    )
                    if got > max_map_size:
                        log.warning(
                            "%s: store is already larger than max_map_size %d; it cannot grow",
                            path, max_map_size,
                        )
            dbs = cls._open_tables(env, path, ("meta",))
            meta = cls._read_meta(env, dbs["meta"], path)
            version = meta.get("schema_version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise StoreCorrupt(f"{path}: store has an invalid schema version {version!r}")
            if version > schema:
                raise StoreError(
                    f"{path}: store was written by a newer ShardBroker (schema {version}, "
                    f"this version reads {schema}); refusing to touch it"
                )
            if meta.get("kind") != kind:
                raise StoreError(f"{path}: holds a {meta.get('kind')!r} store, expected {kind!r}")
            dbs.update(cls._open_tables(env, path, tables))
            opened = cls(path, env, dbs, readonly, max_map_size, meta)
            for name in new_tables:
                opened.open_optional(name)
        except BaseException:
            env.close()
            raise
        return opened

    @staticmethod
    def _initialise(
        env: lmdb.Environment,
        path: Path,
        tables: tuple[str, ...],
        init_meta: Callable[[], dict[str, object]],
    ) -> None:
        """Create our tables and meta in an empty environment; refuse a foreign one.

        Runs in a write transaction, so concurrent openers of a new shared
        environment (the retained store) initialise it exactly once.
        """
        try:
            txn = env.begin(write=True)
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot start a transaction ({_reason(exc)})") from None
        try:
            names = [key for key, _ in txn.cursor()]
            if b"meta" in names:
                txn.abort()
                return  # ours, or claims to be: validated by the caller
            if names:
                raise StoreError(
                    f"{path}: LMDB file without ShardBroker metadata; refusing to touch it"
                )
            dbs = {name: env.open_db(name.encode(), txn=txn, create=True) for name in tables}
            for key, value in init_meta().items():
                txn.put(key.encode(), encode_value(value), db=dbs["meta"])
            txn.commit()
            log.info("%s: created new store", path)
        except lmdb.Error as exc:
            txn.abort()
            raise StoreError(f"{path}: cannot initialise store ({_reason(exc)})") from None
        except BaseException:
            txn.abort()
            raise

    @staticmethod
    def _open_tables(env: lmdb.Environment, path: Path, tables: tuple[str, ...]) -> dict[str, lmdb._Database]:
        dbs: dict[str, lmdb._Database] = {}
        for name in tables:
            try:
                dbs[name] = env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                if name == "meta":
                    raise StoreError(
                        f"{path}: LMDB file without ShardBroker metadata; refusing to touch it"
                    ) from None
                raise StoreCorrupt(f"{path}: table {name!r} is missing") from None
            except lmdb.Error as exc:
                raise StoreError(
                    f"{path}: LMDB file without ShardBroker metadata ({_reason(exc)}); "
                    f"refusing to touch it"
                ) from None
        return dbs

    def open_optional(self, name: str) -> bool:
        """Open table ``name`` into ``dbs`` if the environment has it; whether it has."""
        try:
            self.dbs[name] = self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            return False
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open table {name!r} ({_reason(exc)})") from None
        return True

    @staticmethod
    def _read_meta(env: lmdb.Environment, db: lmdb._Database, path: Path) -> dict[str, object]:
        meta: dict[str, object] = {}
        try:
            with env.begin(db=db) as txn:
                for key, value in txn.cursor():
                    meta[key.decode("utf-8", "replace")] = decode_value(value, f"{path} meta")
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot read meta ({_reason(exc)})") from None
        return meta

    # -- transactions

    def begin(self, write: bool = False) -> lmdb.Transaction[bytes]:
        for _ in range(3):
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew the map: adopt its size
            except lmdb.Error as exc:
                raise StoreError(f"{self.path}: cannot start a transaction ({_reason(exc)})") from None
        raise StoreError(f"{self.path}: map keeps being resized by another process")

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction[bytes]]:
        txn = self.begin()
        try:
            yield txn
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: read failed ({_reason(exc)})") from None
        finally:
            txn.abort()

    def get(self, table: str, key: bytes) -> bytes | None:
        with self.read() as txn:
            return txn.get(key, db=self.dbs[table])

    def rows(self, table: str, prefix: bytes = b"", page: int = _PAGE_ROWS) -> Iterator[_Row]:
        """Rows whose key starts with ``prefix``, in key order, read ``page`` at a time."""
        db = self.dbs[table]
        last: bytes | None = None
        while True:
            chunk: list[_Row] = []
            with self.read() as txn:
                cur = txn.cursor(db=db)
                start = prefix if last is None else last
                ok = cur.set_range(start) if start else cur.first()
                if ok and last is not None and cur.key() == last:
                    ok = cur.next()
                while ok:
                    key = cur.key()
                    if not key.startswith(prefix):
                        break
                    chunk.append(_Row(key, cur.value()))
                    if len(chunk) >= page:
                        break
                    ok = cur.next()
            yield from chunk
            if len(chunk) < page:
                return
            last = chunk[-1].key

    def count(self, table: str, prefix: bytes = b"") -> int:
        if not prefix:
            with self.read() as txn:
                return txn.stat(self.dbs[table])["entries"]
        n = 0
        with self.read() as txn:
            cur = txn.cursor(db=self.dbs[table])
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                n += 1
                ok = cur.next()
        return n

    def sizes(self) -> dict[str, int]:
        info = self.env.info()
        psize = self.env.stat()["psize"]
        try:
            file_bytes = (self.path / "data.mdb").stat().st_size
        except OSError:
            file_bytes = 0
        return {
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * psize,
            "file_bytes": file_bytes,
        }

    def fill(self) -> float:
        """Pages holding data (all tables, LMDB's own bookkeeping aside) over ``max_map_size``.

        Unlike the file's high-water mark this falls again when data is deleted, so it
        tells whether there is room left to write, and to drain."""
        with self.read() as txn:
            pages = 0
            for db in self.dbs.values():
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            psize = self.env.stat()["psize"]
        return pages * psize / self.max_map_size

    # -- writes

    def write(self, apply: Callable[[lmdb.Transaction[bytes]], Callable[[], None] | None]) -> None:
        """Run ``apply`` in one write transaction and commit; grow the map and retry when full.

        ``apply`` may return a callback, run only after a successful commit.
        On any failure the transaction is aborted and nothing is written.
        """
        if self.readonly:
            raise StoreError(f"{self.path}: store is open read-only")
        while True:
            txn = self.begin(write=True)
            try:
                after = apply(txn)
                txn.commit()
            except lmdb.MapFullError:
                _abort(txn)
                self.grow()
                continue
            except lmdb.Error as exc:
                _abort(txn)
                if _is_disk_full(exc):
                    raise StoreFull(f"{self.path}: disk full ({_reason(exc)})") from None
                raise StoreError(f"{self.path}: write failed ({_reason(exc)})") from None
            except BaseException:
                _abort(txn)
                raise
            if after is not None:
                after()
            return

    def grow(self) -> None:
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            raise StoreFull(
                f"{self.path}: store is full (map size {current} bytes reached max_map_size)"
            )
        new = min(_page_align(current * 2), self.max_map_size)
        log.info("%s: map full at %d bytes, growing to %d", self.path, current, new)
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as exc:
            raise StoreFull(f"{self.path}: cannot grow map to {new} bytes ({_reason(exc)})") from None

    def copy_compacted(self, dest: Path) -> None:
        _empty_destination(dest)
        try:
            self.env.copy(str(dest), compact=True)
        except lmdb.Error as exc:
            if _is_disk_full(exc):
                raise StoreFull(f"{dest}: disk full while copying") from None
            raise StoreError(f"{dest}: copy failed ({_reason(exc)})") from None

    def close(self) -> None:
        self.env.close()


def _abort(txn: lmdb.Transaction[bytes]) -> None:
    try:
        txn.abort()
    except lmdb.Error:  # already finished by a failed commit
        pass


# --------------------------------------------------------------------------- shard store


def _meta_int(meta: dict[str, object], key: str, path: Path) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreCorrupt(f"{path}: meta {key!r} is missing or not an integer")
    return value


class ShardStore:
    """The durable state of one shard. See the module docstring."""

    __slots__ = (
        "_env",
        "_holder_scans",
        "_ids",
        "_indexed",
        "_refs",
        "_saved_msg_id",
        "_saved_seq",
        "_tables",
        "data_dir",
        "on_commit",
        "shard",
        "shards",
    )

    def __init__(self, env: _Env, data_dir: Path, shard: int, shards: int) -> None:
        self._env = env
        # Told (seconds, operations) after each successful batch commit: the worker's metrics.
        self.on_commit: Callable[[float, int], None] | None = None
        self.data_dir = data_dir
        self.shard = shard
        self.shards = shards
        self._saved_msg_id = _meta_int(env.meta, "next_msg_id", env.path)
        self._saved_seq = _meta_int(env.meta, "next_seq", env.path)
        self._ids = Ids(self._saved_msg_id, self._saved_seq)  # taken by batches as they add
        self._tables: Tables | None = None  # what batches write, once writable (``_prepare``)
        # msg_id -> queue and inflight rows naming it, for every row of ``messages``; kept
        # by writable stores only (built by ``_prepare``, updated after each commit)
        self._refs: dict[int, int] = {}
        self._holder_scans = 0  # see ``_holder``
        # the ``vshards`` index (schema 6; a writable open builds it in an older store)
        self._indexed = "vshards" in env.dbs

    @classmethod
    def open(
        cls,
        data_dir: Path,
        shard: int,
        shards: int,
        *,
        map_size: int = 64 << 20,
        max_map_size: int = 16 << 30,
        sync: bool = True,
        readonly: bool = False,
        create: bool = True,
        moves: bool = False,
    ) -> ShardStore:
        """Open (or create) one shard's store. A writable open refuses a store marked by a
        move of virtual shards that did not finish, unless ``moves`` (``storage/vshards.py``
        opens it so, to finish or undo the move)."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} out of range for {shards} shards")
        data_dir = Path(data_dir)
        path = data_dir / shard_dir_name(shard)
        if not readonly and create and not (path / "data.mdb").exists():
            _check_siblings(data_dir, shards)

        def init_meta() -> dict[str, object]:
            return {
                "schema_version": SCHEMA_VERSION,
                "kind": "shard",
                "shard": shard,
                "shards": shards,
                "created_at": time.time(),
                "next_msg_id": 1,
                "next_seq": 1,
            }

        env = _Env.open(
            path, kind="shard", tables=_SHARD_TABLES, new_tables=_SHARD_NEW_TABLES,
            init_meta=init_meta, map_size=map_size,
            max_map_size=max_map_size, sync=sync, readonly=readonly, create=create,
            schema=SCHEMA_VERSION,
        )
        try:
            stored_shards = _meta_int(env.meta, "shards", path)
            stored_shard = _meta_int(env.meta, "shard", path)
            if stored_shards != shards:
                raise StoreError(
                    f"data directory {data_dir} was created with {stored_shards} workers "
                    f"(shards), not {shards}; start with {stored_shards} workers or use "
                    f"another data directory"
                )
            if stored_shard != shard:
                raise StoreError(f"{path}: holds shard {stored_shard}, not shard {shard}")
            marks = sorted(k for k in env.meta if k.startswith(MOVE_PREFIX))
            if marks and not readonly and not moves:
                raise StoreError(
                    f"{path}: a move of virtual shards that did not finish marks this store "
                    f"({marks[0]}); run `shardbroker store reshard --data-dir {data_dir} "
                    f"--workers {shards}` to finish or undo it"
                )
            if _meta_int(env.meta, "schema_version", path) >= 6 and "vshards" not in env.dbs:
                raise StoreCorrupt(f"{path}: table 'vshards' is missing")
            store = cls(env, data_dir, shard, shards)
            if env.meta["schema_version"] == 1:
                env.open_optional("refs")
            if not readonly:
                store._prepare()
        except BaseException:
            env.close()
            raise
        log.debug("opened shard %d/%d at %s (readonly=%s)", shard, shards, path, readonly)
        return store

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self) -> None:
        """A writable open: count every message's references, delete any message row nothing
        names, and migrate a store of an older schema (see the module docstring)."""
        env = self._env
        messages, meta = env.dbs["messages"], env.dbs["meta"]
        with env.read() as txn:
            refs, _, _, complete = self._references(txn)
            keys = list(txn.cursor(db=messages).iternext(keys=True, values=False))
        counts: dict[int, int] = {}
        orphans: list[bytes] = []
        for key in keys:
            if len(key) != 8:
                complete = False  # not ours to judge: check() reports it
                continue
            msg_id = U64.unpack(key)[0]
            n = refs.get(msg_id)
            if n:
                counts[msg_id] = n
            else:
                orphans.append(key)
        if not complete:  # a row we cannot read may name any of them: keep them all
            orphans = []
        if len(counts) < len(refs):
            log.warning("%s: %d message(s) named by queue or inflight rows are missing",
                        self.path, len(refs) - len(counts))
        version = env.meta["schema_version"]
        if orphans or version != SCHEMA_VERSION:
            refs_db = env.dbs.get("refs")
            build_index = "vshards" not in env.dbs

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                for key in orphans:
                    txn.delete(key, db=messages)
                if refs_db is not None:
                    txn.drop(refs_db, delete=True)
                if build_index:
                    self._build_index(txn)
                if version != SCHEMA_VERSION:
                    txn.put(b"schema_version", encode_value(SCHEMA_VERSION), db=meta)

            env.write(apply)
            if orphans:
                log.warning("%s: deleted %d message(s) that no queue or inflight row named",
                            self.path, len(orphans))
            if build_index:
                env.open_optional("vshards")
                self._indexed = True
            if version != SCHEMA_VERSION:
                env.dbs.pop("refs", None)
                env.meta["schema_version"] = SCHEMA_VERSION
                log.info("%s: migrated store from schema %s to %d", self.path, version, SCHEMA_VERSION)
        self._refs = counts
        dbs = env.dbs
        self._tables = Tables(dbs["meta"], dbs["sessions"], dbs["messages"], dbs["queue"],
                              dbs["inflight"], dbs["qos2in"], dbs["vshards"], dbs["outbox"])

    def _build_index(self, txn: lmdb.Transaction[bytes]) -> None:
        """Schema 5 to 6: create ``vshards`` with a row per session, in the transaction of the
        migration (all or nothing). A record that cannot be read is left out (check() reports
        the record, and the row it lacks)."""
        index = self._env.env.open_db(b"vshards", txn=txn, create=True)
        put = txn.put
        for key, value in txn.cursor(db=self._env.dbs["sessions"]):
            try:  # a key without 0xFF is the client id itself; a digest needs the record
                client_id = (key.decode("utf-8", "surrogatepass") if b"\xff" not in key
                             else decode_session(value).client_id)
            except (StoreCorrupt, UnicodeDecodeError):
                continue
            put(U16.pack(vshard_of(client_id)) + key, b"", db=index)

    def _references(
        self, txn: lmdb.Transaction[bytes]
    ) -> tuple[dict[int, int], dict[int, bytes], dict[int, bytes], bool]:
        """msg_id -> queue and inflight rows naming it; msg_id -> key of the inflight row, and
        of the queue row, holding it; and False if some row could not be read."""
        refs: dict[int, int] = {}
        held: dict[int, bytes] = {}
        held_queue: dict[int, bytes] = {}
        get = refs.get
        complete = True
        for key, value in txn.cursor(db=self._env.dbs["queue"]):
            if len(value) < QROW.size:
                complete = False
                continue
            msg_id = QROW.unpack_from(value)[0]
            if len(value) > QROW.size:
                held_queue[msg_id] = key
            else:
                refs[msg_id] = get(msg_id, 0) + 1
        for key, value in txn.cursor(db=self._env.dbs["inflight"]):
            try:
                ref = inflight_msg_id(value)
            except StoreCorrupt:
                complete = False
                continue
            if ref is None:
                continue
            if value[0] == 2:
                held[ref] = key
            else:
                refs[ref] = get(ref, 0) + 1
        return refs, held, held_queue, complete

    def _current_refs(self) -> tuple[dict[int, int], dict[int, bytes], dict[int, bytes]]:
        """The counts (kept in memory when writable) and the held messages (inflight, queue),
        read now."""
        with self._env.read() as txn:
            refs, held, held_queue, _ = self._references(txn)
        return self._refs if not self._env.readonly else refs, held, held_queue

    @property
    def path(self) -> Path:
        return self._env.path

    @property
    def readonly(self) -> bool:
        return self._env.readonly

    @property
    def next_msg_id(self) -> int:
        """The id the next ``add_message`` gets (internal; for tests and tools)."""
        return self._ids.msg_id

    @property
    def next_seq(self) -> int:
        """The seq the next ``enqueue`` gets (internal; for tests and tools)."""
        return self._ids.seq

    # -- reads

    def sessions(self) -> Iterator[SessionRecord]:
        for row in self._env.rows("sessions"):
            yield decode_session(row.value)

    def session(self, client_id: str) -> SessionRecord | None:
        data = self._env.get("sessions", _client_key(client_id))
        return None if data is None else decode_session(data)

    def has_session(self, client_id: str) -> bool:
        """Whether the client has a stored session (nothing decoded)."""
        return self._env.get("sessions", _client_key(client_id)) is not None

    def queue(self, client_id: str) -> list[tuple[int, int, int, StoredMessage]]:
        with self._env.read() as txn:
            return self._queue_in(txn, client_id, {})

    def _queue_in(self, txn: lmdb.Transaction[bytes], client_id: str,
                  cache: dict[int, StoredMessage | None]) -> list[tuple[int, int, int, StoredMessage]]:
        prefix = _client_key(client_id) + SEP
        out: list[tuple[int, int, int, StoredMessage]] = []
        cur = txn.cursor(db=self._env.dbs["queue"])
        ok = cur.set_range(prefix)
        while ok and (key := cur.key()).startswith(prefix):
            value = cur.value()
            msg_id, qos = QROW.unpack_from(value)
            if len(value) > QROW.size:
                msg: StoredMessage | None = decode_message(value[QROW.size:])
            else:
                msg = self._message_in(txn, msg_id, cache)
            if msg is None:
                log.warning("%s: queue row of %r names missing message %d",
                            self.path, client_id, msg_id)
            else:
                out.append((U64.unpack(key[-8:])[0], msg_id, qos, msg))
            ok = cur.next()
        return out

    def inflight(self, client_id: str) -> list[tuple[int, InflightRecord, StoredMessage | None]]:
        with self._env.read() as txn:
            return self._inflight_in(txn, client_id, {})

    def _inflight_in(self, txn: lmdb.Transaction[bytes], client_id: str,
                     cache: dict[int, StoredMessage | None],
                     ) -> list[tuple[int, InflightRecord, StoredMessage | None]]:
        prefix = _client_key(client_id) + SEP
        out: list[tuple[int, InflightRecord, StoredMessage | None]] = []
        cur = txn.cursor(db=self._env.dbs["inflight"])
        ok = cur.set_range(prefix)
        while ok and (key := cur.key()).startswith(prefix):
            rec, msg = decode_inflight_row(cur.value())
            if msg is None and rec.msg_id is not None:
                msg = self._message_in(txn, rec.msg_id, cache)
            out.append((U16.unpack(key[-2:])[0], rec, msg))
            ok = cur.next()
        return out

    def qos2_incoming(self, client_id: str) -> list[int]:
        prefix = _client_key(client_id) + SEP
        return [U16.unpack(row.key[-2:])[0] for row in self._env.rows("qos2in", prefix)]

    def client_state(self, client_id: str) -> ClientState | None:
        """The client's session with its inflight rows, queue (in seq order) and incoming
        QoS 2 ids, read in one transaction; None without a session."""
        prefix = _client_key(client_id) + SEP
        with self._env.read() as txn:
            data = txn.get(_client_key(client_id), db=self._env.dbs["sessions"])
            if data is None:
                return None
            cache: dict[int, StoredMessage | None] = {}
            cur = txn.cursor(db=self._env.dbs["qos2in"])
            qos2: list[int] = []
            ok = cur.set_range(prefix)
            while ok and (key := cur.key()).startswith(prefix):
                qos2.append(U16.unpack(key[-2:])[0])
                ok = cur.next()
            return ClientState(decode_session(data), self._inflight_in(txn, client_id, cache),
                               self._queue_in(txn, client_id, cache), qos2)

    def vshard_sessions(self, vshards: Iterable[int] | None = None) -> Iterator[SessionRecord]:
        """The sessions of clients in ``vshards`` (all when None), by virtual shard.

        Each virtual shard is one key range of the ``vshards`` index (schema 6); a store of
        an older schema, opened read-only, is scanned whole."""
        if vshards is None:
            yield from self.sessions()
            return
        wanted = sorted(set(vshards))
        if not self._indexed:
            chosen = set(wanted)
            yield from (rec for rec in self.sessions() if vshard_of(rec.client_id) in chosen)
            return
        for v in wanted:
            for row in self._env.rows("vshards", _vshard_prefix(v)):
                data = self._env.get("sessions", row.key[2:])
                if data is not None:  # deleted since the page was read
                    yield decode_session(data)

    def client_ids(self, vshards: Iterable[int] | None = None) -> Iterator[str]:
        """The client ids of the sessions in ``vshards`` (all when None), by virtual shard
        (all: by key). An id is its key's text; only a digest key (an id over 400 bytes)
        has its record read."""
        if vshards is not None and self._indexed:
            for v in sorted(set(vshards)):
                for row in self._env.rows("vshards", _vshard_prefix(v)):
                    key = row.key[2:]
                    if b"\xff" not in key:
                        yield key.decode("utf-8", "surrogatepass")
                    elif (rec := self._env.get("sessions", key)) is not None:
                        yield decode_session(rec).client_id
            return
        chosen = None if vshards is None else set(vshards)
        for row in self._env.rows("sessions"):
            cid = (row.key.decode("utf-8", "surrogatepass") if b"\xff" not in row.key
                   else decode_session(row.value).client_id)
            if chosen is None or vshard_of(cid) in chosen:
                yield cid

    def vshard_counts(self) -> dict[int, int]:
        """Stored sessions per virtual shard (those with none left out), from keys alone."""
        counts: Counter[int] = Counter()
        if not self._indexed:
            counts.update(vshard_of(rec.client_id) for rec in self.sessions())
            return dict(sorted(counts.items()))
        with self._env.read() as txn:
            for key in txn.cursor(db=self._env.dbs["vshards"]).iternext(values=False):
                counts[U16.unpack_from(key)[0]] += 1
        return dict(sorted(counts.items()))

    def queue_length(self, client_id: str) -> int:
        return self._env.count("queue", _client_key(client_id) + SEP)

    def inflight_count(self, client_id: str) -> int:
        return self._env.count("inflight", _client_key(client_id) + SEP)

    def message(self, msg_id: int) -> StoredMessage | None:
        """A stored message, in its own row or held by a queue or inflight row."""
        data = self._env.get("messages", U64.pack(msg_id))
        if data is not None:
            return decode_message(data)
        _, held, held_queue = self._current_refs()
        for in_queue, where in ((False, held), (True, held_queue)):
            key = where.get(msg_id)
            if key is not None:
                for _, _, msg in self._held_message(msg_id, in_queue, key):
                    return msg
        return None

    def messages(self) -> Iterator[tuple[int, int, StoredMessage]]:
        """(msg_id, refcount, message) in msg_id order; refcount = queue and inflight rows naming
        it (1 for a message held by its row)."""
        refs, held, held_queue = self._current_refs()
        pending = sorted([(m, False, k) for m, k in held.items()]
                         + [(m, True, k) for m, k in held_queue.items()])
        i = 0
        for row in self._env.rows("messages"):
            msg_id = U64.unpack(row.key)[0]
            while i < len(pending) and pending[i][0] < msg_id:
                yield from self._held_message(*pending[i])
                i += 1
            yield msg_id, refs.get(msg_id, 0), decode_message(row.value)
        for entry in pending[i:]:
            yield from self._held_message(*entry)

    def _held_message(self, msg_id: int, in_queue: bool,
                      key: bytes) -> Iterator[tuple[int, int, StoredMessage]]:
        row = self._env.get("queue" if in_queue else "inflight", key)
        if row is not None and holds(row, in_queue):
            yield msg_id, 1, decode_message(row[QROW.size if in_queue else INFLIGHT_SIZE:])

    def queue_rows(self) -> Iterator[tuple[str, int, int, int]]:
        """Every queue row as (client, seq, msg_id, qos), by client key then seq."""
        for row in self._env.rows("queue"):
            msg_id, qos = QROW.unpack_from(row.value)
            yield _key_text(row.key[:-9]), U64.unpack(row.key[-8:])[0], msg_id, qos

    def inflight_rows(self) -> Iterator[tuple[str, int, InflightRecord]]:
        for row in self._env.rows("inflight"):
            yield _key_text(row.key[:-3]), U16.unpack(row.key[-2:])[0], decode_inflight(row.value)

    def qos2_rows(self) -> Iterator[tuple[str, int]]:
        for row in self._env.rows("qos2in"):
            yield _key_text(row.key[:-3]), U16.unpack(row.key[-2:])[0]

    def get_meta(self, key: str) -> object | None:
        data = self._env.get("meta", key.encode())
        return None if data is None else decode_value(data)

    def fill(self) -> float:
        """How full the store is, as a fraction of ``max_map_size`` (see ``_Env.fill``)."""
        return self._env.fill()

    def sizes(self) -> dict[str, int]:
        """``map_size``, ``used_bytes`` (pages up to the last one used) and ``file_bytes``."""
        return self._env.sizes()

    def map_at_max(self) -> bool:
        """Whether the map can no longer grow (then every commit may be the one that fills it)."""
        return int(self._env.env.info()["map_size"]) >= self._env.max_map_size

    def outbox(self) -> Iterator[tuple[int, int, bytes]]:
        """(peer shard, seq, item) of every hand-over not yet acknowledged, in key order."""
        for row in self._env.rows("outbox"):
            yield U16.unpack(row.key[:2])[0], U64.unpack(row.key[2:])[0], bytes(row.value)

    def meta_items(self) -> Iterator[tuple[str, object]]:
        for row in self._env.rows("meta"):
            yield row.key.decode("utf-8", "replace"), decode_value(row.value)

    def counts(self) -> dict[str, int]:
        """Row counts (sessions, queued, inflight, qos2_incoming, outbox) without decoding, and
        messages: rows of their own plus those inflight rows hold."""
        counts = {
            name: self._env.count(table)
            for name, table in (
                ("sessions", "sessions"), ("queued", "queue"), ("inflight", "inflight"),
                ("qos2_incoming", "qos2in"), ("messages", "messages"), ("outbox", "outbox"),
            )
        }
        _, held, held_queue = self._current_refs()
        counts["messages"] += len(held) + len(held_queue)
        return counts

    def stats(self) -> dict[str, int]:
        """counts() plus subscriptions (decodes every session), map_size, used and file bytes."""
        counts = self.counts()
        subscriptions = 0
        for row in self._env.rows("sessions"):
            try:
                subscriptions += len(decode_session(row.value).subscriptions)
            except StoreCorrupt:
                pass  # check() reports it
        return {"shard": self.shard, **counts, "subscriptions": subscriptions, **self._env.sizes()}

    def check(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Problems found (empty list = healthy). ``progress(n)`` is told about rows read."""
        problems: list[str] = []
        env, where = self._env, f"shard {self.shard}"
        seen = 0

        def tick() -> None:
            nonlocal seen
            seen += 1
            if progress is not None and seen % 1000 == 0:
                progress(1000)

        session_keys: set[bytes] = set()
        index_keys: set[bytes] = set()  # the vshards rows the sessions need
        for row in env.rows("sessions"):
            tick()
            session_keys.add(row.key)
            try:
                rec = decode_session(row.value)
            except StoreCorrupt as exc:
                problems.append(f"{where}: session {_key_text(row.key)!r}: {exc}")
                continue
            if _text_key(rec.client_id) != row.key:
                problems.append(f"{where}: session {_key_text(row.key)!r} holds client id "
                                f"{rec.client_id!r}")
            index_keys.add(U16.pack(vshard_of(rec.client_id)) + row.key)
        if self._indexed:
            for row in env.rows("vshards"):
                tick()
                if row.key not in index_keys:
                    problems.append(f"{where}: virtual shard index row {row.key[:2].hex()} "
                                    f"{_key_text(row.key[2:])!r} names no session of it")
                index_keys.discard(row.key)
            for key in sorted(index_keys):
                problems.append(f"{where}: session {_key_text(key[2:])!r} is missing from the "
                                f"virtual shard index")
        message_ids: set[int] = set()
        for row in env.rows("messages"):
            tick()
            if len(row.key) != 8:
                problems.append(f"{where}: message key {row.key!r} is not 8 bytes")
                continue
            msg_id = U64.unpack(row.key)[0]
            message_ids.add(msg_id)
            try:
                decode_message(row.value)
            except StoreCorrupt as exc:
                problems.append(f"{where}: message {msg_id}: {exc}")
        # the counts to hold against the rows: a schema 1 store's refs table (read only), or
        # the ones a writable store keeps in memory
        stored_refs: dict[int, int] | None = None if env.readonly else dict(self._refs)
        if "refs" in env.dbs:
            stored_refs = {}
            for row in env.rows("refs"):
                tick()
                if len(row.key) != 8 or len(row.value) != 8:
                    problems.append(f"{where}: malformed refcount row {row.key!r}")
                    continue
                stored_refs[U64.unpack(row.key)[0]] = U64.unpack(row.value)[0]
        actual: Counter[int] = Counter()
        max_seq = 0

        def owner(key: bytes, suffix: int, what: str) -> bool:
            if len(key) < suffix + 2 or key[-suffix - 1:-suffix] != SEP:
                problems.append(f"{where}: malformed {what} key {key!r}")
                return False
            if key[:-suffix - 1] not in session_keys:
                problems.append(f"{where}: orphan {what} row of client "
                                f"{_key_text(key[:-suffix - 1])!r} (no session)")
            return True

        held: dict[int, bytes] = {}  # by inflight rows
        held_queue: dict[int, bytes] = {}

        def holds(msg_id: int, client: bytes, what: str) -> None:
            if msg_id in held or msg_id in held_queue or msg_id in message_ids:
                problems.append(f"{where}: message {msg_id} held by {what} of "
                                f"{_key_text(client)!r} is stored more than once")

        for row in env.rows("queue"):
            tick()
            if not owner(row.key, 8, "queue"):
                continue
            seq = U64.unpack(row.key[-8:])[0]
            max_seq = max(max_seq, seq)
            if len(row.value) < QROW.size:
                problems.append(f"{where}: malformed queue row seq {seq}")
                continue
            msg_id, _qos = QROW.unpack_from(row.value)
            if len(row.value) > QROW.size:
                try:
                    decode_message(row.value[QROW.size:])
                except StoreCorrupt as exc:
                    problems.append(f"{where}: queue seq {seq} of {_key_text(row.key[:-9])!r}: {exc}")
                holds(msg_id, row.key[:-9], f"queue seq {seq}")
                held_queue[msg_id] = row.key
                continue
            actual[msg_id] += 1
            if msg_id not in message_ids:
                problems.append(f"{where}: queue seq {seq} of {_key_text(row.key[:-9])!r} "
                                f"names missing message {msg_id}")
        for row in env.rows("inflight"):
            tick()
            if not owner(row.key, 2, "inflight"):
                continue
            packet_id = U16.unpack(row.key[-2:])[0]
            try:
                irec, msg = decode_inflight_row(row.value)
            except StoreCorrupt as exc:
                problems.append(f"{where}: inflight {packet_id} of "
                                f"{_key_text(row.key[:-3])!r}: {exc}")
                continue
            if msg is not None and irec.msg_id is not None:
                holds(irec.msg_id, row.key[:-3], f"inflight {packet_id}")
                held[irec.msg_id] = row.key
            elif irec.msg_id is not None:
                actual[irec.msg_id] += 1
                if irec.msg_id not in message_ids:
                    problems.append(f"{where}: inflight {packet_id} of "
                                    f"{_key_text(row.key[:-3])!r} names missing message "
                                    f"{irec.msg_id}")
        for row in env.rows("qos2in"):
            tick()
            owner(row.key, 2, "qos2_incoming")
        for msg_id in sorted(message_ids):
            real = actual.get(msg_id, 0)
            if stored_refs is not None and stored_refs.get(msg_id, 0) != real:
                problems.append(f"{where}: message {msg_id} has refcount "
                                f"{stored_refs.get(msg_id, 0)} but {real} references")
            elif not real:
                problems.append(f"{where}: message {msg_id} is named by no queue or inflight row "
                                f"(a writable open deletes it)")
        for msg_id in sorted(set(stored_refs or ()) - message_ids):
            problems.append(f"{where}: refcount for missing message {msg_id}")
        for msg_id in sorted((set(held) | set(held_queue)) & set(actual)):
            problems.append(f"{where}: message {msg_id} held by its row is named by "
                            f"{actual[msg_id]} other row(s)")
        message_ids.update(held)
        message_ids.update(held_queue)
        for name, _value in self.meta_items():
            if name.startswith(MOVE_PREFIX):
                problems.append(f"{where}: a move of virtual shards did not finish ({name}); "
                                f"`shardbroker store reshard` with the same --workers "
                                f"finishes or undoes it")
        next_msg_id = self.get_meta("next_msg_id")
        next_seq = self.get_meta("next_seq")
        if not isinstance(next_msg_id, int) or not isinstance(next_seq, int):
            problems.append(f"{where}: meta next_msg_id / next_seq missing or not integers")
        else:
            if message_ids and next_msg_id <= max(message_ids):
                problems.append(f"{where}: next_msg_id {next_msg_id} is not above the highest "
                                f"message id {max(message_ids)}")
            if next_seq <= max_seq:
                problems.append(f"{where}: next_seq {next_seq} is not above the highest queue "
                                f"seq {max_seq}")
        if progress is not None and seen % 1000:
            progress(seen % 1000)
        return problems

    def copy_compacted(self, dest: Path) -> None:
        self._env.copy_compacted(Path(dest))

    # -- writes

    def batch(self, hold: bool = True) -> Batch:
        """A new batch; with ``hold=False`` no message it adds is held by its row (for bulk
        loads that name a message again in later batches: see ``_holder``)."""
        if self._env.readonly:
            raise StoreError(f"{self.path}: store is open read-only")
        return Batch(self, self._ids, hold)

    def _commit(self, ops: Ops, hold: bool = True) -> None:
        """Apply ``ops`` in one transaction (``batch.apply``; see the module docstring for the
        counts and for messages held by their queue or inflight row)."""
        env, ids, tables = self._env, self._ids, self._tables
        if tables is None:
            raise StoreError(f"{self.path}: store is open read-only")
        hold_max = HOLD_MAX if hold else -1
        meta = env.dbs["meta"]

        def write(txn: lmdb.Transaction[bytes]) -> Callable[[], None]:
            next_msg_id, next_seq = ids.msg_id, ids.seq
            self._check_counters(txn)
            counts = apply(txn, tables, ops, self._refs, hold_max, self._holder, str(self.path))
            if next_msg_id != self._saved_msg_id:
                txn.put(b"next_msg_id", encode_value(next_msg_id), db=meta)
            if next_seq != self._saved_seq:
                txn.put(b"next_seq", encode_value(next_seq), db=meta)

            def committed() -> None:
                self._saved_msg_id, self._saved_seq = next_msg_id, next_seq
                stored = self._refs
                for msg_id, count in counts:
                    if count:
                        stored[msg_id] = count
                    else:
                        stored.pop(msg_id, None)

            return committed

        started = time.perf_counter()
        env.write(write)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(ops) >> 2)

    def _holder(self, txn: lmdb.Transaction[bytes], msg_id: int) -> tuple[bool, bytes] | None:
        """(queue row?, key) of the row holding ``msg_id``, found by reading every row.

        Slow, and rare: it takes a message held by a row of an earlier batch, named again by
        another row (the broker names a message again in the batch that stored it, or moves
        it from its queue row). Keeping an index instead would cost memory for every held
        message."""
        self._holder_scans += 1
        if self._holder_scans == 1:
            log.info("%s: looking for the row holding message %d (slow; logged once)",
                     self.path, msg_id)
        for key, row in txn.cursor(db=self._env.dbs["queue"]):
            if len(row) > QROW.size and QROW.unpack_from(row)[0] == msg_id:
                return True, key
        for key, row in txn.cursor(db=self._env.dbs["inflight"]):
            if row[:1] == b"\x02" and INFLIGHT_ROW.unpack_from(row)[3] == msg_id:
                return False, key
        return None

    def _missing(self, msg_id: int) -> StoreError:
        return StoreError(f"{self.path}: message {msg_id} does not exist")

    def _check_counters(self, txn: lmdb.Transaction[bytes]) -> None:
        meta = self._env.dbs["meta"]
        for key, saved in ((b"next_msg_id", self._saved_msg_id), (b"next_seq", self._saved_seq)):
            raw = txn.get(key, db=meta)
            if raw is None or decode_value(raw) != saved:
                raise StoreError(
                    f"{self.path}: shard was written by another process since it was opened "
                    f"(one writer per shard)"
                )

    def _message_in(
        self, txn: lmdb.Transaction[bytes], msg_id: int, cache: dict[int, StoredMessage | None]
    ) -> StoredMessage | None:
        if msg_id not in cache:
            data = txn.get(U64.pack(msg_id), db=self._env.dbs["messages"])
            cache[msg_id] = None if data is None else decode_message(data)
        return cache[msg_id]


def _check_siblings(data_dir: Path, shards: int) -> None:
    """Before creating a shard: refuse a data dir holding shards beyond ``shards``."""
    try:
        names = os.listdir(data_dir)
    except OSError:
        return
    extra = [n for n in names if (m := _SHARD_DIR_RE.fullmatch(n)) and int(m.group(1)) >= shards]
    if extra:
        raise StoreError(
            f"data directory {data_dir} was created with more than {shards} workers "
            f"(found {max(extra)}); start with the original worker count"
        )


# --------------------------------------------------------------------------- retained


RetainedPage = tuple[list[tuple[str, StoredMessage]], bytes | None]


def _page(cur: lmdb.Cursor[bytes], text: str, after: bytes | None, limit: int) -> RetainedPage:
    """``RetainedStore.page`` on an open cursor."""
    key_prefix = text.encode("utf-8", "surrogatepass")[:HASHED_HEAD]
    if after is None:
        ok = cur.set_range(key_prefix) if key_prefix else cur.first()
    else:
        ok = cur.set_range(after)
        if ok and cur.key() == after:
            ok = cur.next()
    rows: list[tuple[str, StoredMessage]] = []
    seen = 0
    while ok:
        key = cur.key()
        if not key.startswith(key_prefix):
            return rows, None
        if seen == limit:
            return rows, after
        msg = decode_message(cur.value())
        if msg.topic.startswith(text):
            rows.append((msg.topic, msg))
        after = key
        seen += 1
        ok = cur.next()
    return rows, None


class RetainedStore:
    """Retained messages of all shards, in one environment shared by every worker."""

    __slots__ = ("_env",)

    def __init__(self, env: _Env) -> None:
        self._env = env

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        map_size: int = 64 << 20,
        max_map_size: int = 16 << 30,
        sync: bool = True,
        readonly: bool = False,
        create: bool = True,
    ) -> RetainedStore:
        def init_meta() -> dict[str, object]:
            return {"schema_version": RETAINED_SCHEMA_VERSION, "kind": "retained", "created_at": time.time()}

        env = _Env.open(
            Path(data_dir) / "retained", kind="retained", tables=_RETAINED_TABLES,
            new_tables=_RETAINED_NEW_TABLES, init_meta=init_meta, map_size=map_size,
            max_map_size=max_map_size, sync=sync, readonly=readonly, create=create,
            schema=RETAINED_SCHEMA_VERSION,
        )
        try:
            if not readonly and "stamps" not in env.dbs:
                _migrate_retained(env)
            elif _meta_int(env.meta, "schema_version", env.path) >= 2 and "stamps" not in env.dbs:
                raise StoreCorrupt(f"{env.path}: table 'stamps' is missing")
        except BaseException:
            env.close()
            raise
        return cls(env)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._env.path

    def get(self, topic: str) -> StoredMessage | None:
        data = self._env.get("retained", _text_key(topic))
        return None if data is None else decode_message(data)

    def scan(self, prefix: str = "") -> Iterator[tuple[str, StoredMessage]]:
        """(topic, message) for topics starting with ``prefix``, in key order."""
        key_prefix = prefix.encode("utf-8", "surrogatepass")[:HASHED_HEAD]
        for row in self._env.rows("retained", key_prefix):
            msg = decode_message(row.value)
            if msg.topic.startswith(prefix):
                yield msg.topic, msg

    def find(self, heads: Sequence[tuple[str, bool]]) -> list[RetainedPage]:
        """For each ``(text, exact)``: the message of topic ``text`` when ``exact``, else the
        ``(topic, message)`` pairs whose topic starts with ``text``, in key order, the first
        ``_PAGE_ROWS`` rows of them: each with the key to go on after (``page``), or None when
        that was all. One read transaction for all of them (a SUBSCRIBE's filters), rather
        than one each."""
        found: list[RetainedPage] = []
        db = self._env.dbs["retained"]
        with self._env.read() as txn:
            cur = txn.cursor(db=db)
            for text, exact in heads:
                if exact:
                    data = txn.get(_text_key(text), db=db)
                    found.append(([] if data is None else [(text, decode_message(data))], None))
                else:
                    found.append(_page(cur, text, None, _PAGE_ROWS))
        return found

    def page(self, text: str, after: bytes | None, limit: int) -> RetainedPage:
        """Up to ``limit`` rows of the topics that start with ``text``, after the key ``after``
        (from the first when None), in one read transaction: the pairs whose topic starts with
        ``text``, and the key to go on after, or None when there are no more."""
        with self._env.read() as txn:
            return _page(txn.cursor(db=self._env.dbs["retained"]), text, after, limit)

    def count(self) -> int:
        return self._env.count("retained")

    def write(self, ops: Sequence[RetainedOp | tuple[str, StoredMessage | None]]) -> list[RetainedOp]:
        """One transaction: put each message, or delete the topic when it is None, with its
        stamp. A local op (a bare (topic, message) pair is one, stamped (0, "")) is always
        written, its stamp raised to one above the stamp held when that one is not older; a
        remote op only when its (stamp, node) is greater than the pair held (or equal to it,
        with a payload that ranks higher: ``_wins_tie``). The ops written,
        in order, with the stamps written (a local op changed in place)."""
        items = [op if isinstance(op, RetainedOp) else RetainedOp(op[0], op[1], 0, "") for op in ops]
        if not items:
            return []
        encoded = [(_text_key(op.topic), None if op.msg is None else encode_message(op.msg)) for op in items]
        dbs = self._env.dbs
        db, stamps = dbs["retained"], dbs["stamps"]

        def apply(txn: lmdb.Transaction[bytes]) -> Callable[[], None]:
            written: list[RetainedOp] = []
            for op, (key, data) in zip(items, encoded, strict=True):
                row = txn.get(key, db=stamps)
                held = NO_STAMP if row is None else stamps_row.unpack(row)[:2]
                if row is not None and (op.stamp, op.node) <= held:
                    if op.remote:
                        if (op.stamp, op.node) < held or not self._wins_tie(txn, key, op):
                            continue
                    else:
                        op.stamp = held[0] + 1
                if data is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, data, db=db)
                txn.put(key, stamps_row.pack(op.stamp, op.node, _spelled(key, op.topic)), db=stamps)
                written.append(op)

            def done() -> None:
                result[:] = written

            return done

        result: list[RetainedOp] = []
        self._env.write(apply)
        return result

    def _wins_tie(self, txn: lmdb.Transaction[bytes], key: bytes, op: RetainedOp) -> bool:
        """Two writes stamped alike (two stores migrated from schema 1, each (0, "")): the one
        whose payload ranks higher (``stamps.tie_rank``) wins, the same on every node."""
        data = txn.get(key, db=self._env.dbs["retained"])
        held = b"" if data is None else decode_message(data).payload
        return stamps_row.tie_rank(b"" if op.msg is None else op.msg.payload) > stamps_row.tie_rank(held)

    def stamp(self, topic: str) -> tuple[int, str]:
        """The (stamp, node) of the last write of ``topic``, (0, "") if none is known."""
        row = self._env.get("stamps", _text_key(topic)) if "stamps" in self._env.dbs else None
        return NO_STAMP if row is None else stamps_row.unpack(row)[:2]

    def entries(self, after: bytes = b"", limit: int = _PAGE_ROWS) -> tuple[list[RetainedOp], bytes | None]:
        """The stamped entries of shared topics (``stamps.shared``: not ``$...``) among the next
        ``limit`` rows after key ``after``, live (a message) and deleted (None: a tombstone),
        in key order; and the key to pass as ``after`` for the next page, None after the last.
        One short read transaction per page."""
        if "stamps" not in self._env.dbs:
            return [], None
        dbs = self._env.dbs
        out: list[RetainedOp] = []
        last = b""
        seen = 0
        with self._env.read() as txn:
            cur = txn.cursor(db=dbs["stamps"])
            ok = cur.set_range(after) if after else cur.first()
            if ok and after and cur.key() == after:
                ok = cur.next()
            while ok and seen < limit:
                seen += 1
                last = key = cur.key()
                stamp, node, topic = stamps_row.unpack(cur.value())
                data = txn.get(key, db=dbs["retained"])
                msg = None if data is None else decode_message(data)
                text = msg.topic if msg is not None else topic if topic is not None else _key_text(key)
                if stamps_row.shared(text):
                    out.append(RetainedOp(text, msg, stamp, node))
                ok = cur.next()
        return out, (last if ok else None)

    def digest(self) -> tuple[int, int]:
        """(live entries, digest): the sum modulo 2**64 of ``stamps.entry_digest`` over every
        retained message of a shared topic (not ``$...``) with its stamp. Equal on two nodes
        that hold the same messages written by the same writes, whatever order they came in.
        A scan of the whole store."""
        total = count = 0
        dbs = self._env.dbs
        stamps = dbs.get("stamps")
        with self._env.read() as txn:
            for key, data in txn.cursor(db=dbs["retained"]):
                row = None if stamps is None else txn.get(key, db=stamps)
                stamp, node = NO_STAMP if row is None else stamps_row.unpack(row)[:2]
                topic, payload = message_topic_payload(data)
                if not stamps_row.shared(topic):
                    continue
                total = (total + entry_digest(topic, stamp, node, payload)) % DIGEST_MOD
                count += 1
        return count, total

    def get_meta(self, key: str) -> object | None:
        data = self._env.get("meta", key.encode())
        return None if data is None else decode_value(data)

    def stats(self) -> dict[str, int]:
        stamped = self._env.count("stamps") if "stamps" in self._env.dbs else 0
        return {"retained": self.count(), "tombstones": max(0, stamped - self.count()), **self._env.sizes()}

    def check(self, progress: Callable[[int], None] | None = None) -> list[str]:
        problems: list[str] = []
        n = 0
        for row in self._env.rows("retained"):
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(1000)
            try:
                msg = decode_message(row.value)
            except StoreCorrupt as exc:
                problems.append(f"retained {_key_text(row.key)!r}: {exc}")
                continue
            if _text_key(msg.topic) != row.key:
                problems.append(f"retained {_key_text(row.key)!r} holds topic {msg.topic!r}")
            elif "stamps" in self._env.dbs and self._env.get("stamps", row.key) is None:
                problems.append(f"retained {_key_text(row.key)!r} has no stamp")
        if "stamps" in self._env.dbs:
            for row in self._env.rows("stamps"):
                try:
                    stamps_row.unpack(row.value)
                except StoreCorrupt as exc:
                    problems.append(f"stamp of {_key_text(row.key)!r}: {exc}")
        if progress is not None and n % 1000:
            progress(n % 1000)
        return problems

    def copy_compacted(self, dest: Path) -> None:
        self._env.copy_compacted(Path(dest))


def _spelled(key: bytes, topic: str) -> str | None:
    """``topic`` if ``key`` does not spell it (a digest key), for its stamps row; else None."""
    return topic if b"\xff" in key else None


def _migrate_retained(env: _Env) -> None:
    """Retained schema 1 to 2: create ``stamps`` with (0, "") for every retained row, in one
    transaction. Every worker opens the shared store: the first one migrates, the others find
    the table made (the version is read again inside the write transaction)."""
    meta, retained = env.dbs["meta"], env.dbs["retained"]
    count = -1  # stays -1 when another process migrated it meanwhile

    def apply(txn: lmdb.Transaction[bytes]) -> None:
        nonlocal count
        stamps = env.env.open_db(b"stamps", txn=txn, create=True)
        version = decode_value(txn.get(b"schema_version", db=meta) or encode_value(1))
        count = -1
        if version == RETAINED_SCHEMA_VERSION:
            return
        count = 0
        for key, data in txn.cursor(db=retained):
            topic = None
            if b"\xff" in key:
                try:
                    topic = decode_message(data).topic
                except StoreCorrupt:
                    topic = None
            txn.put(key, stamps_row.pack(*NO_STAMP, topic), db=stamps)
            count += 1
        txn.put(b"schema_version", encode_value(RETAINED_SCHEMA_VERSION), db=meta)

    version = env.meta.get("schema_version")
    env.write(apply)
    env.open_optional("stamps")
    env.meta["schema_version"] = RETAINED_SCHEMA_VERSION
    if count >= 0:
        log.info("%s: migrated retained store from schema %s to %d (%d messages stamped (0, \"\"))",
                 env.path, version, RETAINED_SCHEMA_VERSION, count)


def _empty_destination(dest: Path) -> None:
    """Make ``dest`` (a copy's directory) if needed; ``StoreError`` unless it is empty."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise StoreError(f"{dest}: destination is not empty")
    except OSError as exc:
        raise StoreError(f"{dest}: cannot create ({exc.strerror})") from None


def copy_together(copies: Sequence[tuple[ShardStore | RetainedStore, Path]]) -> None:
    """Compacted copies of open stores (a hot backup: read-only opens are enough, the broker
    goes on writing). A read transaction is begun on every store before the first copy, and
    each store is copied as of its own: the copies show the stores at nearly one instant (the
    microseconds between two ``begin``), not each at the moment its turn came. Each ``dest`` must
    be new or empty. LMDB's ``mdb_env_copy2`` with ``MDB_CP_COMPACT`` writes a consistent,
    compacted ``data.mdb`` (free pages left out)."""
    for _store, dest in copies:
        _empty_destination(dest)
    txns: list[lmdb.Transaction[bytes]] = []
    try:
        for store, _dest in copies:
            txns.append(store._env.env.begin())
        for (store, dest), txn in zip(copies, txns, strict=True):
            try:
                store._env.env.copy(str(dest), compact=True, txn=txn)
            except lmdb.Error as exc:
                if _is_disk_full(exc):
                    raise StoreFull(f"{dest}: disk full while copying") from None
                raise StoreError(f"{dest}: copy failed ({_reason(exc)})") from None
    finally:
        for txn in txns:
            txn.abort()


def data_dir_shards(data_dir: Path) -> int | None:
    """Shard count of an existing data dir (from shard-000's meta); None if empty or new."""
    path = Path(data_dir) / shard_dir_name(0)
    if not (path / "data.mdb").exists():
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        return None
    env = _Env.open(
        path, kind="shard", tables=("meta",), init_meta=dict, map_size=_OS_PAGE,
        max_map_size=_OS_PAGE, sync=False, readonly=True, create=False, schema=SCHEMA_VERSION,
    )
    try:
        return _meta_int(env.meta, "shards", path)
    finally:
        env.close()
