"""``shardbroker store ...``: inspect the durable message store.

What it does: read-only commands over a data directory - ``stats``, ``sessions``,
``session``, ``retained``, ``messages``, ``dump``, ``check`` - and ``compact``,
which writes compacted copies of every environment elsewhere. Tables (plain
aligned columns) are for people; ``--json`` is for scripts (``dump`` always
writes JSON lines, one object per record with a ``"kind"`` field, streamed).

Invariants:

* Every store is opened read-only (LMDB readers never block the broker's
  writer), so all commands work offline and while the broker runs.
* A bad data directory is one ``error:`` line on stderr and exit status 2,
  never a traceback. ``session`` of an unknown client and ``check`` finding
  problems exit with 1. A reader that closes stdout early ends the command
  quietly (``cli/main.py``): a broken pipe is not the store's error.
* ``check``, ``dump``, ``compact`` and ``reshard`` draw a progress bar on stderr
  only when it is a terminal (``cli/progress.py``); stdout is the same either way.
* Payloads in JSON are text when valid UTF-8 without control characters
  (``"payload_encoding": "utf-8"``), else base64 (``"base64"``); other bytes
  (correlation data, meta values) become ``{"base64": "..."}``.

``reshard`` is the one command that writes: offline, under the broker's lock, it
moves every session to the shard it hashes to for a new worker count
(``storage/reshard.py``). It refuses with exit status 2, and exits 1 if the
migration failed (the old data is then untouched).

What it does not do: modify a data directory (except ``reshard``), or know which
shard a client hashes to (it looks in every shard, so it also finds misplaced
sessions).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from shardbroker.cli.progress import Tracker, progress, wanted
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import Properties
from shardbroker.storage.lmdb_store import (
    RetainedStore,
    ShardStore,
    StoreError,
    data_dir_shards,
    shard_dir_name,
)
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    EXPIRY_NEVER,
    InflightRecord,
    SessionRecord,
    StoredMessage,
)

app = typer.Typer(help="Inspect the durable message store", no_args_is_help=True,
                  add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                  rich_markup_mode=None)

DataDir = Annotated[Path, typer.Option("--data-dir", help="the broker's data directory")]
Json = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]
NoProgress = Annotated[bool, typer.Option("--no-progress",
                                          help="no progress bar (drawn only when stderr is a terminal)")]
DEFAULT_DATA_DIR = Path("./shardbroker-data")
VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}
STATES = {AWAIT_PUBACK: "await PUBACK", AWAIT_PUBREC: "await PUBREC", AWAIT_PUBCOMP: "await PUBCOMP"}


def _local_matches(topic_filter: str, topic: str) -> bool:
    """MQTT level matching, used only if ``shardbroker.core.topics`` is unavailable."""
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    flevels, tlevels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(flevels):
        if level == "#":
            return True
        if i >= len(tlevels) or (level != "+" and level != tlevels[i]):
            return False
    return len(flevels) == len(tlevels)


_matches: Callable[[str, str], bool]
_validate: Callable[[str], None] | None
try:
    from shardbroker.core.topics import matches as _topics_matches
    from shardbroker.core.topics import validate_topic_filter as _topics_validate

    _matches, _validate = _topics_matches, _topics_validate
except ImportError:  # pragma: no cover - topics module absent
    _matches, _validate = _local_matches, None


# --------------------------------------------------------------------------- plumbing


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@dataclass
class _Stores:
    data_dir: Path
    shards: list[ShardStore] = field(default_factory=list)
    retained: RetainedStore | None = None
    missing: list[str] = field(default_factory=list)


@contextmanager
def _open(data_dir: Path) -> Iterator[_Stores]:
    """Every environment of ``data_dir``, read-only; StoreError anywhere -> one line, exit 2."""
    try:
        if not data_dir.is_dir():
            _fail(f"{data_dir}: no such directory")
        count = data_dir_shards(data_dir)
        if count is None:
            _fail(f"{data_dir}: not a ShardBroker data directory (no {shard_dir_name(0)} store)")
        with ExitStack() as stack:
            stores = _Stores(data_dir)
            for shard in range(count):
                if not (data_dir / shard_dir_name(shard)).exists():
                    stores.missing.append(shard_dir_name(shard))
                    typer.echo(f"warning: {data_dir / shard_dir_name(shard)} is missing", err=True)
                    continue
                s = ShardStore.open(data_dir, shard, count, readonly=True)
                stack.callback(s.close)
                stores.shards.append(s)
            if (data_dir / "retained").exists():
                stores.retained = RetainedStore.open(data_dir, readonly=True)
                stack.callback(stores.retained.close)
            yield stores
    except StoreError as exc:
        _fail(str(exc))
    except BrokenPipeError:  # the reader of stdout is gone (| head): not the store's fault
        raise
    except (OSError, ValueError) as exc:
        _fail(f"{data_dir}: {exc}")


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "") -> None:
    """Plain aligned columns; numbers right-aligned."""
    raw = [list(row) for row in rows]
    cells = [[("-" if c is None else str(c)) for c in row] for row in raw]
    numeric = [
        bool(raw) and all(isinstance(r[i], int) and not isinstance(r[i], bool) or r[i] is None
                          for r in raw)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str], nums: Sequence[bool]) -> str:
        out = [v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, nums)]
        return (indent + "  ".join(out)).rstrip()

    typer.echo(line(headers, [False] * len(headers)))
    for row in cells:
        typer.echo(line(row, numeric))


def _jsonable(value: object) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Properties):
        return _properties(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _properties(props: Properties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(props):
        value = getattr(props, f.name)
        if value != f.default:
            out[f.name] = _jsonable(value)
    return out


_BINARY_CONTROLS = frozenset(range(32)) - {9, 10, 13}


def _payload(data: bytes) -> dict[str, Any]:
    """Text if valid UTF-8 without control characters (tab/CR/LF allowed), else base64."""
    if not _BINARY_CONTROLS.intersection(data):
        try:
            return {"payload": data.decode("utf-8"), "payload_encoding": "utf-8"}
        except UnicodeDecodeError:
            pass
    return {"payload": base64.b64encode(data).decode("ascii"), "payload_encoding": "base64"}


def _message_json(msg: StoredMessage) -> dict[str, Any]:
    return {
        "topic": msg.topic, "qos": msg.qos, "retain": msg.retain, **_payload(msg.payload),
        "payload_bytes": len(msg.payload), "properties": _properties(msg.properties),
        "expires_at": msg.expires_at,
    }


def _session_json(rec: SessionRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "client_id": rec.client_id, "protocol_version": rec.protocol_version,
        "expiry_interval": rec.expiry_interval, "disconnected_at": rec.disconnected_at,
        "subscriptions": [_jsonable(s) for s in rec.subscriptions], "will": None,
    }
    if rec.will is not None:
        will = rec.will
        out["will"] = {"topic": will.topic, "qos": will.qos, "retain": will.retain,
                       **_payload(will.payload), "properties": _properties(will.properties),
                       "delay": will.delay}
    return out


def _inflight_json(rec: InflightRecord) -> dict[str, Any]:
    return {"msg_id": rec.msg_id, "qos": rec.qos, "state": rec.state,
            "state_name": STATES.get(rec.state, str(rec.state))}


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


def _json_array(items: Iterable[object]) -> None:
    """Stream a JSON array, one element per line."""
    first = True
    for item in items:
        typer.echo(("[" if first else ",") + _dumps(item))
        first = False
    typer.echo("[]" if first else "]")


def _expiry(rec: SessionRecord) -> str:
    if rec.expiry_interval == EXPIRY_NEVER:
        return "never"
    if rec.disconnected_at is None:
        return f"{rec.expiry_interval}s"
    return f"{rec.expiry_interval}s (at {_iso(rec.disconnected_at + rec.expiry_interval)})"


def _state(rec: SessionRecord) -> str:
    return "connected" if rec.disconnected_at is None else f"disconnected {_iso(rec.disconnected_at)}"


def _retained_prefix(topic_filter: str) -> str:
    """Literal part of a filter: every match starts with it."""
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            head = "/".join(levels[:i])
            return head + "/" if level == "+" and i else head
    return topic_filter


def _check_filter(topic_filter: str) -> None:
    if _validate is None:  # pragma: no cover
        return
    try:
        _validate(topic_filter)
    except ProtocolError as exc:
        _fail(f"invalid topic filter {topic_filter!r}: {exc.message}")


@contextmanager
def _progress(stores: _Stores, label: str, no_progress: bool) -> Iterator[Tracker]:
    """A bar over every row of the stores on stderr (``cli/progress.py`` says when)."""
    total = _row_total(stores) if wanted(no_progress) else 0
    with progress(label, total, wanted(no_progress, total)) as tracker:
        yield tracker


def _row_total(stores: _Stores) -> int:
    total = sum(sum(s.counts().values()) for s in stores.shards)
    return total + (stores.retained.count() if stores.retained else 0)


# --------------------------------------------------------------------------- commands


@app.command()
def stats(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: Json = False) -> None:
    """Per shard and retained: sessions, subscriptions, queued/inflight messages, sizes."""
    with _open(data_dir) as stores:
        shard_stats = [s.stats() for s in stores.shards]
        retained = stores.retained.stats() if stores.retained else None
    keys = ("sessions", "subscriptions", "queued", "inflight", "qos2_incoming", "messages")
    sizes = ("used_bytes", "file_bytes", "map_size")
    total = {k: sum(s[k] for s in shard_stats) for k in keys + sizes}
    total["retained"] = retained["retained"] if retained else 0
    for k in sizes:
        total[k] += retained[k] if retained else 0
    if as_json:
        _echo_json({"data_dir": str(data_dir), "shard_count": len(shard_stats) + len(stores.missing),
                    "missing": stores.missing, "shards": shard_stats, "retained": retained,
                    "total": total})
        return
    headers = ["ENV", "SESSIONS", "SUBS", "QUEUED", "INFLIGHT", "QOS2-IN", "MESSAGES",
               "RETAINED", "USED", "FILE", "MAP"]
    rows: list[list[object]] = []
    for s in shard_stats:
        rows.append([shard_dir_name(s["shard"]), *(s[k] for k in keys), None,
                     *(_size(s[k]) for k in sizes)])
    if retained:
        rows.append(["retained", None, None, None, None, None, None, retained["retained"],
                     *(_size(retained[k]) for k in sizes)])
    rows.append(["total", *(total[k] for k in keys), total["retained"],
                 *(_size(total[k]) for k in sizes)])
    _table(headers, rows)


@app.command()
def sessions(
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern on the client id")] = "*",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Json = False,
) -> None:
    """List sessions: client id, shard, version, state, expiry, subscriptions, queue, inflight."""
    with _open(data_dir) as stores:

        def found() -> Iterator[dict[str, Any]]:
            for s in stores.shards:
                for rec in s.sessions():
                    if fnmatch.fnmatchcase(rec.client_id, pattern):
                        yield {**_session_json(rec), "shard": s.shard,
                               "queued": s.queue_length(rec.client_id),
                               "inflight": s.inflight_count(rec.client_id), "_rec": rec}

        if as_json:
            _json_array({k: v for k, v in d.items() if k != "_rec"} for d in found())
            return
        rows: list[list[object]] = []
        for d in found():
            rec = d["_rec"]
            rows.append([rec.client_id, d["shard"], VERSIONS.get(rec.protocol_version,
                         str(rec.protocol_version)), _state(rec), _expiry(rec),
                         len(rec.subscriptions), d["queued"], d["inflight"]])
        _table(["CLIENT ID", "SHARD", "VERSION", "STATE", "EXPIRY", "SUBS", "QUEUED", "INFLIGHT"],
               rows)


@app.command()
def session(
    client_id: Annotated[str, typer.Argument(help="client id")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Json = False,
) -> None:
    """Everything about one session: subscriptions, queue, inflight, will, expiry."""
    with _open(data_dir) as stores:
        for s in stores.shards:
            rec = s.session(client_id)
            if rec is not None:
                break
        else:
            typer.echo(f"error: no session for client id {client_id!r} in {data_dir}", err=True)
            raise typer.Exit(1)
        queue = s.queue(client_id)
        inflight = s.inflight(client_id)
        qos2 = s.qos2_incoming(client_id)
    if as_json:
        _echo_json({
            **_session_json(rec), "shard": s.shard,
            "queue": [{"seq": seq, "msg_id": mid, "qos": qos, **_message_json(m)}
                      for seq, mid, qos, m in queue],
            "inflight": [{"packet_id": pid, **_inflight_json(r),
                          "message": None if m is None else _message_json(m)}
                         for pid, r, m in inflight],
            "qos2_incoming": qos2,
        })
        return
    echo = typer.echo
    echo(f"client id:     {rec.client_id}")
    echo(f"shard:         {s.shard}")
    echo(f"protocol:      MQTT {VERSIONS.get(rec.protocol_version, '?')} "
         f"(level {rec.protocol_version})")
    echo(f"state:         {_state(rec)}")
    echo(f"expiry:        {_expiry(rec)}")
    if rec.will is None:
        echo("will:          none")
    else:
        w = rec.will
        echo(f"will:          topic {w.topic!r} qos {w.qos} retain {'yes' if w.retain else 'no'} "
             f"delay {w.delay}s, {len(w.payload)} bytes")
    echo(f"\nsubscriptions ({len(rec.subscriptions)}):")
    if rec.subscriptions:
        _table(["FILTER", "QOS", "NO-LOCAL", "RETAIN-AS-PUB", "RETAIN-HANDLING", "SUB-ID"],
               [[sub.topic_filter, sub.qos, "yes" if sub.no_local else "no",
                 "yes" if sub.retain_as_published else "no", sub.retain_handling,
                 sub.subscription_id] for sub in rec.subscriptions], indent="  ")
    echo(f"\nqueue ({len(queue)}):")
    if queue:
        _table(["SEQ", "MSG-ID", "QOS", "BYTES", "EXPIRES", "TOPIC"],
               [[seq, mid, qos, len(m.payload), _iso(m.expires_at), m.topic]
                for seq, mid, qos, m in queue], indent="  ")
    echo(f"\ninflight ({len(inflight)}):")
    if inflight:
        _table(["PACKET-ID", "STATE", "QOS", "MSG-ID", "TOPIC"],
               [[pid, STATES.get(r.state, str(r.state)), r.qos, r.msg_id,
                 None if m is None else m.topic] for pid, r, m in inflight], indent="  ")
    echo(f"\nqos2 incoming: {', '.join(map(str, qos2)) if qos2 else 'none'}")


@app.command()
def retained(
    topic_filter: Annotated[str, typer.Argument(metavar="FILTER", help="MQTT topic filter")] = "#",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Json = False,
) -> None:
    """Retained messages whose topic matches FILTER."""
    _check_filter(topic_filter)
    with _open(data_dir) as stores:
        found = ((t, m) for t, m in (stores.retained.scan(_retained_prefix(topic_filter))
                                     if stores.retained else iter(()))
                 if _matches(topic_filter, t))
        if as_json:
            _json_array(_message_json(m) for _, m in found)
            return
        _table(["TOPIC", "QOS", "BYTES", "EXPIRES"],
               [[t, m.qos, len(m.payload), _iso(m.expires_at)] for t, m in found])


@app.command()
def messages(
    topic: Annotated[str | None, typer.Option("--topic", help="only topics matching this MQTT filter")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Json = False,
) -> None:
    """The stored (queued or in-flight) messages, with their reference counts."""
    if topic is not None:
        _check_filter(topic)
    with _open(data_dir) as stores:
        found = ((s.shard, mid, refs, m) for s in stores.shards for mid, refs, m in s.messages()
                 if topic is None or _matches(topic, m.topic))
        if as_json:
            _json_array({"shard": shard, "msg_id": mid, "refcount": refs, **_message_json(m)}
                        for shard, mid, refs, m in found)
            return
        _table(["SHARD", "MSG-ID", "REFS", "QOS", "RETAIN", "BYTES", "EXPIRES", "TOPIC"],
               [[shard, mid, refs, m.qos, "yes" if m.retain else "no", len(m.payload),
                 _iso(m.expires_at), m.topic] for shard, mid, refs, m in found])


@app.command()
def dump(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: Json = True,
         no_progress: NoProgress = False) -> None:
    """Every record as JSON lines with a "kind" field (always JSON; --json accepted)."""
    with _open(data_dir) as stores, _progress(stores, "dump", no_progress) as tracker:

        def records() -> Iterator[dict[str, Any]]:
            for s in stores.shards:
                env = shard_dir_name(s.shard)
                for key, value in s.meta_items():
                    yield {"kind": "meta", "env": env, "key": key, "value": _jsonable(value)}
                for rec in s.sessions():
                    yield {"kind": "session", "shard": s.shard, **_session_json(rec)}
                for mid, refs, m in s.messages():
                    yield {"kind": "message", "shard": s.shard, "msg_id": mid,
                           "refcount": refs, **_message_json(m)}
                for cid, seq, mid, qos in s.queue_rows():
                    yield {"kind": "queue", "shard": s.shard, "client_id": cid, "seq": seq,
                           "msg_id": mid, "qos": qos}
                for cid, pid, irec in s.inflight_rows():
                    yield {"kind": "inflight", "shard": s.shard, "client_id": cid,
                           "packet_id": pid, **_inflight_json(irec)}
                for cid, pid in s.qos2_rows():
                    yield {"kind": "qos2_incoming", "shard": s.shard, "client_id": cid,
                           "packet_id": pid}
            if stores.retained is not None:
                for _topic, m in stores.retained.scan():
                    yield {"kind": "retained", **_message_json(m)}

        out = sys.stdout
        n = 0
        for n, obj in enumerate(records(), 1):
            out.write(_dumps(obj) + "\n")
            if n % 1000 == 0:
                tracker.advance(1000)
        out.flush()
        tracker.advance(n % 1000)


@app.command()
def check(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: Json = False,
          no_progress: NoProgress = False) -> None:
    """Check every environment for dangling references, refcount mismatches, orphans, bad records.
    Exit status 1 when there are problems."""
    with _open(data_dir) as stores:
        problems = [f"{name}: missing" for name in stores.missing]
        with _progress(stores, "check", no_progress) as tracker:
            for s in stores.shards:
                problems += s.check(tracker.advance)
            if stores.retained is not None:
                problems += stores.retained.check(tracker.advance)
        envs = len(stores.shards) + (1 if stores.retained else 0)
    if as_json:
        _echo_json({"data_dir": str(data_dir), "environments": envs, "ok": not problems,
                    "problems": problems})
        if problems:
            raise typer.Exit(1)
        return
    if problems:
        for p in problems:
            typer.echo(p)
        typer.echo(f"{len(problems)} problem(s) in {data_dir}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {envs} environment(s) in {data_dir}, no problems")


@app.command()
def compact(
    output: Annotated[Path, typer.Option("--output", help="new directory for the compacted copy")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    no_progress: NoProgress = False,
) -> None:
    """Copy every environment, compacted, into OUTPUT (a new or empty directory)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        _fail(f"{output}: exists and is not an empty directory")
    with _open(data_dir) as stores:
        envs: list[tuple[str, ShardStore | RetainedStore]] = [
            (shard_dir_name(s.shard), s) for s in stores.shards
        ]
        if stores.retained is not None:
            envs.append(("retained", stores.retained))
        rows: list[list[object]] = []
        sizes = [(env.path / "data.mdb").stat().st_size for _, env in envs]
        show = wanted(no_progress, _row_total(stores) if wanted(no_progress) else 0)
        with progress("compact", sum(sizes), show) as tracker:
            for (name, env), before in zip(envs, sizes, strict=True):
                env.copy_compacted(output / name)
                after = (output / name / "data.mdb").stat().st_size
                rows.append([name, _size(before), _size(after)])
                tracker.advance(before)
    _table(["ENV", "BEFORE", "AFTER"], rows)
    typer.echo(f"compacted copy written to {output}")


