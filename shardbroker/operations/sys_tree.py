"""Broker-wide ``$SYS/broker/...`` topics with Mosquitto's names, totals over every shard.

Every ``server.sys_interval`` seconds the supervisor's ``SysPublisher`` thread asks every
worker and the acceptor for their ``stats`` (``Admin.gather_stats``), ``SysTree.update`` turns
them into topic → text, and one live worker publishes the values (control operation
``publish_sys``), retained as Mosquitto retains its ``$SYS/broker`` tree, so that a client
that subscribes later gets them at once. Like Mosquitto, a value is published only when its
text changed (``uptime`` changes every time): an unchanged retained value costs no store write.

Totals survive a worker's restart: a counter of a shard that went down (a restarted worker
starts from zero) keeps what it had counted (``Carry``). A round in which a shard does not
answer publishes nothing: a total over fewer shards would look like counters going back.

Differences from Mosquitto, on purpose: ``messages/received`` and ``messages/sent`` count
PUBLISH messages (Mosquitto counts packets of every type there), so they equal
``publish/messages/received`` and ``.../sent``; ``publish/bytes/...`` are payload bytes, as
Mosquitto's; ``store/messages/...`` count the queued and in-flight messages (Mosquitto's
count includes the retained ones, which are under ``retained messages/count``); the load
averages have no ``bytes`` and ``sockets`` series (network byte totals are not kept).

The per-shard topics ``$SYS/shardbroker/shard/N/<counter>`` stay: each worker publishes its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from shardbroker import __version__
from shardbroker.operations.admin import Admin, Gathered, shard_socket
from shardbroker.operations.control import ControlError, call

log = logging.getLogger("shardbroker.operations.sys_tree")

# The load averages: Mosquitto's topic (under $SYS/broker/load/) -> what it is a rate of.
LOAD_SOURCES = {
    "messages/received": "received",
    "messages/sent": "delivered",
    "publish/received": "received",
    "publish/sent": "delivered",
    "publish/dropped": "dropped_queue_full",
    "connections": "acceptor.handed_off",
}
LOAD_WINDOWS = {"1min": 60.0, "5min": 300.0, "15min": 900.0}  # seconds


class LoadAverage:
    """Mosquitto's load average of a counter (``sys_tree.c: calc_load``): the rate per
    minute over the last interval, folded into exponentially damped moving averages over
    one, five and fifteen minutes."""

    def __init__(self) -> None:
        self.value = {window: 0.0 for window in LOAD_WINDOWS}
        self._last: tuple[float, float] | None = None  # (the counter, the time) at the last update

    def update(self, counter: float, now: float) -> dict[str, float]:
        """The averages once ``counter`` is reached at ``now`` (seconds, monotonic); the first
        update only takes the counter as its starting point."""
        if self._last is not None and now > self._last[1]:
            elapsed = now - self._last[1]
            per_minute = (counter - self._last[0]) * 60.0 / elapsed
            for window, seconds in LOAD_WINDOWS.items():
                damping = math.exp(-elapsed / seconds)
                self.value[window] = per_minute + damping * (self.value[window] - per_minute)
        self._last = (counter, now)
        return dict(self.value)


class Carry:
    """Counters summed over shards whose processes restart: a shard's counter that went
    down started again from zero, so what it had counted before is kept and added."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}
        self._base: dict[tuple[str, str], int] = {}

    def total(self, counters: dict[str, dict[str, int]], name: str) -> int:
        """``name`` summed over ``counters`` (shard → its counters), restarts carried over."""
        total = 0
        for shard, values in counters.items():
            key = (shard, name)
            value = values.get(name, 0)
            if value < self._last.get(key, 0):
                self._base[key] = self._base.get(key, 0) + self._last[key]
            self._last[key] = value
            total += value + self._base.get(key, 0)
        return total


