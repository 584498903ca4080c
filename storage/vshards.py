"""Moving the state of virtual shards from one shard store to another, crash-safe.

What it does:

* ``Selection`` names the clients of a move: those whose virtual shard
  (``lmdb_store.vshard_of``, the cluster's ``vshard_for(client_id, 1024)``) is in a
  set, or any, and optionally only those that ``shard_for(client_id, workers)``
  gives to one worker (what ``store reshard`` needs for a worker count that does
  not divide 1024). It is plain data, so a move's marks can record it.
* ``move_vshards(source, target, vshards)`` moves every session of those virtual
  shards with its queue (in order), inflight rows (same packet ids and states),
  incoming QoS 2 ids and the messages they name (stored once per move in the
  target, reference counts kept by the ``Batch`` API in both stores).
  ``transfer`` is the general form: one pass over a source, each session to the
  first part whose selection takes it, and ``keep_source`` to copy instead.
* ``recover(stores)`` finishes or undoes every move that marks the stores of one
  data directory; ``open_shards(data_dir, shards)`` opens them all writable and
  recovers, and ``pending(data_dir, shards)`` tells, read-only, whether any mark is left.

Why it is safe to kill at any point: a move spans two LMDB environments, so it is
several transactions, each atomic, in an order that recovery can read from the
marks (meta keys ``move.out.<id>`` in the source, ``move.in.<id>`` in a target):

1. source: ``move.out.<id>`` (its targets);
2. each target: ``move.in.<id>`` = (source shard, selection, ``copying``);
3. the sessions and their rows into the targets, in batches;
4. each target: its mark set to ``copied`` (the point of no return for that target);
5. source: the sessions taken by that target deleted, in batches; then the
   target's mark deleted;
6. source: ``move.out.<id>`` deleted.

Recovery, per target mark: ``copying``: delete from the target the selected
sessions that the source holds (the target held none of them before: a move
refuses a client with a session in both, before its first mark), so the move is
undone; ``copied``: delete from the source the selected sessions that the target
holds (again, as often as it takes), so it is finished. A source mark whose targets have no mark left is deleted (the move had
not begun copying, or was done). Every step is idempotent, so a crash during
recovery is recovered the same way. A writable ``ShardStore.open`` refuses a
marked store unless opened with ``moves=True`` (as here): a worker never serves a
half-moved store. An exception during the copy (a full disk, say) is taken back at
once, while the stores are open: the move leaves no mark and changes nothing.

Invariants:

* A client's session with its rows is in exactly one of the stores after recovery.
* A copy (``keep_source``) writes no mark in the source, which may be open
  read-only; its target mark says ``copy``, is deleted by the commit of the last
  batch, and one left behind by a kill is never recovered: ``recover`` refuses it
  (the target holds a partial copy, to be discarded: ``store reshard`` builds its new
  shards so, in a directory it removes when it does not finish).
* A session stored while connected (``disconnected_at`` None) is written with the
  source's ``alive_at`` mark as its disconnect time (what the source's broker would
  have used), as the offline reshard always did.

What it does not do:

* No broker runs here: the stores are the caller's, opened by it (the running broker's
  live rebalance is a later step). Outbox rows and hand-over marks stay where they are.
* A message shared by sessions of a move is stored once per move and target, not
  shared with messages the target already holds; rows do not hold their messages
  after a move (as after a reshard), which costs a message row each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shardbroker.sharding import shard_for
from shardbroker.storage.lmdb_store import (
    MOVE_PREFIX,
    VIRTUAL_SHARDS,
    Batch,
    ClientState,
    ShardStore,
    shard_dir_name,
    vshard_of,
)
from shardbroker.storage.records import StoreCorrupt, StoreError
from shardbroker.storage.session_state import put_state

__all__ = [
    "Moved",
    "Selection",
    "move_vshards",
    "open_shards",
    "pending",
    "recover",
    "transfer",
]

SESSIONS_PER_COMMIT: Final = 1000
OPS_PER_COMMIT: Final = 20_000
_OUT: Final = MOVE_PREFIX + "out."
_IN: Final = MOVE_PREFIX + "in."
_COPYING: Final = "copying"
_COPIED: Final = "copied"

Advance = Callable[[int], None]  # n more sessions moved (for a progress bar)


@dataclass(frozen=True, slots=True)
class Selection:
    """Clients whose virtual shard is in ``vshards`` (None: any) and, when ``workers`` is
    set, whose ``shard_for(client_id, workers)`` is ``worker``."""

    vshards: frozenset[int] | None = None
    workers: int | None = None
    worker: int = 0

    def __post_init__(self) -> None:
        if self.vshards is not None and any(not 0 <= v < VIRTUAL_SHARDS for v in self.vshards):
            raise ValueError(f"virtual shards are 0..{VIRTUAL_SHARDS - 1}")
        if self.workers is not None and not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} out of range for {self.workers} workers")

    def matches(self, client_id: str) -> bool:
        if self.vshards is not None and vshard_of(client_id) not in self.vshards:
            return False
        return self.workers is None or shard_for(client_id, self.workers) == self.worker

    def client_ids(self, store: ShardStore) -> Iterator[str]:
        """The clients with a session in ``store`` that this selection takes."""
        for cid in store.client_ids(self.vshards):
            if self.matches(cid):
                yield cid

    def to_value(self) -> dict[str, object]:
        return {"vshards": None if self.vshards is None else sorted(self.vshards),
                "workers": self.workers, "worker": self.worker}

    @classmethod
    def from_value(cls, value: object) -> Selection:
        try:
            if not isinstance(value, dict):
                raise TypeError("not a map")
            vs, workers, worker = value["vshards"], value["workers"], value["worker"]
            return cls(None if vs is None else frozenset(int(v) for v in vs),
                       None if workers is None else int(workers), int(worker))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorrupt(f"unreadable selection in a move mark ({exc})") from None


@dataclass(frozen=True, slots=True)
class Moved:
    """What one target received."""

    sessions: int = 0
    queued: int = 0
    inflight: int = 0
    qos2_incoming: int = 0
    messages: int = 0
    pinned: int = 0  # sessions whose disconnected_at was set from the source's alive_at


class _Part:
    """One target of a transfer: its store, selection, open batch and what went in."""

    __slots__ = ("batch", "ids", "inflight", "mark", "pinned", "qos2", "queued", "selection",
                 "sessions", "since_commit", "store")

    def __init__(self, store: ShardStore, selection: Selection, mark: str) -> None:
        self.store = store
        self.selection = selection
        self.mark = mark
        # a message shared by sessions may be named again in a later batch: not held by a row
        self.batch: Batch = store.batch(hold=False)
        self.ids: dict[int, int] = {}  # source msg_id -> target msg_id
        self.sessions = self.queued = self.inflight = self.qos2 = self.pinned = 0
        self.since_commit = 0

    def maybe_commit(self, session_done: bool, sessions_per_commit: int,
                     ops_per_commit: int) -> None:
        """Commit between whole rows (a message added is always referenced in its batch)."""
        if session_done:
            self.since_commit += 1
        if self.since_commit >= sessions_per_commit or len(self.batch) >= ops_per_commit:
            self.commit()

    def commit(self) -> None:
        self.batch.commit()
        self.since_commit = 0

    def moved(self) -> Moved:
        return Moved(self.sessions, self.queued, self.inflight, self.qos2, len(self.ids),
                     self.pinned)


def _alive_at(store: ShardStore, now: float) -> float | None:
    value = store.get_meta("alive_at")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= now:
        return float(value)
    return None


def _copy_session(source: ShardStore, part: _Part, state: ClientState, alive_at: float | None,
                  sessions_per_commit: int, ops_per_commit: int) -> None:
    """One session with its rows into ``part``'s batch (``session_state.put_state``;
    committed as it fills, between rows)."""
    rec = state.session
    if rec.disconnected_at is None and alive_at is not None:
        state = dataclasses.replace(state, session=dataclasses.replace(rec, disconnected_at=alive_at))
        part.pinned += 1
    try:
        written = put_state(part.batch, state, part.ids,
                            lambda: part.maybe_commit(False, sessions_per_commit, ops_per_commit))
    except StoreCorrupt as exc:
        raise StoreError(f"{shard_dir_name(source.shard)}: {exc}") from None
    part.sessions += 1
    part.inflight += len(written.inflight)
    part.queued += len(written.queue)
    part.qos2 += len(written.qos2_incoming)


def _union(selections: Iterable[Selection]) -> frozenset[int] | None:
    out: set[int] = set()
    for sel in selections:
        if sel.vshards is None:
            return None
        out |= sel.vshards
    return frozenset(out)


def _set_mark(store: ShardStore, key: str, value: object | None) -> None:
    with store.batch() as b:
        if value is None:
            b.delete_meta(key)
        else:
            b.set_meta(key, value)


def _delete_sessions(store: ShardStore, client_ids: Iterable[str], per_commit: int) -> None:
    """Delete these sessions (with their rows: ``Batch.delete_session``), in batches."""
    b = store.batch()
    for cid in client_ids:
        b.delete_session(cid)
        if len(b) >= per_commit:
            b.commit()
    b.commit()


def _marks(store: ShardStore) -> Iterator[tuple[str, object]]:
    for key, value in store.meta_items():
        if key.startswith(MOVE_PREFIX):
            yield key, value


def transfer(source: ShardStore, parts: Sequence[tuple[ShardStore, Selection]], *,
             keep_source: bool = False, advance: Advance | None = None,
             sessions_per_commit: int | None = None, ops_per_commit: int | None = None,
             now: float | None = None) -> list[Moved]:
    """Move (or, with ``keep_source``, copy) the selected sessions of ``source`` to the parts'
    stores; what each part received. See the module docstring for the order of writes.
    A batch is committed per ``sessions_per_commit`` sessions or ``ops_per_commit``
    operations (``SESSIONS_PER_COMMIT``, ``OPS_PER_COMMIT`` by default)."""
    if not parts:
        return []
    sessions_per_commit = sessions_per_commit or SESSIONS_PER_COMMIT
    ops_per_commit = ops_per_commit or OPS_PER_COMMIT
    targets = [store for store, _ in parts]
    if any(t is source or t.path == source.path for t in targets):
        raise ValueError("a store cannot be its own target")
    if len({t.path for t in targets}) != len(targets):
        raise ValueError("each target store once")
    for store in (*targets, *(() if keep_source else (source,))):
        if store.readonly:
            raise StoreError(f"{store.path}: store is open read-only")
        mark = next((key for key, _ in _marks(store)), None)
        if mark is not None:
            raise StoreError(f"{store.path}: an earlier move did not finish ({mark}); recover it "
                             f"first")
    if not keep_source:
        same = {(t.data_dir, t.shards) for t in targets} | {(source.data_dir, source.shards)}
        if len(same) != 1:
            raise ValueError("a move is between shard stores of one data directory; "
                             "copy (keep_source) to another")
    move_id = secrets.token_hex(6)
    out_key, in_key = _OUT + move_id, _IN + move_id
    work = [_Part(store, sel, in_key) for store, sel in parts]
    route = _router(work)
    chosen = [(cid, part) for cid in source.client_ids(_union(p.selection for p in work))
              if (part := route(cid)) is not None]
    for cid, part in chosen:  # a client in two stores: refuse, having written nothing
        if part.store.has_session(cid):
            raise StoreError(f"client id {cid!r} has a session in "
                             f"{shard_dir_name(source.shard)} and one in {part.store.path} "
                             f"already; refusing to move it")
    if not keep_source:
        _set_mark(source, out_key, {"targets": [p.store.shard for p in work]})
    for p in work:
        _set_mark(p.store, in_key, {"source": source.shard, "selection": p.selection.to_value(),
                                    "state": _COPYING, "copy": keep_source})
    alive_at = _alive_at(source, time.time() if now is None else now)
    tick = advance or (lambda _n: None)
    try:
        for cid, part in chosen:
            state = source.client_state(cid)
            if state is None:
                raise StoreError(f"{source.path}: the session of {cid!r} went while it was "
                                 f"being moved (another writer?)")
            _copy_session(source, part, state, alive_at, sessions_per_commit, ops_per_commit)
            part.maybe_commit(True, sessions_per_commit, ops_per_commit)
            tick(1)
    except Exception:
        _abandon(source, work, out_key, keep_source, ops_per_commit)
        raise
    for p in work:  # the point of no return, one target at a time
        if keep_source:
            p.batch.delete_meta(in_key)
        else:
            p.batch.set_meta(in_key, {"source": source.shard,
                                      "selection": p.selection.to_value(), "state": _COPIED,
                                      "copy": False})
        p.commit()
    if not keep_source:
        for p in work:
            _finish(source, p.store, in_key, p.selection, ops_per_commit)
        _set_mark(source, out_key, None)
    return [p.moved() for p in work]


def _router(work: Sequence[_Part]) -> Callable[[str], _Part | None]:
    """client id -> the first part whose selection takes it (each session goes to one
    target). Parts that split every client by one worker count (``store reshard``) are
    found with one hash, not one per part."""
    sels = [p.selection for p in work]
    workers = {s.workers for s in sels}
    if len(workers) == 1 and None not in workers and all(s.vshards is None for s in sels):
        count = sels[0].workers or 1
        by_worker: dict[int, _Part] = {}
        for p in work:
            by_worker.setdefault(p.selection.worker, p)
        return lambda cid: by_worker.get(shard_for(cid, count))

    def first(cid: str) -> _Part | None:
        return next((p for p in work if p.selection.matches(cid)), None)

    return first


def _abandon(source: ShardStore, work: Sequence[_Part], out_key: str, keep_source: bool,
             per_commit: int) -> None:
    """A copy failed: take back what reached the targets, while the stores are open. When that
    fails too the marks stay, and the next ``recover`` undoes the move."""
    with contextlib.suppress(Exception):
        for p in work:
            _undo(source, p.store, p.mark, p.selection, per_commit)
        if not keep_source:
            _set_mark(source, out_key, None)


def move_vshards(source: ShardStore, target: ShardStore, vshards: Iterable[int], *,
                 advance: Advance | None = None) -> Moved:
    """Move the state of these virtual shards from ``source`` to ``target`` (two shard stores
    of one data directory, both open writable)."""
    return transfer(source, [(target, Selection(frozenset(vshards)))], advance=advance)[0]


def _finish(source: ShardStore, target: ShardStore, in_key: str, selection: Selection,
            per_commit: int) -> None:
    """The target has its copy: delete it from the source, then the target's mark. Only the
    sessions the target holds (another target of the same move may hold the rest)."""
    doomed = [cid for cid in selection.client_ids(source) if target.has_session(cid)]
    _delete_sessions(source, doomed, per_commit)
    _set_mark(target, in_key, None)


def _undo(source: ShardStore, target: ShardStore, in_key: str, selection: Selection,
          per_commit: int) -> None:
    """The target's copy is partial: delete from it what came from the source, then its mark."""
    brought = [cid for cid in selection.client_ids(source) if target.has_session(cid)]
    _delete_sessions(target, brought, per_commit)
    _set_mark(target, in_key, None)


