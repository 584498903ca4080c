"""The writes of one group commit to a shard store: ``Batch`` collects them, ``apply`` makes
them rows inside the commit's write transaction.

Every QoS 1/2 message stored for a persistent session passes through here (an add, a put
of its inflight or queue row, a delete at the acknowledgement), so this module is compiled
with mypyc like the rest of the hot path (``shardbroker/_compiled.py``). It imports no
LMDB: ``lmdb_store.ShardStore._commit`` opens the transaction and hands it in with the
tables, all typed ``Any`` here; the key layout, the row formats and the invariants are
those of the ``lmdb_store`` module docstring.

* ``Batch`` allocates ids (``msg_id``, ``seq``) when an operation is added, from the
  store's ``Ids``, and keeps each operation as four items ``code, key, a, b`` of one
  flat list (no object per operation); ``commit`` hands them to ``ShardStore._commit``,
  which runs ``apply`` in ONE transaction (one fsync when the store syncs).
* ``apply`` runs the operations in order and returns the messages' new reference
  counts; the caller keeps them only once the commit succeeded. A message whose count
  is 0 after the batch is deleted in the same transaction. A message added by the batch
  and named by one row only at its end is written into that row (held), not into
  ``messages``; one moved from a queue row to an inflight row in one batch moves
  between the rows. A queue row the batch adds and removes again is never written
  (``dequeue`` turns its ENQUEUE into a SKIP); every other row is, in order, so what a
  restart after a crash needs (inflight rows with their packet ids) is in the commit.
* Keys of a client (``client_key``, ``client_prefix``, ``index_key``) are remembered for
  the most recent 65,536 clients.

It does not read the store beyond what a write needs (the rows it replaces or deletes),
and it knows nothing of MQTT.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable
from typing import Any, Final

from shardbroker.sharding import shard_for
from shardbroker.storage.records import (
    InflightRecord,
    SessionRecord,
    StoreCorrupt,
    StoredMessage,
    StoreError,
    encode_session,
    encode_value,
    inflight_msg_id,
    pack_message,
    plain_inflight,
)

log = logging.getLogger("shardbroker.storage.lmdb_store")

VIRTUAL_SHARDS: Final = 1024
"""Sessions are indexed by their client's virtual shard among this many (``vshard_of``)."""
HOLD_MAX: Final = 512
"""Largest packed message a queue or inflight row holds (``lmdb_store`` module docstring)."""
RESERVED_META: Final = frozenset(
    {"schema_version", "kind", "shard", "shards", "created_at", "next_msg_id", "next_seq"}
)
SEP: Final = b"\x00"
U64: Final = struct.Struct(">Q")
U16: Final = struct.Struct(">H")
QROW: Final = struct.Struct(">QB")  # a queue row: msg_id, qos (then the message it may hold)
INFLIGHT_SIZE: Final = 11  # a packed inflight row, without the message it may hold
INFLIGHT_ROW: Final = struct.Struct(">BBBQ")  # its fields: format, qos, state, msg_id
PLAIN_KEY_MAX: Final = 400
HASHED_HEAD: Final = 383  # a longer key: this many bytes, 0xFF, a 16-byte digest
_PLAIN: Final = 1  # an inflight row's format byte: names its message (or none)
_HOLDS: Final = 2  # ... holds its message after the 11 bytes
_CACHED: Final = 1 << 16

# The operation codes (``apply`` tests the most frequent first).
ENQUEUE: Final = 0
DEQUEUE: Final = 1
ADD_MESSAGE: Final = 2
PUT_INFLIGHT: Final = 3
DELETE_INFLIGHT: Final = 4
PUT_OUTBOX: Final = 5
DELETE_OUTBOX: Final = 6
SET_META: Final = 7
PUT_QOS2: Final = 8
DELETE_QOS2: Final = 9
PUT_SESSION: Final = 10
DELETE_SESSION: Final = 11
SKIP: Final = 12  # an ENQUEUE whose row the same batch dequeued (``Batch.dequeue``)

Ops = list[Any]
"""The operations of a batch, flat: ``code, key, a, b`` for each (thousands per commit)."""


def text_key(text: str) -> bytes:
    """Key for a client id or topic (see the ``lmdb_store`` module docstring)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= PLAIN_KEY_MAX:
        return raw
    return raw[:HASHED_HEAD] + b"\xff" + hashlib.blake2b(raw, digest_size=16).digest()


def vshard_of(client_id: str) -> int:
    """The client's virtual shard (0..VIRTUAL_SHARDS-1), by which ``vshards`` indexes its
    session: the cluster's ``placement.vshard_for(client_id, 1024)``."""
    return shard_for(client_id, VIRTUAL_SHARDS)


