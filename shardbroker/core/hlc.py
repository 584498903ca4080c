"""A hybrid logical clock: stamps that follow wall time and never go back.

A stamp is the wall clock in milliseconds shifted left by 16 bits, so that up to 65,536
stamps fit in one millisecond: ``stamp = max(wall_ms << 16, last + 1)``. Every stamp this
clock gives is greater than every stamp it gave or was shown (``observe``) before, whatever
the wall clock does; and while the clocks of two nodes agree to within a few milliseconds,
the later of two writes of a topic on either node gets the greater stamp.

The retained messages of a cluster are kept by the greatest ``(stamp, node)``
(``storage/stamps.py``). One clock per worker; the worker's core gives it the wall time of
the event (``EventTime.wall``): nothing here reads a clock.

What it does not do: no comparison with the node ID, no persistence (after a restart the
wall clock is the floor again, and the store raises a local stamp above the one it holds).
"""

from __future__ import annotations

from typing import Final

SHIFT: Final = 16
"""Bits of logical counter below the milliseconds."""
MAX_STAMP: Final = (1 << 64) - 1


class HybridClock:
    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last  # the greatest stamp given or observed

    def stamp(self, wall: float) -> int:
        """A new stamp at wall time ``wall`` (seconds since the epoch)."""
        stamp = max(int(wall * 1000) << SHIFT, self.last + 1)
        if stamp > MAX_STAMP:
            raise OverflowError("hybrid clock stamp beyond 64 bits")
        self.last = stamp
        return stamp

    def observe(self, stamp: int) -> None:
        """A stamp seen from elsewhere (another node's write, a stored one): the next
        ``stamp`` is greater."""
        self.last = max(self.last, stamp)
