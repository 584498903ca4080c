"""Log lines of the acceptor's and the workers' event loops are written once per loop turn
(``process/runtime.TurnHandler``); other threads and unattached handlers write at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Iterator

from shardbroker.process.runtime import TurnHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test.turns.{id(handler)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return log


def test_a_turns_lines_go_out_in_one_write_when_the_loop_turns() -> None:
    stream = CountingStream()
    handler = TurnHandler(stream)
    log = _logger(handler)
    seen: list[str] = []

    async def main() -> None:
        handler.attach(asyncio.get_running_loop())
        for i in range(3):
            log.info("line %d", i)
        seen.append(stream.getvalue())  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert seen == [""]
    assert stream.getvalue() == "line 0\nline 1\nline 2\n"
    assert stream.writes == 1


def test_other_threads_and_an_unattached_handler_write_at_once() -> None:
    stream = CountingStream()
    handler = TurnHandler(stream)
    log = _logger(handler)
    log.info("before the loop")
    assert stream.getvalue() == "before the loop\n"

    async def main() -> None:
        handler.attach(asyncio.get_running_loop())
        t = threading.Thread(target=log.info, args=("from a thread",))
        t.start()
        t.join()
        assert stream.getvalue().endswith("from a thread\n")  # not kept for the loop
        log.info("kept")
        assert "kept" not in stream.getvalue()

    asyncio.run(main())
    assert stream.getvalue().endswith("kept\n")


@contextlib.contextmanager
def _attached_to_an_idle_loop() -> Iterator[tuple[CountingStream, TurnHandler, logging.Logger]]:
    """A handler attached to a loop that never turns (a process on its way out)."""
    stream = CountingStream()
    handler = TurnHandler(stream)
    loop = asyncio.new_event_loop()
    try:
        handler.attach(loop)
        yield stream, handler, _logger(handler)
    finally:
        loop.close()


def test_what_is_kept_is_written_at_flush_even_without_a_turn() -> None:
    with _attached_to_an_idle_loop() as (stream, handler, log):
        log.info("last words")
        assert stream.getvalue() == ""
        handler.flush()  # what logging.shutdown does at exit
        assert stream.getvalue() == "last words\n"


def test_a_broken_stream_loses_the_lines_and_raises_nothing() -> None:
    with _attached_to_an_idle_loop() as (stream, handler, log):
        log.info("lost")
        stream.close()
        handler.flush()  # no exception