_KEYS: Final[dict[str, bytes]] = {}
_PREFIXES: Final[dict[str, bytes]] = {}
_INDEX_KEYS: Final[dict[str, bytes]] = {}


def client_key(client_id: str) -> bytes:
    """``CK``: the client's key in ``sessions``."""
    key = _KEYS.get(client_id)
    if key is None:
        if not client_id:
            raise ValueError("client id must not be empty")
        if "\x00" in client_id:
            raise ValueError("client id must not contain NUL")
        key = text_key(client_id)
        if len(_KEYS) >= _CACHED:
            _KEYS.clear()
        _KEYS[client_id] = key
    return key


def client_prefix(client_id: str) -> bytes:
    """``CK + 0x00``: the prefix of the client's queue, inflight and qos2 keys."""
    prefix = _PREFIXES.get(client_id)
    if prefix is None:
        prefix = client_key(client_id) + SEP
        if len(_PREFIXES) >= _CACHED:
            _PREFIXES.clear()
        _PREFIXES[client_id] = prefix
    return prefix


def index_key(client_id: str) -> bytes:
    """The client's row in ``vshards``: its virtual shard (u16), then ``CK``."""
    key = _INDEX_KEYS.get(client_id)
    if key is None:
        key = U16.pack(vshard_of(client_id)) + client_key(client_id)
        if len(_INDEX_KEYS) >= _CACHED:
            _INDEX_KEYS.clear()
        _INDEX_KEYS[client_id] = key
    return key


class Ids:
    """A shard store's next ``msg_id`` and ``seq``: taken by its batches as they add
    operations, saved in ``meta`` by the commit that uses them."""

    def __init__(self, msg_id: int, seq: int) -> None:
        self.msg_id = msg_id
        self.seq = seq


class Tables:
    """The LMDB tables (named databases) of a shard store that a batch writes."""

    def __init__(self, meta: Any, sessions: Any, messages: Any, queue: Any, inflight: Any,
                 qos2in: Any, vshards: Any, outbox: Any) -> None:
        self.meta = meta
        self.sessions = sessions
        self.messages = messages
        self.queue = queue
        self.inflight = inflight
        self.qos2in = qos2in
        self.vshards = vshards
        self.outbox = outbox


