"""What a worker answers on its control socket (``RUN_DIR/ctl-N.sock``), on its event loop.

Each operation reads the shard's ``Broker`` between two events; none blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardbroker.core.broker import Broker
from shardbroker.operations.control import Request


class ShardOps:
    """The operations of one shard, by name."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._ops: dict[str, Callable[[Request], Any]] = {
            "stats": self.stats,
        }

    def __call__(self, request: Request) -> Any:
        op = self._ops.get(request["op"])
        if op is None:
            raise ValueError(f"unknown operation {request['op']!r}")
        return op(request)

    def stats(self, request: Request) -> dict[str, Any]:
        return {"shard": self.broker.shard, "counters": self.broker.counters()}
