"""Process plumbing shared by the supervisor, the acceptor and the workers:
the event loop policy, logging, and the readiness signal to the supervisor.

Log lines never carry control characters raw: a client ID or topic holding a newline or a
terminal escape (possible with ``limits.strict_utf8 = false``) is written escaped, so it can
neither forge a log line nor drive the reader's terminal. A traceback keeps its lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


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


class EscapingFormatter(logging.Formatter):
    """``LOG_FORMAT`` with the control characters of the message (U+0000-U+001F, U+007F-U+009F)
    written as ``\\xNN``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = record.message
        if not text.isprintable():
            record.message = _CONTROL.sub(_escape, text)
        return super().formatMessage(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def ready(what: str) -> None:
    """Tell the supervisor this process serves now (a line on the readiness pipe)."""
    fd = os.environ.get("SHARDBROKER_READY_FD")
    if fd is None:
        return
    try:
        os.write(int(fd), f"ready {what}\n".encode())
    except OSError:
        pass
