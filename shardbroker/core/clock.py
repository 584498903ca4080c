"""Time and timers as the core receives them from its shell.

The core never reads a clock. Every entry point of ``Broker`` takes a ``Now``
(wall clock for what MQTT measures in real time: expiry, will delay, downtime;
monotonic for what must not jump: keepalive, flow, resends), stored in the shared
``EventTime`` for the duration of that event, so that one event reads time once
and all of its parts agree on it. Timers the core needs (the next flush, a flow
recheck, a SUBACK that waits for route acknowledgements) are asked of a
``Scheduler``: the worker's event loop in production, a list in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol


class Now(NamedTuple):
    wall: float  # seconds since the epoch
    mono: float  # monotonic seconds


class EventTime:
    """The time of the event being handled (shared by every part of one broker)."""

    __slots__ = ("mono", "wall")

    def __init__(self, now: Now) -> None:
        self.wall = now.wall
        self.mono = now.mono

    def set(self, now: Now) -> None:
        self.wall = now.wall
        self.mono = now.mono


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """Run a callback with the time it runs at: soon (after this event), or after a delay."""

    def soon(self, callback: Callable[[Now], None]) -> None: ...
    def later(self, delay: float, callback: Callable[[Now], None]) -> Timer: ...
