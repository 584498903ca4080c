"""``shardbroker ctl``: ask a running broker, through the control socket in its data directory.

``shardbroker ctl --data-dir DIR COMMAND [--json]``: ``clients [PATTERN]``, ``client ID``,
``kick ID``, ``subscriptions [FILTER]``, ``routes``, ``retained [FILTER]``, ``retained-digest``, ``stats``,
``reload``. Tables for people, ``--json`` for scripts (the supervisor's answer as it is).

Exit status: 0; 1 when a shard did not answer in time (named on stderr, and under
``"missing"`` in JSON) or the client asked about is unknown (or, for ``kick``, not
connected); 2 when no broker answers or the request is bad (one ``error:`` line).

What clients sent (client IDs, usernames, topics, filters) is shown in tables with control
and other unprintable characters escaped (``\\xNN``, ``\\uNNNN``), so a client cannot write
to the terminal; JSON escapes them by itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from shardbroker.cli.store import _fail, _table
from shardbroker.operations.admin import CONTROL_SOCKET
from shardbroker.operations.control import ControlError, call
from shardbroker.operations.select import RETAINED_LIMIT

app = typer.Typer(help="Ask a running broker (its control socket in the data directory).",
                  no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help="the answer as JSON, for scripts")]


class _Target:
    data_dir = Path("./shardbroker-data")
    timeout = 5.0


@app.callback()
def _target(
    data_dir: Annotated[Path, typer.Option(help="the running broker's data directory [server.data_dir]")] = Path("./shardbroker-data"),
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 5.0,
) -> None:
    _Target.data_dir = data_dir
    _Target.timeout = timeout


def ask(request: dict[str, Any]) -> Any:
    """The supervisor's answer to ``request``; a broker that does not answer: one line, exit 2."""
    try:
        return call(str(_Target.data_dir / CONTROL_SOCKET), request, _Target.timeout)
    except ControlError as exc:
        _fail(str(exc))


def emit_json(result: Any) -> None:
    typer.echo(json.dumps(result, indent=2, sort_keys=True))


def report_missing(result: dict[str, Any]) -> None:
    """Name the shards that gave no answer (stderr) and make the exit status 1."""
    missing = result.get("missing") or {}
    for shard, why in sorted(missing.items(), key=lambda kv: int(kv[0])):
        typer.echo(f"warning: shard {shard} did not answer: {why}", err=True)
    if missing:
        raise typer.Exit(1)


VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}
NEVER = 0xFFFFFFFF  # a session expiry interval that does not expire


def printable(text: object) -> str:
    """``text`` with every character that is not printable escaped (a terminal shows it as it is)."""
    out = str(text)
    if out.isprintable():
        return out
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in out)


def when(seconds: float | None) -> str | None:
    """A wall-clock time as ISO 8601 (UTC, to the second)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def version_name(level: int | None) -> str | None:
    return None if level is None else VERSIONS.get(level, str(level))


def _table_of(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """``_table`` with every text cell made printable."""
    _table(headers, ([c if c is None or isinstance(c, int) else printable(c) for c in row] for row in rows))


def _not_found(message: str) -> None:
    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(1)


@app.command()
def clients(
    pattern: Annotated[str | None, typer.Argument(help="a glob on the client ID (quote it)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Connected clients of every shard, by client ID."""
    result = ask({"op": "clients", "pattern": pattern})
    if as_json:
        emit_json(result)
    else:
        _table_of(["client id", "shard", "version", "address", "keepalive", "connected since", "inflight", "queued",
                   "subs", "bytes in", "bytes out", "username"],
                  ([c["client_id"], c["shard"], version_name(c["version"]), c["address"], c["keepalive"],
                    when(c["connected_at"]), c["inflight"], c["queued"], c["subscriptions"], c["bytes_in"],
                    c["bytes_out"], c["username"]] for c in result["clients"]))
    report_missing(result)


@app.command()
def client(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="the client ID")],
    as_json: JsonOpt = False,
) -> None:
    """One client: its connection (or offline session), counters and subscriptions."""
    result = ask({"op": "client", "client_id": client_id})
    if as_json:
        emit_json(result)
    report_missing(result)
    view = result["client"]
    if view is None:
        _not_found(f"no client {client_id!r} (no connection and no session on shard {result['shard']})")
    if as_json:
        return
    rows: list[tuple[str, object]] = [
        ("client id", view["client_id"]), ("state", view["state"]), ("shard", view["shard"]),
        ("protocol", version_name(view["version"])),
    ]
    if view["state"] == "online":
        rows += [("address", view["address"]), ("listener", view["listener"]), ("username", view["username"]),
                 ("keepalive", view["keepalive"]), ("connected since", when(view["connected_at"])),
                 ("bytes in", view["bytes_in"]), ("bytes out", view["bytes_out"])]
    else:
        rows += [("disconnected at", when(view["disconnected_at"])), ("expires at", when(view["expires_at"]))]
    expiry = view["expiry_interval"]
    rows += [("session expiry", "never" if expiry >= NEVER else f"{expiry} s"), ("inflight", view["inflight"]),
             ("queued", view["queued"]), ("queued bytes", view["queued_bytes"]), ("will", view["will"]),
             ("subscriptions", view["subscriptions"])]
    _table_of(["key", "value"], rows)
    if view["subscription_list"]:
        typer.echo()
        _subscription_table(view["subscription_list"], with_client=False)


