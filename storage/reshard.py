"""Offline change of a data directory's shard count (``shardbroker store reshard``).

What it does:

* ``locked(data_dir)`` takes the broker's own exclusive ``flock`` on
  ``DATA/broker.lock`` (non-blocking) and holds it, so neither a running broker
  nor a second reshard can touch the directory meanwhile.
* ``prepare(data_dir, shards)`` validates the directory and returns a ``Plan``:
  the current shard count N, the wanted count M, and the row counts. It refuses
  (``ReshardRefused``) a missing directory, one without shard stores, a shard
  directory missing or beyond N, M outside 1..256, any non-empty outbox (QoS 1/2
  hand-overs between shards not yet acknowledged: start the broker once with N
  workers and stop it cleanly) and any problem ``check()`` finds in an old shard.
* ``migrate(plan)`` builds the M new shard environments in ``DATA/.reshard-tmp/``
  by copying each old shard with ``vshards.transfer`` (the one way state moves
  between shard stores, here keeping the source): every session goes to
  ``shard_for(client_id, M)`` with its queue (re-enqueued in seq order, new seqs),
  its inflight rows (same packet ids and states; the message re-added, or
  ``msg_id`` None for AWAIT_PUBCOMP) and its incoming QoS 2 ids. A message shared
  by several sessions that land in the same new shard is stored there once. Commits
  are batched (1000 sessions or 20000 operations) with ``sync=True``.
* ``prepare`` first finishes or undoes a move of virtual shards that marks a store
  of the directory (``vshards.recover``; a directory without marks is only read).
* It then verifies: the old stores did not change meanwhile; per new shard the
  rows equal what was copied; the totals of sessions, queued, inflight and QoS 2
  rows equal the old ones; ``check()`` of every new store finds nothing.
* Then the switch: old ``shard-NNN`` directories move to
  ``DATA/.reshard-old-<UTC timestamp>/``, the new ones into place, the temp
  directory is removed. The old ones are kept unless ``delete_old``.
* ``reshard()`` is the three steps under the lock, for scripts and tests.

Invariants:

* Before the switch nothing is written outside ``DATA/.reshard-tmp`` (but
  ``DATA/broker.lock``, created if absent); any failure before it removes the temp
  directory and leaves the old data untouched.
* The switch is a few renames in one directory, recorded first in
  ``DATA/.reshard-journal``. While it runs, ``DATA/shard-000`` is a plain file
  (so a broker started on a half-switched directory refuses to start). A failure
  during the switch undoes the renames done so far; if the process dies in the
  middle, the next ``reshard`` on that directory finds the journal, works out
  from the disk how many steps were done, and finishes the switch (if only the
  clean-up was left) or undoes it; if the disk matches no step count it refuses
  and changes nothing.
* The retained store (``DATA/retained``) is shared by all shards and is not touched.
* No hand-over meta (``handover.next.*``, ``handover.inbox.*``) is copied: with
  every outbox empty, nothing is in flight between shards, so all numbering
  starts afresh. ``msg_id`` and ``seq`` are renumbered per new shard.
* A session stored while connected (``disconnected_at`` None) is restored by the
  broker as disconnected at its shard's ``alive_at`` mark. That mark is
  per shard and not copied, so such a session gets ``disconnected_at =
  alive_at`` of its old shard (what the broker would have used); without a mark
  the record is copied as is.

What it does not do:

* No typer, no printing: progress is a callback taking one line of text (and, for a bar,
  one told of every session copied).
* It does not work on a running broker, change the retained store, or merge
  two data directories. It needs free disk space for a second copy of the shards.
* It cannot stop a broker from starting in the two instants of the switch when
  ``shard-000`` is absent (between renames); a crash exactly there followed by a
  broker start creates an empty shard-000, and the next ``reshard`` refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from shardbroker.storage.lmdb_store import ShardStore, data_dir_shards, shard_dir_name
from shardbroker.storage.lock import LOCK_NAME, DataDirInUse, lock_data_dir
from shardbroker.storage.records import StoreError
from shardbroker.storage.vshards import Selection, open_shards, transfer
from shardbroker.storage.vshards import pending as moves_pending

__all__ = [
    "MAX_SHARDS",
    "Plan",
    "ReshardFailed",
    "ReshardRefused",
    "Result",
    "Totals",
    "locked",
    "migrate",
    "prepare",
    "reshard",
]

MAX_SHARDS: Final = 256
TMP_NAME: Final = ".reshard-tmp"
OLD_PREFIX: Final = ".reshard-old-"
JOURNAL_NAME: Final = ".reshard-journal"
SESSIONS_PER_COMMIT: Final = 1000
OPS_PER_COMMIT: Final = 20_000
_SHARD_DIR_RE: Final = re.compile(r"shard-(\d{3,})")
_DEFAULT_MAX_MAP: Final = 16 << 30

Progress = Callable[[str], None]
Advance = Callable[[int], None]  # n more sessions copied (for a progress bar)


class ReshardRefused(StoreError):
    """Refused before anything was written; the message is one line for people."""


class ReshardFailed(StoreError):
    """The migration failed; the message says whether the old data is untouched."""


@dataclass(frozen=True, slots=True)
class Totals:
    sessions: int = 0
    queued: int = 0
    inflight: int = 0
    qos2_incoming: int = 0
    messages: int = 0

    @classmethod
    def of(cls, counts: dict[str, int]) -> Totals:
        return cls(counts["sessions"], counts["queued"], counts["inflight"],
                   counts["qos2_incoming"], counts["messages"])

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(dataclasses.astuple(self),
                                              dataclasses.astuple(other))))

    def rows(self) -> tuple[int, int, int, int]:
        """What must survive a reshard unchanged (messages may be stored more often)."""
        return self.sessions, self.queued, self.inflight, self.qos2_incoming

    def describe(self) -> str:
        return (f"{self.sessions} sessions, {self.queued} queued, {self.inflight} inflight, "
                f"{self.qos2_incoming} qos2 ids, {self.messages} messages")


@dataclass(frozen=True)
class Plan:
    data_dir: Path
    old_shards: int
    new_shards: int
    per_shard: tuple[Totals, ...] = ()
    recovered: str | None = None  # what was done about an interrupted earlier switch
    _snapshot: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    @property
    def nothing_to_do(self) -> bool:
        return self.old_shards == self.new_shards

    @property
    def totals(self) -> Totals:
        return _sum(self.per_shard)


def _sum(parts: tuple[Totals, ...]) -> Totals:
    total = Totals()
    for t in parts:
        total += t
    return total


@dataclass(frozen=True)
class Result:
    plan: Plan
    per_shard: tuple[Totals, ...]  # of the new shards
    old_dir: Path | None  # where the old shards are kept; None when deleted
    pinned: int  # sessions whose disconnected_at was set from alive_at
    seconds: float

    @property
    def totals(self) -> Totals:
        return _sum(self.per_shard)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return " ".join(str(exc).split()) or exc.__class__.__name__


def _noop(_line: str) -> None:
    pass


def _no_advance(_n: int) -> None:
    pass


# --------------------------------------------------------------------------- lock


def _check_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise ReshardRefused(f"{data_dir}: no such directory")
    if not data_dir.is_dir():
        raise ReshardRefused(f"{data_dir}: not a directory")


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold the broker's exclusive lock on ``data_dir`` (refuse if a broker runs there)."""
    data_dir = Path(data_dir)
    _check_dir(data_dir)
    try:
        fd = lock_data_dir(data_dir, os.getpid())
    except DataDirInUse as exc:
        held = f" (pid {exc.pid})" if exc.pid is not None else ""
        raise ReshardRefused(
            f"{data_dir} is in use by a running broker (or another reshard){held}: "
            f"{data_dir / LOCK_NAME} is locked; stop the broker first"
        ) from None
    except OSError as exc:
        raise ReshardRefused(f"{data_dir / LOCK_NAME}: cannot open ({exc.strerror})") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- prepare


