"""What the acceptor's own code costs per connection, measured in one process.

Every connection crosses the acceptor, one process, in series: its CPU per connection bounds
the connection rate of the whole broker. This runs the acceptor's real path for plain TCP
(``Acceptor._on_accept``: accept, read the CONNECT, decode it, pick the shard, queue the
hand-off; then ``_send_handoffs``: the frames and descriptors in one ``sendmsg`` per shard)
on a loopback listener, with Unix socket pairs standing in for the workers' links (their
descriptors are received and closed outside the measurement). ``--batch`` clients connect
and send their CONNECT first, so what is timed (``time.process_time``) is the acceptor's
work alone, the system calls included, without the event loop or the other processes::

    .venv/bin/python -m loadtests.acceptor_cost                 # 20 rounds of 200 connections
    .venv/bin/python -m loadtests.acceptor_cost --rounds 50 --batch 100

It prints the microseconds of CPU per connection (the median of the rounds, and the
range). Linux, loopback only.
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from loadtests import mqttwire
from shardbroker.config import load_config
from shardbroker.process.acceptor import Acceptor, _Link


class _Loop:
    """The little of an event loop the acceptor's accept path uses: ``call_soon`` runs later,
    when the measurement says."""

    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append((callback, args))

    def add_reader(self, *args: Any) -> None:
        pass

    def remove_reader(self, *args: Any) -> None:
        pass

    def run_soon(self) -> None:
        while self.soon:
            callback, args = self.soon.pop(0)
            callback(*args)


def _drain(sock: socket.socket) -> None:
    """Read a link's hand-offs and close the descriptors they carried."""
    while True:
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(1 << 18, socket.CMSG_SPACE(64 * 4))
        except BlockingIOError:
            return
        for _level, _kind, payload in ancdata:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=200, help="connections accepted per round (at most 256)")
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)
    config = load_config(None, {})
    listener = config.effective_listeners[0]
    listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen.bind(("127.0.0.1", 0))
    listen.listen(4096)
    listen.setblocking(False)
    acceptor = Acceptor(config, [(listen, listener, None)], "/nonexistent", args.shards)
    loop = _Loop()
    acceptor._loop = loop  # type: ignore[assignment]  # the part of a loop it uses here
    workers = []
    for shard in range(args.shards):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5.0)  # as the acceptor's own links
        theirs.setblocking(False)
        acceptor._links[shard] = _Link(ours, acceptor.counts.per_address)
        workers.append(theirs)
    per_connection: list[float] = []
    for r in range(args.rounds):
        clients = []
        for i in range(min(args.batch, 256)):
            c = socket.create_connection(listen.getsockname())
            c.sendall(mqttwire.connect(f"cost-{r}-{i}"))
            clients.append(c)
        time.sleep(0.05)  # every CONNECT is in
        before = acceptor.handed_off
        start = time.process_time()
        acceptor._on_accept(listen, listener, 0)
        loop.run_soon()
        spent = time.process_time() - start
        handed = acceptor.handed_off - before
        for w in workers:
            _drain(w)
        for c in clients:
            c.close()
        if handed != len(clients):
            print(f"round {r}: {handed} of {len(clients)} connections handed off", file=sys.stderr)
            return 1
        per_connection.append(spent / handed * 1e6)
    print(f"acceptor CPU per connection: {statistics.median(per_connection):.1f} µs "
          f"(median of {args.rounds} rounds of {min(args.batch, 256)}; {min(per_connection):.1f}-"
          f"{max(per_connection):.1f}); {acceptor.handoff_sends} sendmsg calls for {acceptor.handed_off}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
