"""What a worker answers on its control socket (``RUN_DIR/ctl-N.sock``), on its event loop.

Each operation reads the shard's ``Broker`` between two events; none blocks.

- ``stats``: the broker's counters and gauges (``counters``, integers; the supervisor sums
  them over the shards for ``ctl stats``), values that are not to be summed (``values``:
  seconds held, the store's fill, the retained count of the store all shards share), the
  worker's histograms (``histograms``, see ``histogram.Histogram.snapshot``) and whether the
  shard is ready (``ready``: routes synced with every peer, store writable).
- ``publish_sys``: publish the broker-wide ``$SYS`` values the supervisor computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from shardbroker.core.broker import Broker
from shardbroker.core.clock import Now
from shardbroker.operations.control import Request
from shardbroker.operations.histogram import BATCH_BOUNDS, LATENCY_BOUNDS, Histogram


class _Store(Protocol):
    def sizes(self) -> dict[str, int]: ...
    def fill(self) -> float: ...


class _Retained(Protocol):
    def count(self) -> int: ...


class _Bus(Protocol):
    waited: int

    def backlog(self) -> int: ...


class ShardMetrics:
    """What the worker's shell measures around the broker: the store's commits (told by
    ``ShardStore.on_commit``), the store's size, the bus's backlog."""

    def __init__(self, store: _Store, retained: _Retained, bus: _Bus) -> None:
        self.store = store
        self.retained = retained
        self.bus = bus
        self.commit_seconds = Histogram(LATENCY_BOUNDS)
        self.commit_ops = Histogram(BATCH_BOUNDS)

    def committed(self, seconds: float, ops: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_ops.observe(ops)


class ShardOps:
    """The operations of one shard, by name. ``now`` reads the clock (the worker's)."""

    def __init__(self, broker: Broker, metrics: ShardMetrics, now: Callable[[], Now]) -> None:
        self.broker = broker
        self.metrics = metrics
        self._now = now
        self._ops: dict[str, Callable[[Request], Any]] = {
            "stats": self.stats,
            "publish_sys": self.publish_sys,
        }

    def __call__(self, request: Request) -> Any:
        op = self._ops.get(request["op"])
        if op is None:
            raise ValueError(f"unknown operation {request['op']!r}")
        return op(request)

    def stats(self, request: Request) -> dict[str, Any]:
        broker, metrics = self.broker, self.metrics
        counters = broker.counters()
        sizes = metrics.store.sizes()
        counters.update(
            bus_backlog=metrics.bus.backlog(), bus_waited=metrics.bus.waited, flow_holds=broker.flow.holds,
            store_used_bytes=sizes["used_bytes"], store_map_bytes=sizes["map_size"],
        )
        unsynced = sorted(set(range(broker.shards)) - broker.synced - {broker.shard})
        return {
            "shard": broker.shard,
            "counters": counters,
            "values": {
                "flow_held_seconds": broker.flow.held_for,
                "store_fill": metrics.store.fill(),
                "retained": metrics.retained.count(),
            },
            "histograms": {
                "commit_seconds": metrics.commit_seconds.snapshot(),
                "commit_ops": metrics.commit_ops.snapshot(),
            },
            "ready": {"unsynced": unsynced, "store_writable": not broker.commit.store_full},
        }

    def publish_sys(self, request: Request) -> dict[str, Any]:
        """``{"values": {topic: payload}, "retain": bool}``: publish them from this shard."""
        values = request.get("values")
        if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in values.items()):
            raise ValueError("publish_sys needs 'values': an object of topic -> text")
        self.broker.publish_sys(values, bool(request.get("retain")), self._now())
        return {"published": len(values)}
