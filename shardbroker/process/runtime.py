"""Process plumbing shared by the supervisor, the acceptor and the workers:
the event loop policy, logging, and the readiness signal to the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
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


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def ready(what: str) -> None:
    """Tell the supervisor this process serves now (a line on the readiness pipe)."""
    fd = os.environ.get("SHARDBROKER_READY_FD")
    if fd is None:
        return
    try:
        os.write(int(fd), f"ready {what}\n".encode())
    except OSError:
        pass