def recover(stores: Sequence[ShardStore]) -> list[str]:
    """Finish or undo every move marked in ``stores`` (every shard of one data directory,
    open writable with ``moves=True``); one line per move, for people."""
    by_shard = {s.shard: s for s in stores}
    said: list[str] = []
    for target in stores:
        for key, value in list(_marks(target)):
            if not key.startswith(_IN):
                continue
            where = f"{target.path} ({key})"
            if not isinstance(value, dict) or value.get("state") not in (_COPYING, _COPIED):
                raise StoreCorrupt(f"{where}: unreadable move mark {value!r}")
            if value.get("copy"):
                raise StoreError(f"{where}: holds a partial copy of another store; discard it")
            source = by_shard.get(value.get("source"))  # type: ignore[arg-type]
            if source is None or source is target:
                raise StoreError(f"{where}: the move's source shard {value.get('source')!r} is "
                                 f"not among the stores opened")
            selection = Selection.from_value(value.get("selection"))
            if value["state"] == _COPIED:
                _finish(source, target, key, selection, OPS_PER_COMMIT)
                said.append(f"finished an interrupted move from {shard_dir_name(source.shard)} "
                            f"to {shard_dir_name(target.shard)}")
            else:
                _undo(source, target, key, selection, OPS_PER_COMMIT)
                said.append(f"undid an interrupted move from {shard_dir_name(source.shard)} "
                            f"to {shard_dir_name(target.shard)}")
    for source in stores:
        for key, _value in list(_marks(source)):
            if key.startswith(_OUT):  # its targets' marks are gone: nothing is left to do
                _set_mark(source, key, None)
            elif not key.startswith(_IN):
                raise StoreCorrupt(f"{source.path}: unknown move mark {key}")
    return said


@contextlib.contextmanager
def open_shards(data_dir: Path, shards: int, *, sync: bool = True,
                said: list[str] | None = None) -> Iterator[list[ShardStore]]:
    """Every shard store of ``data_dir``, open writable, with interrupted moves recovered
    (what recovery did is appended to ``said``). The caller holds the data directory's lock."""
    stores: list[ShardStore] = []
    try:
        for i in range(shards):
            stores.append(ShardStore.open(Path(data_dir), i, shards, sync=sync, create=False,
                                          moves=True))
        lines = recover(stores)
        if said is not None:
            said.extend(lines)
        yield stores
    finally:
        for s in stores:
            s.close()


def pending(data_dir: Path, shards: int) -> bool:
    """Whether a move marks any shard store of ``data_dir`` (read-only; writes nothing)."""
    for i in range(shards):
        with ShardStore.open(Path(data_dir), i, shards, readonly=True) as s:
            if next(_marks(s), None) is not None:
                return True
    return False
