"""One client's stored state as one value: read from a store, shipped as bytes, written back.

What it does:

* ``ClientState``: a session record with its inflight rows (packet id, row, message), its
  queue (in seq order) and its incoming QoS 2 packet ids, as ``ShardStore.client_state``
  reads them in one transaction.
* ``pack_state`` / ``unpack_state``: that value as bytes and back, built from the store's
  own record encodings (``records.encode_session``, ``pack_inflight``, ``pack_message``)
  inside one CBOR array ``[session, [[pid, inflight row, message or null], ...],
  [[qos, message], ...], [pid, ...]]``, and two more elements for a session taken from a
  copy (``core/replicas.py``): the next packet id it would give (0: not said), and the
  publish numbers it got that the lost node may hold too (``[[source, [number, ...]], ...]``,
  ``session.Restored``). Message ids and queue seqs are not shipped: they
  belong to the store that wrote them. This is what a virtual shard's move between nodes
  carries (``peer.messages.ShardState``).
* ``put_state``: the state's writes into a ``Batch`` (the session record, each message
  added once, its queue rows in order, its inflight rows under the same packet ids and
  states, its QoS 2 ids), and the state as written (the new message ids and seqs), which
  is what the broker keeps in memory. ``vshards`` copies sessions between a data directory's
  stores with it too (committing between rows as its batches fill).

Invariants: ``unpack_state(pack_state(s))`` equals ``s`` but for message ids and seqs;
``unpack_state`` raises ``StoreCorrupt`` and nothing else on bytes it did not make.

No I/O, no LMDB: the broker core may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import cbor2

from shardbroker.storage.records import (
    InflightRecord,
    SessionRecord,
    StoreCorrupt,
    StoredMessage,
    decode_inflight,
    decode_message,
    decode_session,
    encode_session,
    pack_inflight,
    pack_message,
)

__all__ = ["ClientState", "StateBatch", "pack_state", "put_state", "unpack_state"]


@dataclass(frozen=True, slots=True)
class ClientState:
    """A client's stored state (``ShardStore.client_state``)."""

    session: SessionRecord
    inflight: list[tuple[int, InflightRecord, StoredMessage | None]]  # packet id, row, message
    queue: list[tuple[int, int, int, StoredMessage]]  # seq, msg_id, qos, message
    qos2_incoming: list[int]
    next_pid: int = 0  # the next packet id its holder would give a message (0: not said)
    # publish numbers per source (global id) a session taken from a copy got while the lost
    # node's outbox may have got them too (``session.Restored``): sorted, ``((source, (mid,
    # ...)), ...)``
    got: tuple[tuple[int, tuple[int, ...]], ...] = ()


class StateBatch(Protocol):
    """The writes ``put_state`` makes (``storage.batch.Batch``)."""

    def put_session(self, rec: SessionRecord) -> None: ...
    def add_message(self, msg: StoredMessage) -> int: ...
    def enqueue(self, client_id: str, msg_id: int, qos: int) -> int: ...
    def put_inflight(self, client_id: str, packet_id: int, rec: InflightRecord) -> None: ...
    def add_qos2_incoming(self, client_id: str, packet_id: int) -> None: ...


def pack_state(state: ClientState) -> bytes:
    """The bytes of ``state`` (see the module docstring)."""
    inflight = [[pid, pack_inflight(rec), None if msg is None else pack_message(msg)]
                for pid, rec, msg in state.inflight]
    queue = [[qos, pack_message(msg)] for _seq, _msg_id, qos, msg in state.queue]
    fields: list[object] = [encode_session(state.session), inflight, queue, list(state.qos2_incoming)]
    if state.next_pid or state.got:
        fields.append(state.next_pid)
    if state.got:
        fields.append([[src, list(mids)] for src, mids in state.got])
    return cbor2.dumps(fields)


def _corrupt(problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"shipped session state: {problem}")


def _u16(v: Any) -> int:
    if type(v) is not int or not 1 <= v <= 0xFFFF:
        raise _corrupt(f"packet id {v!r}")
    return v