def _validate_count(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise ReshardRefused(f"--workers must be between 1 and {MAX_SHARDS}, got {shards}")


def _snapshot(store: ShardStore) -> tuple[Any, ...]:
    """What would change if anybody wrote the shard (counts and meta, incl. alive_at)."""
    meta = sorted((k, repr(v)) for k, v in store.meta_items())
    return tuple(sorted(store.counts().items())), tuple(meta)


@contextlib.contextmanager
def _open_old(data_dir: Path, shards: int) -> Iterator[list[ShardStore]]:
    stores: list[ShardStore] = []
    try:
        for i in range(shards):
            stores.append(ShardStore.open(data_dir, i, shards, readonly=True))
        yield stores
    finally:
        for s in stores:
            s.close()


def prepare(data_dir: Path, shards: int, progress: Progress | None = None) -> Plan:
    """Validate ``data_dir`` for a reshard to ``shards``; the caller holds ``locked``."""
    data_dir = Path(data_dir)
    say = progress or _noop
    _validate_count(shards)
    _check_dir(data_dir)
    recovered = _recover(data_dir)
    if recovered:
        say(recovered)
    tmp = data_dir / TMP_NAME
    if tmp.exists() or tmp.is_symlink():
        say(f"removing {tmp} left over by an earlier reshard that did not finish")
        _remove(tmp)
    try:
        old = data_dir_shards(data_dir)
    except StoreError as exc:
        raise ReshardRefused(str(exc)) from None
    if old is None:
        raise ReshardRefused(
            f"{data_dir}: not a ShardBroker data directory (no {shard_dir_name(0)} store)")
    names = {n for n in os.listdir(data_dir) if _SHARD_DIR_RE.fullmatch(n)}
    expected = {shard_dir_name(i) for i in range(old)}
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise ReshardRefused(f"{data_dir}: {missing[0]} is missing (the directory has {old} "
                             f"shards); run `shardbroker store check`")
    if extra:
        raise ReshardRefused(f"{data_dir}: found {extra[0]} beyond the {old} shards recorded "
                             f"in {shard_dir_name(0)}; refusing to guess which data is current")
    try:
        if moves_pending(data_dir, old):  # read-only: a directory without marks is not written
            said: list[str] = []
            with open_shards(data_dir, old, said=said):
                pass
            for line in said:
                say(line)
    except StoreError as exc:
        raise ReshardRefused(str(exc)) from None
    if old == shards:
        return Plan(data_dir, old, shards, recovered=recovered)
    per_shard: list[Totals] = []
    snapshot: list[tuple[Any, ...]] = []
    try:
        with _open_old(data_dir, old) as stores:
            for s in stores:
                pending = sum(1 for _ in s.outbox())
                if pending:
                    raise ReshardRefused(
                        f"{shard_dir_name(s.shard)} has {pending} cross-shard hand-over(s) not "
                        f"yet acknowledged; start the broker once with {old} workers and stop "
                        f"it cleanly, then reshard")
            for s in stores:
                say(f"checking {shard_dir_name(s.shard)} ...")
                problems = s.check()
                if problems:
                    raise ReshardRefused(
                        f"{shard_dir_name(s.shard)} has {len(problems)} problem(s) (first: "
                        f"{problems[0]}); run `shardbroker store check` and repair it first")
                per_shard.append(Totals.of(s.counts()))
                snapshot.append(_snapshot(s))
    except ReshardRefused:
        raise
    except StoreError as exc:
        raise ReshardRefused(str(exc)) from None
    return Plan(data_dir, old, shards, tuple(per_shard), recovered, tuple(snapshot))


# --------------------------------------------------------------------------- copy


def _copy_shard(old: ShardStore, targets: Sequence[ShardStore], now: float,
                advance: Advance) -> tuple[list[Totals], int]:
    """Copy every session of ``old`` to its new shard (``vshards.transfer``, keeping the old
    store); what each new shard received from it, and the pinned count."""
    shards = len(targets)
    parts = [(t, Selection(workers=shards, worker=t.shard)) for t in targets]
    moved = transfer(old, parts, keep_source=True, advance=advance, now=now,
                     sessions_per_commit=SESSIONS_PER_COMMIT, ops_per_commit=OPS_PER_COMMIT)
    totals = [Totals(m.sessions, m.queued, m.inflight, m.qos2_incoming, m.messages)
              for m in moved]
    return totals, sum(m.pinned for m in moved)


def _max_map(data_dir: Path, shards: int) -> int:
    total = 0
    for i in range(shards):
        with contextlib.suppress(OSError):
            total += (data_dir / shard_dir_name(i) / "data.mdb").stat().st_size
    return max(_DEFAULT_MAX_MAP, 2 * total)


def _build(plan: Plan, tmp: Path, say: Progress,
           advance: Advance) -> tuple[tuple[Totals, ...], int]:
    """Fill and verify the new shards in ``tmp``; returns their totals and the pinned count."""
    data_dir, old_n, new_n = plan.data_dir, plan.old_shards, plan.new_shards
    max_map = _max_map(data_dir, old_n)
    new_stores: list[ShardStore] = []
    try:
        for j in range(new_n):
            new_stores.append(ShardStore.open(tmp, j, new_n, max_map_size=max_map, sync=True))
        expected = [Totals() for _ in range(new_n)]
        pinned = 0
        now = time.time()
        with _open_old(data_dir, old_n) as olds:
            for s in olds:
                got, p = _copy_shard(s, new_stores, now, advance)
                pinned += p
                expected = [a + b for a, b in zip(expected, got, strict=True)]
                say(f"copied {shard_dir_name(s.shard)} ({s.shard + 1}/{old_n}): "
                    f"{sum(t.sessions for t in got)} sessions")
            changed = [shard_dir_name(s.shard) for s, snap in zip(olds, plan._snapshot)
                       if _snapshot(s) != snap]
            if changed:
                raise StoreError(f"{changed[0]} was written during the reshard (a broker "
                                 f"process still running?)")
        totals = _verify(plan, list(zip(new_stores, expected, strict=True)), say)
        return totals, pinned
    finally:
        for s in new_stores:
            s.close()


def _verify(plan: Plan, targets: Sequence[tuple[ShardStore, Totals]],
            say: Progress) -> tuple[Totals, ...]:
    out: list[Totals] = []
    for store, want in targets:
        name = shard_dir_name(store.shard)
        counts = store.counts()
        got = Totals.of(counts)
        if got != want or counts["outbox"]:
            raise StoreError(f"verification failed: new {name} holds {got.describe()}, "
                             f"expected {want.describe()}")
        problems = store.check()
        if problems:
            raise StoreError(f"verification failed: new {name}: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        say(f"verified new {name} ({store.shard + 1}/{len(targets)}): {got.describe()}")
        out.append(got)
    before, after = plan.totals, sum(out, Totals())
    if before.rows() != after.rows():
        raise StoreError(f"verification failed: before {before.describe()}; after "
                         f"{after.describe()}")
    return tuple(out)


# --------------------------------------------------------------------------- switch

# A journal step is ["move", src, dst], ["placeholder", path] or ["unplace", path], paths
# relative to the data directory. Each step is atomic and changes what is on disk, so the
# disk after k steps differs from the disk after any other number of steps: after a crash
# the journal and the disk tell exactly how far the switch got.


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_journal(data_dir: Path, doc: dict[str, Any]) -> None:
    path = data_dir / JOURNAL_NAME
    part = data_dir / (JOURNAL_NAME + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    _fsync_dir(data_dir)


def _placeholder_text(data_dir: Path, new_shards: int) -> str:
    return (f"A reshard of this data directory was interrupted. Run\n"
            f"  shardbroker store reshard --data-dir {data_dir} --workers {new_shards}\n"
            f"to finish or undo it (see {JOURNAL_NAME}).\n")


def _steps(old_n: int, new_n: int, old_rel: str) -> list[list[str]]:
    """Old shard-000 out and a plain file in its place first (a broker refuses to start),
    then the other old shards out, the new ones in, and the new shard-000 last."""
    s0 = shard_dir_name(0)
    steps: list[list[str]] = [["move", s0, f"{old_rel}/{s0}"], ["placeholder", s0]]
    steps += [["move", shard_dir_name(i), f"{old_rel}/{shard_dir_name(i)}"]
              for i in range(1, old_n)]
    steps += [["move", f"{TMP_NAME}/{shard_dir_name(j)}", shard_dir_name(j)]
              for j in range(1, new_n)]
    steps += [["unplace", s0], ["move", f"{TMP_NAME}/{s0}", s0]]
    return steps


def _states(old_n: int, new_n: int, old_rel: str) -> list[dict[str, str]]:
    """What the disk holds after 0, 1, ... len(steps) steps: path -> dir/file/absent."""
    state: dict[str, str] = {}
    for i in range(max(old_n, new_n)):
        state[shard_dir_name(i)] = "dir" if i < old_n else "absent"
    for i in range(old_n):
        state[f"{old_rel}/{shard_dir_name(i)}"] = "absent"
    for j in range(new_n):
        state[f"{TMP_NAME}/{shard_dir_name(j)}"] = "dir"
    out = [dict(state)]
    for step in _steps(old_n, new_n, old_rel):
        if step[0] == "move":
            state[step[2]], state[step[1]] = state[step[1]], "absent"
        else:
            state[step[1]] = "file" if step[0] == "placeholder" else "absent"
        out.append(dict(state))
    return out


def _kind(path: Path) -> str:
    if path.is_symlink():
        return "other"
    if path.is_dir():
        return "dir"
    if path.is_file():
        return "file"
    return "other" if path.exists() else "absent"


def _do(data_dir: Path, step: Sequence[str], text: str) -> None:
    match step:
        case ["move", src, dst]:
            os.rename(data_dir / src, data_dir / dst)
        case ["placeholder", rel]:
            _placeholder(data_dir / rel, text)
        case ["unplace", rel]:
            (data_dir / rel).unlink()
        case _:
            raise StoreError(f"unknown journal step {step!r}")


def _placeholder(path: Path, text: str) -> None:
    """Create the plain file, or (on any failure) leave nothing."""
    with open(path, "x", encoding="utf-8") as fh:
        try:
            fh.write(text)
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def _undo(data_dir: Path, done: Sequence[Sequence[str]], text: str) -> None:
    """Undo the steps in ``done`` (all of them were done), newest first.

    Each undo is the exact inverse of its step, so an undo that is itself interrupted
    leaves a disk that matches an earlier step count and can be recovered the same way."""
    for step in reversed(done):
        match step:
            case ["move", src, dst]:
                os.rename(data_dir / dst, data_dir / src)
            case ["placeholder", rel]:
                (data_dir / rel).unlink(missing_ok=True)
            case ["unplace", rel]:
                _placeholder(data_dir / rel, text)
            case _:
                raise StoreError(f"unknown journal step {step!r}")
    _fsync_dir(data_dir)


def _switch(plan: Plan, old_dir: Path, say: Progress) -> None:
    data_dir = plan.data_dir
    steps = _steps(plan.old_shards, plan.new_shards, old_dir.name)
    doc = {"old_shards": plan.old_shards, "new_shards": plan.new_shards,
           "old_dir": old_dir.name, "steps": steps}
    text = _placeholder_text(data_dir, plan.new_shards)
    old_dir.mkdir()
    done = 0
    try:
        _write_journal(data_dir, doc)
        for step in steps:
            _do(data_dir, step, text)
            done += 1
        _fsync_dir(data_dir)
        _fsync_dir(old_dir)
    except BaseException as exc:
        try:
            _undo(data_dir, steps[:done], text)
            old_dir.rmdir()
            (data_dir / (JOURNAL_NAME + ".part")).unlink(missing_ok=True)
            (data_dir / JOURNAL_NAME).unlink(missing_ok=True)
        except Exception as undo_exc:  # noqa: BLE001 - the journal stays; tmp must stay too
            raise ReshardFailed(
                f"switching failed ({_reason(exc)}) and so did undoing it ({_reason(undo_exc)}); "
                f"run the same reshard command again to finish or undo the switch"
            ) from exc
        raise
    say(f"switched {data_dir} from {plan.old_shards} to {plan.new_shards} shards")
    try:
        (data_dir / JOURNAL_NAME).unlink()
        _fsync_dir(data_dir)
    except OSError as exc:  # the switch is complete; the next reshard run removes it
        say(f"warning: cannot remove {data_dir / JOURNAL_NAME} ({_reason(exc)}); delete it")


def _recover(data_dir: Path) -> str | None:
    """Finish or undo a switch that was interrupted (the journal is still there)."""
    path = data_dir / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        old_n, new_n, old_rel = int(doc["old_shards"]), int(doc["new_shards"]), str(doc["old_dir"])
        if not old_rel.startswith(OLD_PREFIX) or "/" in old_rel or old_rel in (".", ".."):
            raise ValueError(f"bad old_dir {old_rel!r}")
        if not (1 <= old_n <= 10_000 and 1 <= new_n <= MAX_SHARDS):
            raise ValueError("bad shard counts")
        steps = _steps(old_n, new_n, old_rel)
        if doc["steps"] != steps:
            raise ValueError("unexpected steps")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReshardRefused(f"{path}: an interrupted reshard left a journal that cannot be "
                             f"read ({_reason(exc)}); inspect the directory by hand") from None
    states = _states(old_n, new_n, old_rel)
    disk = {rel: _kind(data_dir / rel) for rel in states[0]}
    matches = [k for k, state in enumerate(states) if state == disk]
    if len(matches) != 1:
        raise ReshardRefused(
            f"{data_dir}: an interrupted reshard ({old_n} -> {new_n} shards) left shard "
            f"directories that do not match its journal {path} (was the broker started "
            f"meanwhile?); inspect the directory by hand")
    k = matches[0]
    old_dir = data_dir / old_rel
    try:
        if k < len(steps):
            _undo(data_dir, steps[:k], _placeholder_text(data_dir, new_n))
            with contextlib.suppress(OSError):
                old_dir.rmdir()
        _remove(data_dir / TMP_NAME)
        path.unlink()
        _fsync_dir(data_dir)
    except OSError as exc:
        raise ReshardRefused(f"{data_dir}: cannot recover an interrupted reshard "
                             f"({_reason(exc)}); see {path}") from None
    if k == len(steps):
        return (f"finished an interrupted reshard ({old_n} -> {new_n} shards); the old shards "
                f"are in {old_dir}")
    return (f"undid an interrupted reshard ({old_n} -> {new_n} shards); {data_dir} has its "
            f"{old_n} shards again")


# --------------------------------------------------------------------------- migrate


def _old_dir_name(data_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = data_dir / f"{OLD_PREFIX}{stamp}"
    n = 1
    while path.exists() or path.is_symlink():
        path = data_dir / f"{OLD_PREFIX}{stamp}-{n}"
        n += 1
    return path


def migrate(plan: Plan, *, delete_old: bool = False, progress: Progress | None = None,
            advance: Advance | None = None) -> Result:
    """Copy, verify and switch (see the module docstring); the caller holds ``locked``.
    ``advance(n)`` is told of every session copied."""
    say = progress or _noop
    if plan.nothing_to_do:
        raise ReshardRefused(f"{plan.data_dir} already has {plan.new_shards} shards")
    started = time.monotonic()
    data_dir = plan.data_dir
    tmp = data_dir / TMP_NAME
    try:
        tmp.mkdir()
    except OSError as exc:
        raise ReshardFailed(f"cannot create {tmp} ({_reason(exc)}); nothing changed") from None
    try:
        totals, pinned = _build(plan, tmp, say, advance or _no_advance)
    except BaseException as exc:
        cleanup = ""
        try:
            _remove(tmp)
        except OSError as rm_exc:
            cleanup = f" (could not remove {tmp}: {_reason(rm_exc)}; delete it by hand)"
        if not isinstance(exc, Exception):
            raise
        raise ReshardFailed(f"reshard failed, old data untouched: {_reason(exc)}{cleanup}") from exc
    old_dir = _old_dir_name(data_dir)
    try:
        _switch(plan, old_dir, say)
    except ReshardFailed:
        raise
    except Exception as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise ReshardFailed(f"reshard failed while switching, undone, old data in place: "
                            f"{_reason(exc)}") from exc
    with contextlib.suppress(OSError):
        _remove(tmp)
    kept: Path | None = old_dir
    if delete_old:
        try:
            shutil.rmtree(old_dir)
            kept = None
        except OSError as exc:
            say(f"could not delete {old_dir} ({_reason(exc)}); delete it by hand")
    return Result(plan, totals, kept, pinned, time.monotonic() - started)


def reshard(data_dir: Path, shards: int, *, delete_old: bool = False,
            progress: Progress | None = None) -> Result | None:
    """Lock, prepare and migrate; None when the directory already has ``shards`` shards."""
    _validate_count(shards)
    with locked(Path(data_dir)):
        plan = prepare(Path(data_dir), shards, progress)
        if plan.nothing_to_do:
            return None
        return migrate(plan, delete_old=delete_old, progress=progress)
