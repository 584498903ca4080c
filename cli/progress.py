"""Progress bars for the long store commands (``check``, ``dump``, ``compact``, ``reshard``).

A bar (rich) goes to stderr, and only when stderr is a terminal: what scripts and pipes
read is the same with or without it. ``--no-progress`` turns it off; the environment
variable ``SHARDBROKER_PROGRESS`` overrides the terminal test (``1``: always, even on a
pipe, where the bar is drawn once at the end; ``0``: never). Without ``1`` a store smaller
than ``MIN_ROWS`` rows gets no bar: it is done before one would be read.

``Tracker.say`` prints a line of text: above the bar while one is drawn, else as a plain
line on stderr (as the commands printed it before bars existed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

MIN_ROWS = 10_000
ENV = "SHARDBROKER_PROGRESS"


def wanted(no_progress: bool, rows: int | None = None) -> bool:
    """Whether to draw a bar: not with --no-progress, forced by ``SHARDBROKER_PROGRESS``, else
    when stderr is a terminal and the work (``rows``, if known) is big enough to watch."""
    if no_progress:
        return False
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() and (rows is None or rows >= MIN_ROWS)


class Tracker:
    """What a command reports progress to: ``advance(n)`` units done, ``say(line)``."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def advance(self, n: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)

    def say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line, err=True)


@contextmanager
def progress(label: str, total: int, show: bool) -> Iterator[Tracker]:
    """A ``Tracker`` drawing a bar of ``total`` units on stderr when ``show``, else only lines."""
    tracker = Tracker()
    if not show:
        yield tracker
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        tracker._bar = bar
        tracker._task = bar.add_task(label, total=total)
        try:
            yield tracker
        finally:
            tracker._bar = None