def unpack_state(data: bytes) -> ClientState:
    """The state ``pack_state`` made; message ids are -1 and seqs 0 (not shipped)."""
    try:
        raw = cbor2.loads(data)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _corrupt(f"undecodable ({type(exc).__name__})") from None
    if type(raw) is not list or not 4 <= len(raw) <= 6 or type(raw[0]) is not bytes:
        raise _corrupt("not a [session, inflight, queue, qos2(, next packet id(, got))] array")
    session_row, inflight_rows, queue_rows, qos2_rows = raw[:4]
    next_pid = 0
    if len(raw) >= 5:
        next_pid = raw[4]
        if type(next_pid) is not int or not 0 <= next_pid <= 0xFFFF:
            raise _corrupt(f"next packet id {next_pid!r}")
    got = _got(raw[5]) if len(raw) == 6 else ()
    if not all(type(x) is list for x in (inflight_rows, queue_rows, qos2_rows)):
        raise _corrupt("rows are not arrays")
    inflight: list[tuple[int, InflightRecord, StoredMessage | None]] = []
    for row in inflight_rows:
        if type(row) is not list or len(row) != 3 or type(row[1]) is not bytes \
                or not (row[2] is None or type(row[2]) is bytes):
            raise _corrupt("bad inflight row")
        rec = decode_inflight(row[1])
        msg = None if row[2] is None else decode_message(row[2])
        if (rec.msg_id is None) != (msg is None):
            raise _corrupt("an inflight row and its message disagree")
        inflight.append((_u16(row[0]), InflightRecord(-1 if msg else None, rec.qos, rec.state), msg))
    queue: list[tuple[int, int, int, StoredMessage]] = []
    for row in queue_rows:
        if type(row) is not list or len(row) != 2 or row[0] not in (1, 2) or type(row[1]) is not bytes:
            raise _corrupt("bad queue row")
        queue.append((0, -1, row[0], decode_message(row[1])))
    return ClientState(decode_session(session_row), inflight, queue, [_u16(p) for p in qos2_rows], next_pid,
                       got)


def _got(rows: Any) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if type(rows) is not list or not all(
            type(r) is list and len(r) == 2 and type(r[0]) is int and r[0] >= 0 and type(r[1]) is list
            and all(type(m) is int and m > 0 for m in r[1]) for r in rows):
        raise _corrupt("got is not [[source, [number, ...]], ...]")
    return tuple((r[0], tuple(r[1])) for r in rows)


def _nothing() -> None:
    pass


def put_state(batch: StateBatch, state: ClientState, ids: dict[int, int] | None = None,
              after_row: Callable[[], None] | None = None) -> ClientState:
    """Write ``state`` into ``batch``; the state as written (its new message ids and seqs).
    ``ids`` maps message ids of ``state`` to ids already added to ``batch`` (a message shared
    by sessions is added once); it is filled as messages are added. A shipped state's
    messages (id -1) are added once per row. ``after_row`` is called after each inflight and
    queue row (where a long copy may commit: never between a message and its row)."""
    ids = {} if ids is None else ids
    row_done = after_row or _nothing
    cid = state.session.client_id
    batch.put_session(state.session)

    def added(msg_id: int, msg: StoredMessage) -> int:
        if msg_id < 0:
            return batch.add_message(msg)
        new = ids.get(msg_id)
        if new is None:
            new = ids[msg_id] = batch.add_message(msg)
        return new

    inflight: list[tuple[int, InflightRecord, StoredMessage | None]] = []
    for pid, rec, msg in state.inflight:
        if rec.msg_id is not None and msg is None:
            raise StoreCorrupt(f"inflight {pid} of {cid!r} names missing message {rec.msg_id}")
        new_id = None if rec.msg_id is None or msg is None else added(rec.msg_id, msg)
        row = InflightRecord(new_id, rec.qos, rec.state)
        batch.put_inflight(cid, pid, row)
        inflight.append((pid, row, msg))
        row_done()
    queue: list[tuple[int, int, int, StoredMessage]] = []
    for _seq, msg_id, qos, msg in state.queue:
        new_id = added(msg_id, msg)
        queue.append((batch.enqueue(cid, new_id, qos), new_id, qos, msg))
        row_done()
    for pid in state.qos2_incoming:
        batch.add_qos2_incoming(cid, pid)
    return ClientState(state.session, inflight, queue, list(state.qos2_incoming), state.next_pid, state.got)
