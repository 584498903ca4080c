"""What the supervisor answers on ``DATA_DIR/control.sock`` (``shardbroker ctl``).

Most answers gather from every worker at once (``control.gather``): the answer carries
``shards`` (shard number → that shard's result) and ``missing`` (shard number → why it gave
none), so a shard that does not answer in time is named, never hidden.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardbroker.operations.control import TIMEOUT, Request, gather

CONTROL_SOCKET = "control.sock"  # in the data directory: ``shardbroker ctl`` finds the broker by it


def shard_socket(run_dir: str, shard: int) -> str:
    return os.path.join(run_dir, f"ctl-{shard}.sock")


def acceptor_socket(run_dir: str) -> str:
    return os.path.join(run_dir, "ctl-acceptor.sock")


ACCEPTOR = "acceptor"


@dataclass(frozen=True, slots=True)
class Gathered:
    """The ``stats`` answers of one round: ``shards`` (shard number as text → answer),
    ``missing`` (→ why none came), the acceptor's answer or why it gave none."""

    shards: dict[str, Any]
    missing: dict[str, str]
    acceptor: dict[str, Any] | None
    acceptor_missing: str | None

    def total(self) -> dict[str, int]:
        """The shards' ``counters`` summed over those that answered."""
        total: dict[str, int] = {}
        for result in self.shards.values():
            for name, value in result["counters"].items():
                total[name] = total.get(name, 0) + value
        return total


class Admin:
    """The supervisor's operations. ``reload`` is called (from the control thread) to ask the
    supervisor for a reload, as SIGHUP does."""

    def __init__(self, run_dir: str, shards: int, reload: Callable[[], None]) -> None:
        self.run_dir = run_dir
        self.shards = shards
        self._reload = reload
        self._ops: dict[str, Callable[[Request], Any]] = {
            "stats": self.stats,
            "reload": self.reload,
        }

    def __call__(self, request: Request) -> Any:
        op = self._ops.get(request["op"])
        if op is None:
            raise ValueError(f"unknown operation {request['op']!r}")
        return op(request)

    def ask_shards(self, request: Request, shards: list[int] | None = None) -> dict[str, Any]:
        """``{"shards": {n: result}, "missing": {n: why}}`` for ``request`` sent to ``shards``
        (all of them by default)."""
        wanted = range(self.shards) if shards is None else shards
        results, missing = gather({str(i): shard_socket(self.run_dir, i) for i in wanted}, request)
        return {"shards": results, "missing": missing}

    def gather_stats(self, timeout: float = TIMEOUT) -> Gathered:
        """Every shard's and the acceptor's ``stats`` answer, asked all at once."""
        paths = {str(i): shard_socket(self.run_dir, i) for i in range(self.shards)}
        paths[ACCEPTOR] = acceptor_socket(self.run_dir)
        results, missing = gather(paths, {"op": "stats"}, timeout)
        acceptor = results.pop(ACCEPTOR, None)
        acceptor_missing = missing.pop(ACCEPTOR, None)
        return Gathered(results, missing, acceptor, acceptor_missing)

    def stats(self, request: Request) -> dict[str, Any]:
        """Every shard's counters, their totals over the shards that answered, and the
        acceptor's counters (``acceptor``, None when it did not answer)."""
        got = self.gather_stats()
        out: dict[str, Any] = {"shards": got.shards, "missing": got.missing,
                               "acceptor": got.acceptor["counters"] if got.acceptor else None}
        if got.acceptor_missing is not None:
            out["acceptor_missing"] = got.acceptor_missing
        out["total"] = got.total()
        return out

    def reload(self, request: Request) -> dict[str, Any]:
        self._reload()
        return {"reloading": True}
