"""What the supervisor answers on ``DATA_DIR/control.sock`` (``shardbroker ctl``).

Most answers gather from every worker at once (``control.gather``): the answer carries
``shards`` (shard number → that shard's result) and ``missing`` (shard number → why it gave
none), so a shard that does not answer in time is named, never hidden.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from shardbroker.operations.control import Request, gather

CONTROL_SOCKET = "control.sock"  # in the data directory: ``shardbroker ctl`` finds the broker by it


def shard_socket(run_dir: str, shard: int) -> str:
    return os.path.join(run_dir, f"ctl-{shard}.sock")


def acceptor_socket(run_dir: str) -> str:
    return os.path.join(run_dir, "ctl-acceptor.sock")


class Admin:
    """The supervisor's operations. ``reload`` is the supervisor's own (called from the control
    thread): it reloads the configuration, as SIGHUP does, and returns the answer; it raises
    ``ValueError`` (answered as the error) when the new configuration does not load."""

    def __init__(self, run_dir: str, shards: int, reload: Callable[[], dict[str, Any]]) -> None:
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

    def tell_all(self, request: Request) -> dict[str, Any]:
        """``request`` to every shard and to the acceptor at once: ``ask_shards``' answer, with
        ``acceptor`` (its result, None when it gave none) and ``acceptor_missing`` (why not)."""
        paths = {str(i): shard_socket(self.run_dir, i) for i in range(self.shards)}
        paths["acceptor"] = acceptor_socket(self.run_dir)
        results, missing = gather(paths, request)
        out: dict[str, Any] = {"acceptor": results.pop("acceptor", None)}
        if "acceptor" in missing:
            out["acceptor_missing"] = missing.pop("acceptor")
        out.update(shards=results, missing=missing)
        return out

    def stats(self, request: Request) -> dict[str, Any]:
        """Every shard's counters, their totals over the shards that answered, and the
        acceptor's counters (``acceptor``, None when it did not answer)."""
        out = self.ask_shards({"op": "stats"})
        acceptor, why = gather({"acceptor": acceptor_socket(self.run_dir)}, {"op": "stats"})
        out["acceptor"] = acceptor["acceptor"]["counters"] if acceptor else None
        if why:
            out["acceptor_missing"] = why["acceptor"]
        total: dict[str, int] = {}
        for result in out["shards"].values():
            for name, value in result["counters"].items():
                total[name] = total.get(name, 0) + value
        out["total"] = total
        return out

    def reload(self, request: Request) -> dict[str, Any]:
        """Reload now; ``{"changed": [live settings applied], "restart_needed": [...], "shards":
        {n: result}, "missing": {n: why}, "acceptor": ...}``."""
        return self._reload()