@app.command()
def reshard(
    workers: Annotated[int, typer.Option("--workers",
                                         help="the new worker (shard) count, 1..256; 0 = one per core, as serve")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    delete_old: Annotated[bool, typer.Option("--delete-old",
                                             help="delete the old shards after the switch")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Offline: move every session to its shard for a new worker count (the broker must be stopped)."""
    from shardbroker.config import ServerConfig
    from shardbroker.storage.reshard import MAX_SHARDS, ReshardFailed, locked, migrate, prepare

    def say(line: str) -> None:
        typer.echo(line, err=True)

    if not 0 <= workers <= MAX_SHARDS:
        _fail(f"--workers must be between 0 (one per core) and {MAX_SHARDS}, got {workers}")
    if workers == 0:  # as ``serve --workers 0``
        workers = ServerConfig(workers=0).worker_count
        say(f"--workers 0: one per core, {workers}")
    try:
        with locked(data_dir):
            plan = prepare(data_dir, workers, say)
            if plan.nothing_to_do:
                typer.echo(f"{data_dir} already has {workers} shard(s): nothing to do")
                return
            typer.echo(f"reshard {data_dir}: {plan.old_shards} -> {plan.new_shards} shards; "
                       f"{plan.totals.describe()}")
            if not yes and not typer.confirm("Proceed?", default=False, err=True):
                typer.echo("aborted: nothing changed", err=True)
                raise typer.Exit(1)
            total = plan.totals.sessions
            with progress("reshard", total, wanted(no_progress, sum(plan.totals.rows()))) as tracker:
                result = migrate(plan, delete_old=delete_old, progress=tracker.say,
                                 advance=tracker.advance)
    except ReshardFailed as exc:
        _fail(str(exc), 1)
    except StoreError as exc:
        _fail(str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:
        _fail(f"{data_dir}: {exc}")
    except typer.Abort:  # no answer (end of input) or Ctrl-C at the prompt
        typer.echo("\naborted: nothing changed", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"resharded {data_dir} from {plan.old_shards} to {plan.new_shards} shards in "
               f"{result.seconds:.1f}s: {result.totals.describe()}")
    before, after = plan.totals.messages, result.totals.messages
    if before != after:
        typer.echo(f"{after} messages stored where there were {before}: a message queued for (or in "
                   f"flight to) sessions that now live on different shards is stored once in each")
    if result.pinned:
        typer.echo(f"{result.pinned} session(s) saved while connected now record the old "
                   f"shard's last alive time as their disconnect time")
    if result.old_dir is None:
        typer.echo("the old shards were deleted")
    else:
        typer.echo(f"the old shards are kept in {result.old_dir}; delete that directory once "
                   f"the broker runs well with {plan.new_shards} workers")
    typer.echo(f"start the broker with --workers {plan.new_shards}")


# --------------------------------------------------------------------------- backup


@app.command()
def backup(
    dest: Annotated[Path, typer.Argument(help="new (or empty) directory for the copy")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Copy every environment into DEST while the broker runs (LMDB's consistent hot copy,
    compacted); ``serve --data-dir DEST`` starts from the copy."""
    from shardbroker.storage.lmdb_store import copy_together

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        _fail(f"{dest}: exists and is not an empty directory")
    started = time.monotonic()
    with _open(data_dir) as stores:
        if stores.missing:
            _fail(f"{data_dir}: {', '.join(stores.missing)} missing: not backed up")
        copies: list[tuple[ShardStore | RetainedStore, Path]] = [
            (s, dest / shard_dir_name(s.shard)) for s in stores.shards]
        if stores.retained is not None:
            copies.append((stores.retained, dest / "retained"))
        try:
            copy_together(copies)
        except StoreError as exc:
            _fail(str(exc))
        rows = [[path.name, _size((store.path / "data.mdb").stat().st_size),
                 _size((path / "data.mdb").stat().st_size)] for store, path in copies]
    _table(["ENV", "SIZE", "COPY"], rows)
    typer.echo(f"backup of {data_dir} written to {dest} in {time.monotonic() - started:.1f}s")
