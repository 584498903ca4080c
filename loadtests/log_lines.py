"""What a worker's connect and disconnect lines cost, per client, in one process.

At the default level (INFO) every client makes two lines (``core/clientlog.py``). This logs
them as a worker does, through ``process/runtime.setup_logging`` (text format, a
``TurnHandler`` attached to a running event loop, the lines of a turn written together), to
``/dev/null``, once as log records and once through the handler's direct writer
(``TurnHandler.line_writer``, what the worker installs), alternately, and prints the CPU
microseconds (``time.process_time``) per client, the fastest of ``--rounds`` rounds::

    .venv/bin/python -m loadtests.log_lines                 # 5 rounds of 20,000 clients each way
    .venv/bin/python -m loadtests.log_lines --rounds 10 --clients 50000

The address is a string here (a worker's first use of it is a ``getpeername``, not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from shardbroker.core import clientlog
from shardbroker.core.client import Client
from shardbroker.process.runtime import line_writer, log_in_turns, setup_logging

LINES_PER_TURN = 100  # the loop turns (and the kept lines are written) every 50 clients


class _Transport:
    """The little of a transport the two lines read."""

    identity: str | None = None
    listener = 0
    peer = "127.0.0.1:54321"
    bytes_sent = bytes_received = 0


async def _measure(clients: int, rounds: int) -> dict[str, float]:
    log_in_turns(asyncio.get_running_loop())
    client = Client(_Transport(), None, 1 << 20, 0.0, 100, True)  # type: ignore[arg-type]
    client.client_id, client.version = "bench-client-000123", 4
    direct = line_writer(clientlog.log)
    best = {"record": float("inf"), "direct": float("inf")}
    for _ in range(rounds):
        for way in ("record", "direct"):
            clientlog.write_directly(direct if way == "direct" else None)
            start = time.process_time()
            for i in range(clients):
                clientlog.connected(client, 0, False)
                clientlog.disconnected(client, "client sent DISCONNECT [0x00 normal disconnection]")
                if i % (LINES_PER_TURN // 2) == 0:
                    await asyncio.sleep(0)
            best[way] = min(best[way], (time.process_time() - start) / clients * 1e6)
    clientlog.write_directly(None)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    out = sys.stdout
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull  # where the handler writes
        try:
            setup_logging("info")
            best = asyncio.run(_measure(args.clients, args.rounds))
        finally:
            sys.stderr = sys.__stderr__
    for way, us in best.items():
        print(f"{way:>6}: {us:5.1f} µs of CPU per client (a connect and a disconnect line)", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