class Batch:
    """Collects operations in memory; commit() applies them all in ONE write transaction.

    One fsync when ``sync=True``. If the map is full, commit() grows the map
    (doubling, up to max_map_size) and retries the whole batch; beyond that or
    on ENOSPC it raises StoreFull and the store is unchanged (the transaction
    is aborted). Operations are applied in order; ids are allocated when an
    operation is added. After a successful commit the batch is empty and can
    be reused; after a failed one it keeps its operations (commit again, or
    drop the batch). As a context manager it commits on a clean exit.
    """

    def __init__(self, store: Any, ids: Ids, hold: bool = True) -> None:
        self._store = store  # a ShardStore: its ``_commit`` runs the operations
        self._ids = ids
        self._hold = hold
        self._ops: Ops = []
        # seq -> index in ``_ops`` of the ENQUEUE that made that queue row in this batch
        self._enqueued: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._ops) >> 2

    def __enter__(self) -> Batch:  # noqa: PYI034  (compiled: a native class returns itself)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()

    def _add(self, code: int, key: bytes, a: Any, b: Any) -> None:
        ops = self._ops
        ops.append(code)
        ops.append(key)
        ops.append(a)
        ops.append(b)

    def put_session(self, rec: SessionRecord) -> None:
        cid = rec.client_id
        self._add(PUT_SESSION, client_key(cid), encode_session(rec), index_key(cid))

    def delete_session(self, client_id: str) -> None:
        """Also deletes its queue, inflight and qos2 rows and drops their message refs."""
        self._add(DELETE_SESSION, client_key(client_id), index_key(client_id), None)

    def add_message(self, msg: StoredMessage) -> int:
        """Store ``msg`` once; returns its id. Refcount starts at 0 (see the module docstring)."""
        data = pack_message(msg)
        ids = self._ids
        msg_id = ids.msg_id
        ids.msg_id = msg_id + 1
        self._add(ADD_MESSAGE, b"", msg_id, data)
        return msg_id

    def enqueue(self, client_id: str, msg_id: int, qos: int) -> int:
        """Append to the client's queue; returns the seq. +1 ref."""
        ids = self._ids
        seq = ids.seq
        ids.seq = seq + 1
        self._enqueued[seq] = len(self._ops)
        self._add(ENQUEUE, client_prefix(client_id) + seq.to_bytes(8, "big"), msg_id, qos)
        return seq

    def dequeue(self, client_id: str, seq: int) -> None:
        """-1 ref; the message is deleted when no reference is left. Unknown seq: no-op.

        A row enqueued by this batch is not written at all: its ENQUEUE becomes a SKIP (seqs
        are never reused, so no other operation names that key; the message stays at hand
        for the rest of the batch, as after the removal of a row holding it)."""
        at = self._enqueued.pop(seq, -1)
        if at >= 0:
            self._ops[at] = SKIP
            return
        self._add(DEQUEUE, client_prefix(client_id) + seq.to_bytes(8, "big"), None, None)

    def put_inflight(self, client_id: str, packet_id: int, rec: InflightRecord) -> None:
        """Replace the row; refs follow the msg_id change (old -1, new +1). The row is packed
        by ``apply``, which knows then whether it holds its message."""
        self._add(PUT_INFLIGHT, client_prefix(client_id) + packet_id.to_bytes(2, "big"), rec.msg_id, rec)

    def delete_inflight(self, client_id: str, packet_id: int) -> None:
        self._add(DELETE_INFLIGHT, client_prefix(client_id) + packet_id.to_bytes(2, "big"), None, None)

    def add_qos2_incoming(self, client_id: str, packet_id: int) -> None:
        self._add(PUT_QOS2, client_prefix(client_id) + U16.pack(packet_id), None, None)

    def remove_qos2_incoming(self, client_id: str, packet_id: int) -> None:
        self._add(DELETE_QOS2, client_prefix(client_id) + U16.pack(packet_id), None, None)

    def put_outbox(self, peer: int, seq: int, item: bytes) -> None:
        """Keep a hand-over to ``peer`` (numbered ``seq`` by the caller) until it is acknowledged."""
        self._add(PUT_OUTBOX, U16.pack(peer) + U64.pack(seq), item, None)

    def delete_outbox(self, peer: int, seq: int) -> None:
        self._add(DELETE_OUTBOX, U16.pack(peer) + U64.pack(seq), None, None)

    def set_meta(self, key: str, value: object) -> None:
        if key in RESERVED_META:
            raise ValueError(f"meta key {key!r} is reserved")
        if not key:
            raise ValueError("meta key must not be empty")
        self._add(SET_META, key.encode(), encode_value(value), None)

    def delete_meta(self, key: str) -> None:
        """Remove a meta key set by ``set_meta`` (absent: nothing happens)."""
        if key in RESERVED_META or not key:
            raise ValueError(f"meta key {key!r} is reserved")
        self._add(SET_META, key.encode(), None, None)

    def commit(self) -> None:
        if not self._ops:
            return
        self._store._commit(self._ops, self._hold)
        self._ops = []
        self._enqueued = {}


def _inflight_row(rec: InflightRecord, held: bytes | None) -> bytes:
    """The packed inflight row of ``rec``, holding the packed message ``held`` if given."""
    msg_id = rec.msg_id
    if held is None:
        return INFLIGHT_ROW.pack(_PLAIN, rec.qos, rec.state, 0 if msg_id is None else msg_id)
    return INFLIGHT_ROW.pack(_HOLDS, rec.qos, rec.state, 0 if msg_id is None else msg_id) + held


def u64_at(row: bytes, at: int) -> int:
    """The big-endian u64 at ``row[at:at + 8]`` (compiled, a tenth of ``struct``'s cost)."""
    return ((row[at] << 56) | (row[at + 1] << 48) | (row[at + 2] << 40) | (row[at + 3] << 32)
            | (row[at + 4] << 24) | (row[at + 5] << 16) | (row[at + 6] << 8) | row[at + 7])


def named(row: bytes, in_queue: bool) -> int | None:
    """The msg_id a queue or inflight row names (or holds)."""
    if in_queue:
        return u64_at(row, 0)
    return inflight_msg_id(row)


def holds(row: bytes, in_queue: bool) -> bool:
    """Whether a queue or inflight row holds its message."""
    return len(row) > QROW.size if in_queue else row[:1] == b"\x02"