class SysTree:
    """The ``$SYS/broker`` values of one round, and which of them changed since the last
    published round."""

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic
        self.maximum = 0  # most clients connected at once, as seen at the rounds
        self._carry = Carry()
        self._loads = {topic: LoadAverage() for topic in LOAD_SOURCES}
        self._published: dict[str, str] = {}

    def values(self, got: Gathered, now: float) -> dict[str, str] | None:
        """Every value of this round (topic → text), or None when a shard did not answer."""
        if got.missing:
            return None
        counters = {shard: answer["counters"] for shard, answer in got.shards.items()}
        if got.acceptor is not None:
            counters["acceptor"] = {f"acceptor.{k}": v for k, v in got.acceptor["counters"].items()}

        def total(name: str) -> int:
            return self._carry.total(counters, name)

        def gauge(name: str) -> int:
            return sum(answer["counters"].get(name, 0) for answer in got.shards.values())

        connected, offline = gauge("connections"), gauge("sessions_offline")
        self.maximum = max(self.maximum, connected)
        received, sent = total("received"), total("delivered")
        out = {
            "version": f"shardbroker {__version__}",
            "uptime": f"{int(now - self.started)} seconds",
            "clients/connected": connected,
            "clients/disconnected": offline,
            "clients/total": connected + offline,
            "clients/maximum": self.maximum,
            "messages/received": received,
            "messages/sent": sent,
            "publish/messages/received": received,
            "publish/messages/sent": sent,
            "publish/messages/dropped": total("dropped_queue_full"),
            "publish/bytes/received": total("received_bytes"),
            "publish/bytes/sent": total("delivered_bytes"),
            "retained messages/count": max((a["values"]["retained"] for a in got.shards.values()), default=0),
            "subscriptions/count": gauge("subscriptions"),
            "store/messages/count": gauge("queued") + gauge("inflight"),
            "store/messages/bytes": gauge("queued_bytes") + gauge("inflight_bytes"),
        }
        for topic, source in LOAD_SOURCES.items():
            if source.startswith("acceptor.") and "acceptor" not in counters:
                continue  # and its average waits for the acceptor's next answer
            for window, value in self._loads[topic].update(total(source), now).items():
                out[f"load/{topic}/{window}"] = f"{value:.2f}"
        return {f"$SYS/broker/{topic}": str(value) for topic, value in out.items()}

    def changed(self, values: dict[str, str]) -> dict[str, str]:
        """The values whose text differs from the one last published."""
        return {topic: text for topic, text in values.items() if self._published.get(topic) != text}

    def published(self, values: dict[str, str]) -> None:
        self._published.update(values)


IDLE_WAIT = 1.0  # seconds between looks at ``interval`` while it is 0


class SysPublisher:
    """A thread of the supervisor: every ``interval`` seconds (``server.sys_interval``, which a
    reload may change), gather, compute, and have the lowest-numbered worker that answered
    publish what changed."""

    def __init__(self, admin: Admin, interval: float) -> None:
        self.admin = admin
        self.interval = interval
        self.tree = SysTree(time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sys-tree", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        # ``interval`` may change (a reload); 0 publishes nothing until it does
        while not self._stop.wait(self.interval or IDLE_WAIT):
            if not self.interval:
                continue
            try:
                self.round()
            except Exception:  # a thread that dies silently would stop $SYS for good
                log.exception("$SYS round failed")

    def round(self) -> dict[str, Any] | None:
        """One round; what was published (None when nothing could be)."""
        got = self.admin.gather_stats(min(2.0, max(0.5, self.interval)))
        values = self.tree.values(got, time.monotonic())
        if values is None:
            log.debug("$SYS not published: shards %s did not answer", sorted(got.missing, key=int))
            return None
        changed = self.tree.changed(values)
        shard = min(int(s) for s in got.shards)
        try:
            call(shard_socket(self.admin.run_dir, shard), {"op": "publish_sys", "values": changed, "retain": True})
        except ControlError as exc:
            log.debug("$SYS not published by shard %d: %s", shard, exc)
            return None
        self.tree.published(changed)
        return changed