@app.command()
def kick(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="the client ID")],
    as_json: JsonOpt = False,
) -> None:
    """Disconnect a client (5.0: DISCONNECT 0x98 Administrative action); its will is published
    (after its Will Delay Interval)."""
    result = ask({"op": "kick", "client_id": client_id})
    if as_json:
        emit_json(result)
    report_missing(result)
    if not result["kicked"]:
        _not_found(f"client {client_id!r} is not connected (shard {result['shard']})")
    if not as_json:
        typer.echo(f"disconnected {printable(client_id)} (shard {result['shard']}, "
                   f"MQTT {version_name(result['version'])})")


def _subscription_table(rows: list[dict[str, Any]], with_client: bool = True) -> None:
    _table_of(["client id", "filter", "qos", "no local", "retain as published", "retain handling", "id"][
        0 if with_client else 1:],
        ([*([s["client_id"]] if with_client else []), s["filter"], s["qos"], "yes" if s["no_local"] else "no",
          "yes" if s["retain_as_published"] else "no", s["retain_handling"], s["subscription_id"]] for s in rows))


@app.command()
def subscriptions(
    topic_filter: Annotated[str | None, typer.Argument(
        metavar="FILTER", help="an MQTT filter that covers the subscriptions shown, or a glob on them")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Subscriptions of every session (online and offline), by filter."""
    result = ask({"op": "subscriptions", "filter": topic_filter})
    if as_json:
        emit_json(result)
    else:
        _subscription_table(result["subscriptions"])
    report_missing(result)


@app.command()
def routes(as_json: JsonOpt = False) -> None:
    """The route table: each filter and the shards whose sessions subscribe to it."""
    result = ask({"op": "routes"})
    if as_json:
        emit_json(result)
    else:
        _table_of(["filter", "shards", "durable on"],
                  ([r["filter"], ",".join(map(str, r["shards"])), ",".join(map(str, r["durable"])) or None]
                   for r in result["routes"]))
        typer.echo(f"{result['count']} routes")
    report_missing(result)


@app.command()
def retained(
    topic_filter: Annotated[str, typer.Argument(metavar="FILTER", help="an MQTT topic filter")] = "#",
    limit: Annotated[int, typer.Option(help="show at most this many")] = RETAINED_LIMIT,
    as_json: JsonOpt = False,
) -> None:
    """Retained messages whose topic the filter matches, by topic."""
    if limit < 1:
        _fail(f"--limit: at least 1, got {limit}")
    result = ask({"op": "retained", "filter": topic_filter, "limit": limit})
    if as_json:
        emit_json(result)
    else:
        _table_of(["topic", "qos", "bytes", "payload"],
                  ([r["topic"], r["qos"], r["size"], r["preview"]] for r in result["retained"]))
        if result["truncated"]:
            typer.echo(f"(the first {limit}; there are more: narrow the filter or raise --limit)", err=True)
    for shard, why in sorted(result.get("skipped", {}).items(), key=lambda kv: int(kv[0])):
        typer.echo(f"warning: shard {shard} did not answer: {why} (another did)", err=True)
    report_missing(result)


@app.command("retained-digest")
def retained_digest(as_json: JsonOpt = False) -> None:
    """The digest of this node's retained messages and their stamps: equal on two nodes that
    hold the same set (docs/CLUSTERING.md)."""
    result = ask({"op": "retained_digest"})
    if as_json:
        emit_json(result)
    elif result.get("digest") is not None:
        typer.echo(f"node {result['node'] or '(none)'}: {result['count']} retained messages, "
                   f"digest {result['digest']}")
    for shard, why in sorted(result.get("skipped", {}).items(), key=lambda kv: int(kv[0])):
        typer.echo(f"warning: shard {shard} did not answer: {why} (another did)", err=True)
    report_missing(result)


@app.command()
def stats(as_json: JsonOpt = False) -> None:
    """Counters and gauges: the total and per shard, then the acceptor's."""
    result = ask({"op": "stats"})
    if as_json:
        emit_json(result)
    else:
        shards = sorted(result["shards"], key=int)
        names = sorted(result["total"])
        _table(["counter", "total", *(f"shard {s}" for s in shards)],
               ([n, result["total"][n], *(result["shards"][s]["counters"].get(n) for s in shards)] for n in names))
        if result["acceptor"] is not None:
            typer.echo()
            _table(["acceptor", "value"], sorted(result["acceptor"].items()))
    if result.get("acceptor_missing"):
        typer.echo(f"warning: the acceptor did not answer: {result['acceptor_missing']}", err=True)
    report_missing(result)


@app.command()
def reload(as_json: JsonOpt = False) -> None:
    """Read the configuration file again and apply what can change live (as SIGHUP does)."""
    result = ask({"op": "reload"})
    if as_json:
        emit_json(result)
    else:
        typer.echo("applied: " + (", ".join(result["changed"]) or "nothing (no live setting changed)"))
        if result["restart_needed"]:
            typer.echo("needs a restart: " + ", ".join(result["restart_needed"]))
        if result.get("acceptor_missing"):
            typer.echo(f"warning: the acceptor did not answer: {result['acceptor_missing']}", err=True)
    report_missing(result)