def drop_prefix(txn: Any, db: Any, prefix: bytes) -> list[bytes]:
    """Delete every row whose key starts with ``prefix``; return their values."""
    values: list[bytes] = []
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return values
    while True:
        key: bytes = cur.key()
        if not key or not key.startswith(prefix):
            break
        values.append(cur.value())
        if not cur.delete():
            break
    return values


class _Apply:
    """One run of ``apply``: the transaction, and the messages at hand while it runs."""

    def __init__(self, txn: Any, tables: Tables, stored: dict[int, int],
                 holder: Callable[[Any, int], tuple[bool, bytes] | None], path: str) -> None:
        self.txn = txn
        self.tables = tables
        self.stored = stored  # committed counts: read here, changed by the caller after the commit
        self.holder = holder
        self.path = path
        self.delta: dict[int, int] = {}  # msg_id -> references added (-removed) to table messages
        # Messages at hand that no row names and ``messages`` does not hold, by msg_id: added
        # by this batch (the packed message), or held by a queue or inflight row this batch
        # removed (that row).
        self.loose: dict[int, bytes] = {}
        self.gone_q: dict[int, bytes] = {}
        self.gone_in: dict[int, bytes] = {}
        # held by a row this batch wrote: msg_id -> its key
        self.now_q: dict[int, bytes] = {}
        self.now_in: dict[int, bytes] = {}
        self.tabled: set[int] = set()  # put into ``messages`` by this batch

    def at_hand(self, msg_id: int) -> bytes | None:
        """The packed message ``msg_id`` if this batch added it or removed the row holding it."""
        data = self.loose.pop(msg_id, None)
        if data is not None:
            return data
        row = self.gone_q.pop(msg_id, None)
        if row is not None:
            return row[QROW.size:]
        row = self.gone_in.pop(msg_id, None)
        return None if row is None else row[INFLIGHT_SIZE:]

    def to_table(self, msg_id: int) -> None:
        """``msg_id`` is named by one more row: it needs a row of its own in ``messages``;
        the row that held it is rewritten without it (and counted)."""
        if msg_id in self.stored or msg_id in self.tabled:
            return
        txn, tables = self.txn, self.tables
        in_queue = True
        key = self.now_q.pop(msg_id, None)
        if key is None:
            key = self.now_in.pop(msg_id, None)
            in_queue = False
        if key is None:  # held by a row of an earlier batch, if at all: look for it
            found = self.holder(txn, msg_id)
            if found is None:
                raise StoreError(f"{self.path}: message {msg_id} does not exist")
            in_queue, key = found
        db = tables.queue if in_queue else tables.inflight
        row: bytes | None = txn.get(key, db=db)
        if row is None or named(row, in_queue) != msg_id or not holds(row, in_queue):
            raise StoreCorrupt(f"{self.path}: the row holding message {msg_id} is missing")
        at = QROW.size if in_queue else INFLIGHT_SIZE
        txn.put(U64.pack(msg_id), row[at:], db=tables.messages)
        txn.put(key, row[:at] if in_queue else plain_inflight(row), db=db)
        self.delta[msg_id] = 1  # that row
        self.tabled.add(msg_id)

    def release_inflight(self, row: bytes) -> None:
        if len(row) > INFLIGHT_SIZE and row[0] == _HOLDS:
            msg_id = u64_at(row, 3)
            self.now_in.pop(msg_id, None)
            self.gone_in[msg_id] = row
        else:
            ref = inflight_msg_id(row)
            if ref is not None:
                self.delta[ref] = self.delta.get(ref, 0) - 1

    def release_queue(self, row: bytes) -> None:
        msg_id = u64_at(row, 0)
        if len(row) > QROW.size:
            self.now_q.pop(msg_id, None)
            self.gone_q[msg_id] = row
        else:
            self.delta[msg_id] = self.delta.get(msg_id, 0) - 1

    def run(self, ops: Ops, hold_max: int) -> None:
        txn, tables = self.txn, self.tables
        delta, loose, now_q, now_in = self.delta, self.loose, self.now_q, self.now_in
        # one cursor per busy table: its key operations cost less than the transaction's
        queue_cur = txn.cursor(db=tables.queue)
        inflight_cur = txn.cursor(db=tables.inflight)
        outbox_cur = txn.cursor(db=tables.outbox)
        message_cur = txn.cursor(db=tables.messages)
        for at in range(0, len(ops), 4):
            code: int = ops[at]
            key: bytes = ops[at + 1]
            a: Any = ops[at + 2]
            b: Any = ops[at + 3]
            if code == ADD_MESSAGE:  # a: msg_id, b: the packed message (written when needed)
                data: bytes = b
                if len(data) <= hold_max:
                    loose[a] = data
                else:
                    message_cur.put(U64.pack(a), data)
                    self.tabled.add(a)
                    delta[a] = 0
            elif code == DELETE_INFLIGHT:
                old: bytes | None = inflight_cur.pop(key)
                if old is not None:
                    self.release_inflight(old)
            elif code == PUT_INFLIGHT:  # a: msg_id or None, b: the InflightRecord
                held: bytes | None = None
                if a is not None:
                    msg_id: int = a
                    held = self.at_hand(msg_id)
                    if held is not None and msg_id not in now_in and msg_id not in now_q:
                        now_in[msg_id] = key
                    else:
                        if held is not None:  # cannot be: a held one is not at hand
                            raise StoreCorrupt(f"{self.path}: message {msg_id} held twice")
                        self.to_table(msg_id)
                        delta[msg_id] = delta.get(msg_id, 0) + 1
                old = inflight_cur.replace(key, _inflight_row(b, held))
                if old is not None:
                    self.release_inflight(old)
            elif code == ENQUEUE:  # a: msg_id, b: qos
                msg_id = a
                value = QROW.pack(msg_id, b)
                data_q = self.at_hand(msg_id)
                if data_q is not None:
                    value += data_q
                    now_q[msg_id] = key
                else:
                    self.to_table(msg_id)
                    delta[msg_id] = delta.get(msg_id, 0) + 1
                queue_cur.put(key, value)
            elif code == DEQUEUE:
                old = queue_cur.pop(key)
                if old is not None:
                    self.release_queue(old)
            elif code == PUT_OUTBOX:
                outbox_cur.put(key, a)
            elif code == DELETE_OUTBOX:
                outbox_cur.pop(key)
            elif code == SET_META:
                if a is None:
                    txn.delete(key, db=tables.meta)
                else:
                    txn.put(key, a, db=tables.meta)
            elif code == PUT_QOS2:
                txn.put(key, b"", db=tables.qos2in)
            elif code == DELETE_QOS2:
                txn.delete(key, db=tables.qos2in)
            elif code == PUT_SESSION:  # a: the record, b: its row in vshards (written once)
                txn.put(key, a, db=tables.sessions)
                txn.put(b, b"", db=tables.vshards, overwrite=False)
            elif code == SKIP:
                pass
            elif code == DELETE_SESSION:  # a: its row in vshards
                txn.delete(key, db=tables.sessions)
                txn.delete(a, db=tables.vshards)
                prefix = key + SEP
                for value in drop_prefix(txn, tables.queue, prefix):
                    self.release_queue(value)
                for value in drop_prefix(txn, tables.inflight, prefix):
                    self.release_inflight(value)
                drop_prefix(txn, tables.qos2in, prefix)
            else:
                raise StoreError(f"{self.path}: unknown batch operation {code}")

    def settle(self) -> list[tuple[int, int]]:
        """Delete the messages this batch left unreferenced; the new counts, to keep once
        committed. In the batch's transaction, so a message row goes in the same commit as
        the last row naming it: on disk a message exists iff some queue or inflight row
        names it."""
        stored, messages, txn = self.stored, self.tables.messages, self.txn
        counts: list[tuple[int, int]] = []
        for msg_id, change in self.delta.items():
            if not change and msg_id in stored:
                continue
            count = stored.get(msg_id, 0) + change
            if count <= 0:
                if count < 0:
                    log.warning("%s: refcount of message %d would drop below 0", self.path, msg_id)
                count = 0
                txn.delete(U64.pack(msg_id), db=messages)
            counts.append((msg_id, count))
        return counts


def apply(txn: Any, tables: Tables, ops: Ops, stored: dict[int, int], hold_max: int,
          holder: Callable[[Any, int], tuple[bool, bytes] | None], path: str) -> list[tuple[int, int]]:
    """Run ``ops`` in ``txn``; the messages' new reference counts (msg_id, count; 0: deleted),
    for ``stored`` once the transaction is committed. ``hold_max`` is the largest packed
    message a row may hold (-1: none); ``holder(txn, msg_id)`` finds the row of an earlier
    batch holding a message, as (queue row?, key)."""
    run = _Apply(txn, tables, stored, holder, path)
    run.run(ops, hold_max)
    return run.settle()
