"""Process plumbing shared by the supervisor, the acceptor and the workers:
the event loop policy, logging, and the readiness signal to the supervisor.

Log lines never carry control characters raw: a client ID or topic holding a newline or a
terminal escape (possible with ``limits.strict_utf8 = false``) is written escaped, so it can
neither forge a log line nor drive the reader's terminal. A traceback keeps its lines.

Two formats (``server.log_format``): ``text``, one line per record, and ``json``, one JSON
object per line with ``ts``, ``level``, ``logger``, ``pid``, ``msg`` and the record's
structured fields (``FIELDS``, given with ``extra=``: the connect and disconnect lines).
At the default level a connect and a disconnect line are written for every client, so a
record is made cheaply: no caller lookup (no format here names a file, line or function),
no thread or process lookup per record (the process id is the formatter's, read once), and
the date and time formatted once per second. In the acceptor and the workers the lines of
one turn of the event loop are written together, in one write at the end of the turn
(``TurnHandler``): a write a line cost those processes a system call and their reader a
wake-up each, nearly half a worker's CPU in a storm of connections. Lines from other threads,
and every line before the loop runs, are written at once; a process killed with SIGKILL loses
at most the lines of the turn it was in. A worker's connect and disconnect lines (text format)
skip the record altogether: ``TurnHandler.line_writer`` formats the line itself, the same
text the record would have made, when this handler is the only one the logger's lines reach.
Every process of a broker logs in the same format: the children read it from the
configuration the supervisor hands them. The ``ANNOUNCE`` logger (where the broker listens,
and that it is ready) logs at every level: ``--port 0`` must say which port it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LOG_FORMATS = ("text", "json")
ANNOUNCE = "shardbroker.announce"
FIELDS = ("client_id", "address", "version", "reason")  # structured fields of a record, in JSON


def install_loop() -> str:
    """Use uvloop when it is installed (unless SHARDBROKER_LOOP=asyncio); returns the loop's name."""
    if os.environ.get("SHARDBROKER_LOOP") == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _printable(text: str) -> str:
    return text if text.isprintable() else _CONTROL.sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """``LOG_FORMAT`` with the control characters of the message (U+0000-U+001F, U+007F-U+009F)
    written as ``\\xNN``; the date and time of one second formatted once."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._pid = os.getpid()
        self._second = -1
        self._stamp = ""
        self.standard = fmt == LOG_FORMAT  # ``line`` writes what ``format`` would

    def _date(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return self._stamp

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._date(record.created)},{int(record.msecs):03d}"

    def line(self, created: float, level: str, name: str, message: str) -> str:
        """What ``format`` makes of a record of ``LOG_FORMAT`` (``standard``) logged at
        ``created`` without an exception, made without the record."""
        msecs = int((created - int(created)) * 1000)  # as ``LogRecord`` computes it
        return f"{self._date(created)},{msecs:03d} {level} {name}[{self._pid}]: {_printable(message)}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.process is None:
            record.process = self._pid
        text = record.message
        if not text.isprintable():
            record.message = _CONTROL.sub(_escape, text)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``pid``, ``msg``, the ``FIELDS`` the record carries and, for an exception,
    ``exc``. Control characters in the message and the fields are written ``\\xNN`` as in
    text (JSON would escape U+0000-U+001F, but not U+007F-U+009F)."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
            "pid": self._pid if record.process is None else record.process, "msg": _printable(record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = _printable(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic in typeshed only
    """A stream handler that, once ``attach``ed to an event loop, keeps the lines the loop's
    thread logs and writes them in one write when the loop next turns (see the module
    docstring). Other threads, and every line before ``attach``, write at once."""

    def __init__(self, stream: object) -> None:
        super().__init__(stream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._pending: list[str] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._thread = loop, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if self._loop is None or threading.get_ident() != self._thread or self._loop.is_closed():
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001  (logging's own contract: report, never raise)
            self.handleError(record)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(line)

    def line_writer(self, logger: logging.Logger, level: int = logging.INFO) -> Callable[[str], bool]:
        """A writer of ``logger``'s lines at ``level`` that makes no record: given the message,
        it keeps the line ``emit`` would have kept for the turn and returns True, or returns
        False (nothing done) when the record's way could differ: another handler or a filter
        on the way, this handler's level above ``level``, a format other than the standard
        text, another thread, or no running loop. Its caller checks ``isEnabledFor(level)``."""
        name, level_name = logger.name, logging.getLevelName(level)

        def write(message: str) -> bool:
            loop, formatter = self._loop, self.formatter
            if (loop is None or type(formatter) is not EscapingFormatter or not formatter.standard
                    or level < self.level or self.filters or threading.get_ident() != self._thread
                    or loop.is_closed() or not self._alone_on(logger)):
                return False
            if not self._pending:
                loop.call_soon(self.flush)
            self._pending.append(formatter.line(time.time(), level_name, name, message))
            return True

        return write

    def _alone_on(self, logger: logging.Logger) -> bool:
        """Whether a record of ``logger`` would reach this handler, once, and no other
        (``Logger.handle`` and ``callHandlers``: the logger's filters, then the handlers up the
        hierarchy while loggers propagate)."""
        if logger.disabled or logger.filters:
            return False
        seen = 0
        node: logging.Logger | None = logger
        while node is not None:
            for handler in node.handlers:
                if handler is not self:
                    return False
                seen += 1
            node = node.parent if node.propagate else None
        return seen == 1

    def flush(self) -> None:
        """Write what the loop's turns kept, then flush the stream (also at exit)."""
        lines, self._pending = self._pending, []
        # a closed or broken stream loses the lines and raises nothing: raised in a loop
        # callback, the error would be logged, kept, and raised again at the next turn
        with self.lock or contextlib.nullcontext(), contextlib.suppress(OSError, ValueError):
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            super().flush()


def log_in_turns(loop: asyncio.AbstractEventLoop) -> None:
    """From now on, the lines this thread logs are written once per turn of ``loop``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, TurnHandler):
            handler.attach(loop)


def line_writer(logger: logging.Logger) -> Callable[[str], bool] | None:
    """The root's ``TurnHandler``'s writer of ``logger``'s INFO lines (``TurnHandler.line_writer``),
    or None without one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, TurnHandler):
            return handler.line_writer(logger)
    return None


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``)."""
    # What a record need not look up (the Logging HOWTO, "Optimization"): the formats name no
    # source file, function, thread or process name, and the formatters know the process id.
    logging._srcfile = None  # no caller frame walk per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger(ANNOUNCE).setLevel(logging.INFO)


def ready(what: str) -> None:
    """Tell the supervisor this process serves now (a line on the readiness pipe)."""
    fd = os.environ.get("SHARDBROKER_READY_FD")
    if fd is None:
        return
    try:
        os.write(int(fd), f"ready {what}\n".encode())
    except OSError:
        pass
