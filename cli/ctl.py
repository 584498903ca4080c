"""``shardbroker ctl``: ask a running broker, through the control socket in its data directory.

``shardbroker ctl --data-dir DIR COMMAND [--json]``. Tables for people, ``--json`` for scripts
(the supervisor's answer as it is). A shard that did not answer in time is named on stderr
(and under ``"missing"`` in JSON) and the command exits 1; a broker that is not running is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from shardbroker.cli.store import _fail, _table
from shardbroker.operations.admin import CONTROL_SOCKET
from shardbroker.operations.control import ControlError, call

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


@app.command()
def stats(as_json: JsonOpt = False) -> None:
    """Counters and gauges: the total, and per shard."""
    result = ask({"op": "stats"})
    if as_json:
        emit_json(result)
    else:
        shards = sorted(result["shards"], key=int)
        names = sorted(result["total"])
        _table(["counter", "total", *(f"shard {s}" for s in shards)],
               ([n, result["total"][n], *(result["shards"][s]["counters"].get(n) for s in shards)] for n in names))
    report_missing(result)
