"""Fixed-bucket histograms kept by a process and sent over the control channel.

A worker (store commits) and the acceptor (hand-offs) observe values into a ``Histogram``;
its ``snapshot`` is plain JSON (the bucket bounds, cumulative counts, the sum and the count),
which the supervisor turns into Prometheus histograms at a scrape. No clock and no I/O here:
the caller measures, this only counts. Observing is a bisect and two additions.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

# Seconds: a commit (an fsync of a few pages to tens of milliseconds on a busy disk), a hand-off
# (the rest of one loop iteration of the acceptor).
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Store operations in one group commit.
BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    """Counts of observed values per bucket (``value <= bound``), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be increasing")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"bounds": [...], "cumulative": [...], "sum": s, "count": n}``: ``cumulative[i]``
        counts the values at most ``bounds[i]``; ``count`` is the +Inf bucket."""
        cumulative: list[int] = []
        running = 0
        for n in self.counts[:-1]:
            running += n
            cumulative.append(running)
        return {"bounds": list(self.bounds), "cumulative": cumulative, "sum": self.sum, "count": self.count}
