"""``shardbroker cluster``: the cluster's state in etcd, and the operator's changes to it.

``shardbroker cluster [--etcd URL,... | --config FILE] COMMAND``: ``status [--json]``,
``drain NODE``, ``undrain NODE``, ``forget NODE``. The etcd endpoints come from ``--etcd``,
else from the configuration file's ``[cluster] etcd_endpoints``. These talk to etcd only;
no broker needs to run.

Exit status: 0; 2 with one ``error:`` line for bad input (no endpoints, a node that is not
known) and when no etcd member answers.

The etcd client (``etcd3gw``) comes with the ``cluster`` extra; it is imported when a command
runs, so the rest of the command line works without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shardbroker.cli.ctl import _table_of, emit_json, printable
from shardbroker.cli.store import _fail
from shardbroker.config import ConfigError, load_config

if TYPE_CHECKING:
    from shardbroker.cluster.etcd import Etcd

app = typer.Typer(help="The cluster's nodes and shard map, in etcd (see docs/CLUSTERING.md).",
                  no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)

JsonOpt = Annotated[bool, typer.Option("--json", help="the answer as JSON, for scripts")]
NodeArg = Annotated[str, typer.Argument(help="the node's ID ([cluster] node_id)")]


class _Target:
    etcd: str | None = None
    config: Path | None = None
    timeout = 5.0


@app.callback()
def _target(
    etcd: Annotated[str | None, typer.Option(
        help="etcd client URLs, comma-separated [cluster.etcd_endpoints]")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="TOML configuration file whose [cluster] names etcd")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each etcd member")] = 5.0,
) -> None:
    _Target.etcd, _Target.config, _Target.timeout = etcd, config, timeout


@contextmanager
def _etcd() -> Iterator[Etcd]:
    """A client of the etcd the options name; every etcd failure is one line, exit 2."""
    try:
        from shardbroker.cluster.admin import UnknownNode
        from shardbroker.cluster.etcd import Etcd, EtcdError
        from shardbroker.cluster.shardmap import MapFormatError
    except ImportError as exc:
        _fail(f"the cluster commands need the cluster extra ({exc.name or exc}):"
              " pip install 'shardbroker[cluster]'")
    try:
        cfg = load_config(_Target.config, {"cluster.etcd_endpoints": _Target.etcd})
    except ConfigError as exc:
        _fail(f"configuration: {exc}")
    if not cfg.cluster.etcd_endpoints:
        _fail("no etcd endpoints: give --etcd URL[,URL...] or --config FILE with"
              " [cluster] etcd_endpoints")
    client = Etcd(cfg.cluster.etcd_endpoints, timeout=_Target.timeout)
    try:
        yield client
    except (EtcdError, MapFormatError, UnknownNode) as exc:
        _fail(printable(exc))
    finally:
        client.close()


@app.command("status")
def status_command(as_json: JsonOpt = False) -> None:
    """The nodes, their state and virtual shards, the controller and the map version."""
    with _etcd() as etcd:
        from shardbroker.cluster.admin import status

        result = status(etcd)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"map version {result['map_version']}, controller "
               f"{printable(result['controller'] or '-')}, virtual shards "
               f"{result['virtual_shards'] or '-'}, unassigned {result['unassigned_vshards']}")
    _table_of(["NODE", "STATE", "ADVERTISE", "WORKERS", "VSHARDS"],
              [[n["node_id"], n["state"], n["advertise"], n["workers"], n["vshards"]]
               for n in result["nodes"]])


@app.command("drain")
def drain_command(node: NodeArg) -> None:
    """Give NODE no shards: the controller moves its virtual shards to the other nodes."""
    with _etcd() as etcd:
        from shardbroker.cluster.admin import drain

        drain(etcd, node)
    typer.echo(f"node {printable(node)}: drained (its shards move at the controller's next round)")


@app.command("undrain")
def undrain_command(node: NodeArg) -> None:
    """Take NODE's drain mark away: it gets shards again."""
    with _etcd() as etcd:
        from shardbroker.cluster.admin import UnknownNode, undrain

        if not undrain(etcd, node):
            raise UnknownNode(f"node {node!r} is not drained")
    typer.echo(f"node {printable(node)}: no longer drained")


@app.command("forget")
def forget_command(node: NodeArg) -> None:
    """Remove NODE's registration (revoking its lease: a live node stops serving) and its
    drain mark; for a node that is gone for good."""
    with _etcd() as etcd:
        from shardbroker.cluster.admin import forget

        done = forget(etcd, node)
    typer.echo(printable(done))
