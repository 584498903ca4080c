"""What a worker answers on its control socket (``RUN_DIR/ctl-N.sock``), on its event loop.

Each operation reads the shard's ``Broker`` between two events; none blocks (``reload`` reads
the password and ACL files, which are small).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardbroker.core.broker import Broker
from shardbroker.operations.control import Request

Reload = Callable[[dict[str, Any]], dict[str, Any]]


class ShardOps:
    """The operations of one shard, by name. ``reload`` is the worker's: it takes the new
    resolved configuration (as dotted overrides) and applies it."""

    def __init__(self, broker: Broker, reload: Reload) -> None:
        self.broker = broker
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

    def stats(self, request: Request) -> dict[str, Any]:
        return {"shard": self.broker.shard, "counters": self.broker.counters()}

    def reload(self, request: Request) -> dict[str, Any]:
        """``{"op": "reload", "config": {dotted name: value}}``: the new configuration, applied."""
        config = request.get("config")
        if not isinstance(config, dict):
            raise TypeError("reload needs 'config', the resolved configuration as an object")
        return self._reload(config)
