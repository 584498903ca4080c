"""The connect and disconnect lines written without a log record (``core/clientlog.py``,
``TurnHandler.line_writer`` in ``process/runtime.py``): the same text as the record's way, and
the record's way whenever the two could differ (another handler, a filter, JSON, another thread,
the handler's level, no loop)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.core import clientlog
from shardbroker.process.runtime import (
    LOG_FORMAT,
    EscapingFormatter,
    JsonFormatter,
    TurnHandler,
    line_writer,
)
from shardbroker.protocol.packets import Disconnect

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.mark.parametrize("created", [1_765_000_000.0, 1_765_000_000.0004, 1_765_000_000.5, 1_765_000_000.9999])
@pytest.mark.parametrize("message", ["client a connected from 127.0.0.1:5 (MQTT 3.1.1, shard 0, new session)",
                                     "nl\nx tab\t c1\x85 del\x7f", "é ☃ \U0001f600", ""])
def test_a_line_is_what_format_makes_of_the_record(created: float, message: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    formatter = EscapingFormatter(LOG_FORMAT)
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: created)  # the record's own clock reading and msecs
        record = logging.LogRecord("shardbroker.clients", logging.INFO, __file__, 1, "%s", (message,), None)
    assert formatter.standard
    assert formatter.line(created, "INFO", "shardbroker.clients", message) == formatter.format(record)
    assert not EscapingFormatter("%(message)s").standard


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


class Counting:
    """The writer, counting what it wrote directly and what it left to the record."""

    def __init__(self, writer: Callable[[str], bool]) -> None:
        self.writer = writer
        self.direct = self.declined = 0

    def __call__(self, message: str) -> bool:
        done = self.writer(message)
        self.direct += done
        self.declined += not done
        return done


@pytest.fixture
def logged() -> Iterator[tuple[io.StringIO, TurnHandler]]:
    """The root logger as a worker sets it up at the default level: one ``TurnHandler`` (``alone``
    takes pytest's own capturing handlers off it, which it adds for each test's call)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    handler = TurnHandler(stream)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream, handler
    finally:
        clientlog.write_directly(None)
        root.handlers[:] = handlers
        root.setLevel(level)


def alone(handler: TurnHandler) -> None:
    logging.getLogger().handlers[:] = [handler]


def _connect_and_leave(h: Harness, client_id: str, handler: TurnHandler, writer: Counting | None,
                       before: Callable[[], None] = lambda: None) -> None:
    """Connect, DISCONNECT, and one lost connection, on a running loop the handler is attached to."""

    async def main() -> None:
        alone(handler)
        handler.attach(asyncio.get_running_loop())
        clientlog.write_directly(writer)
        before()
        c = h.connect(client_id)
        c.send(Disconnect())
        h.connect(client_id + "-dropped").drop()
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    clientlog.write_directly(None)


def _lines(stream: io.StringIO) -> list[str]:
    return [STAMP.sub("", line) for line in stream.getvalue().splitlines()]


def test_the_lines_written_directly_are_the_records_lines(h: Harness, logged: tuple[io.StringIO, TurnHandler]) -> None:
    stream, handler = logged
    _connect_and_leave(h, "by-record", handler, None)
    by_record = _lines(stream)
    stream.seek(0)
    stream.truncate()
    writer = line_writer(clientlog.log)
    assert writer is not None
    counting = Counting(writer)
    _connect_and_leave(h, "by-record", handler, counting)
    assert counting.direct == 4 and counting.declined == 0
    assert _lines(stream) == by_record
    assert len(by_record) == 4
    assert by_record[0].startswith("INFO shardbroker.clients[")
    assert "]: client by-record connected from fake:by-record (MQTT 3.1.1, shard 0, new session)" in by_record[0]
    assert "client by-record disconnected from fake:by-record (MQTT 3.1.1): client sent DISCONNECT" in by_record[1]
    assert "connection lost (closed without DISCONNECT)" in by_record[3]


def test_below_info_nothing_is_written_nor_asked(h: Harness, logged: tuple[io.StringIO, TurnHandler]) -> None:
    stream, handler = logged
    logging.getLogger().setLevel(logging.WARNING)
    writer = line_writer(clientlog.log)
    assert writer is not None
    counting = Counting(writer)
    _connect_and_leave(h, "quiet", handler, counting)
    assert counting.direct == counting.declined == 0
    assert stream.getvalue() == ""


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _declined(h: Harness, handler: TurnHandler, change: Callable[[], None]) -> Counting:
    writer = line_writer(clientlog.log)
    assert writer is not None
    counting = Counting(writer)
    _connect_and_leave(h, "declined", handler, counting, before=change)
    return counting


def test_another_handler_on_the_way_gets_the_records(h: Harness, logged: tuple[io.StringIO, TurnHandler]) -> None:
    stream, handler = logged
    kept = Kept()
    clientlog.log.addHandler(kept)
    try:
        counting = _declined(h, handler, lambda: None)
    finally:
        clientlog.log.removeHandler(kept)
    assert counting.direct == 0 and counting.declined == 4
    assert [r.__dict__["client_id"] for r in kept.records] == ["declined", "declined", "declined-dropped",
                                                               "declined-dropped"]
    assert len(_lines(stream)) == 4  # and the root's handler its lines, from the records


@pytest.mark.parametrize("change", ["filter", "json", "level", "propagate", "twice"])
def test_whatever_could_change_the_line_leaves_it_to_the_record(change: str, h: Harness,
                                                                 logged: tuple[io.StringIO, TurnHandler]) -> None:
    stream, handler = logged
    root = logging.getLogger()
    undo: list[Callable[[], None]] = []

    def apply() -> None:
        if change == "filter":
            handler.addFilter(lambda record: True)
        elif change == "json":
            handler.setFormatter(JsonFormatter())
        elif change == "level":
            handler.setLevel(logging.WARNING)
        elif change == "propagate":
            clientlog.log.propagate = False
            undo.append(lambda: setattr(clientlog.log, "propagate", True))
        elif change == "twice":
            root.handlers.append(handler)

    try:
        counting = _declined(h, handler, apply)
    finally:
        for step in undo:
            step()
    assert counting.direct == 0 and counting.declined == 4
    lines = stream.getvalue().splitlines()
    expected = {"filter": 4, "json": 4, "level": 0, "propagate": 0, "twice": 8}[change]
    assert len(lines) == expected
    if change == "json":
        assert all('"client_id": "declined' in line for line in lines)


def test_other_threads_and_a_closed_loop_leave_it_to_the_record(logged: tuple[io.StringIO, TurnHandler]) -> None:
    stream, handler = logged
    alone(handler)
    writer = line_writer(clientlog.log)
    assert writer is not None
    assert not writer("before the loop")
    loop = asyncio.new_event_loop()
    try:
        handler.attach(loop)
        answers: list[bool] = []
        t = threading.Thread(target=lambda: answers.append(writer("from a thread")))
        t.start()
        t.join()
        assert answers == [False]
        assert writer("on the loop's thread")
    finally:
        loop.close()
    assert not writer("after the loop")
    handler.flush()
    assert _lines(stream) == [f"INFO shardbroker.clients[{os.getpid()}]: on the loop's thread"]


def test_no_writer_without_a_turn_handler() -> None:
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        root.handlers[:] = [logging.StreamHandler(io.StringIO())]
        assert line_writer(clientlog.log) is None
    finally:
        root.handlers[:] = handlers
