"""What a Prometheus scrape costs on a broker with many clients.

Starts ShardBroker (the default configuration with ``[metrics] enabled = true``, 2 workers,
on loopback), opens ``--connections`` idle MQTT connections (raw non-blocking sockets and a
pre-encoded CONNECT each, no client library), checks that ``/metrics`` counts them, then
times ``--scrapes`` scrapes of ``/metrics`` one after the other and prints the median and
the 99th percentile in milliseconds and the size of the answer::

    .venv/bin/python -m loadtests.metrics_scrape                    # 10,000 connections, 50 scrapes
    .venv/bin/python -m loadtests.metrics_scrape --connections 1000 --scrapes 20

A scrape asks every worker and the acceptor over their control sockets; a worker's answer
sums its sessions' queues, in-flight windows and subscriptions, so its cost grows with the
sessions it holds. Exit status 1 if the connections could not all be opened or counted.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loadtests import mqttwire

LISTENING = re.compile(r"listening on [^:\s]+:(\d+)")
METRICS = re.compile(r"metrics on http://[^\s:]+:(\d+)")
CONNACK = b"\x20\x02\x00\x00"


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))


class BrokerProcess:
    def __init__(self, workers: int, data: Path) -> None:
        config = data / "broker.toml"
        config.write_text("[metrics]\nenabled = true\nport = 0\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardbroker.cli.main", "serve", "--port", "0", "--workers", str(workers),
             "--data-dir", str(data / "data"), "--config", str(config), "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = self.metrics_port = 0
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                if m := LISTENING.search(line):
                    self.port = int(m.group(1))
                if m := METRICS.search(line):
                    self.metrics_port = int(m.group(1))
                if "ready:" in line:
                    ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(60) or not self.port or not self.metrics_port:
            self.stop()
            raise SystemExit("the broker did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def open_idle(port: int, n: int, timeout: float = 120.0) -> list[socket.socket]:
    """``n`` connected MQTT clients (CONNACK 0 read), opened 500 at a time."""
    done: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    started = 0
    waiting: dict[socket.socket, bytes] = {}
    while len(done) < n:
        while started < n and len(waiting) < 500:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            cid = f"idle-{started}"
            waiting[sock] = b""
            sel.register(sock, selectors.EVENT_WRITE, cid)
            started += 1
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(done)} of {n} connections opened in {timeout:g} s")
        for key, events in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                sock.send(mqttwire.connect(key.data, keepalive=0))
                sel.modify(sock, selectors.EVENT_READ, key.data)
                continue
            data = waiting[sock] + sock.recv(16)
            if len(data) < 4:
                waiting[sock] = data
                continue
            if data[:4] != CONNACK:
                raise SystemExit(f"{key.data}: unexpected answer {data!r}")
            sel.unregister(sock)
            del waiting[sock]
            done.append(sock)
    sel.close()
    return done


def scrape(port: int) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        body: bytes = resp.read()
    return time.perf_counter() - started, body


def connections(body: bytes) -> float:
    return sum(s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples if s.name == "shardbroker_connections")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    raise_nofile(args.connections + 1000)
    with tempfile.TemporaryDirectory(prefix="metrics-scrape-") as tmp:
        broker = BrokerProcess(args.workers, Path(tmp))
        try:
            idle_before, _ = scrape(broker.metrics_port)
            t0 = time.monotonic()
            held = open_idle(broker.port, args.connections)
            print(f"{len(held)} idle connections opened in {time.monotonic() - t0:.1f} s")
            deadline = time.monotonic() + 30
            while (seen := connections(scrape(broker.metrics_port)[1])) < args.connections:
                if time.monotonic() > deadline:
                    print(f"/metrics counts {seen:.0f} connections, not {args.connections}")
                    return 1
                time.sleep(0.5)
            times, sizes = [], []
            for _ in range(args.scrapes):
                took, body = scrape(broker.metrics_port)
                times.append(took * 1000)
                sizes.append(len(body))
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(f"/metrics with {args.connections} connections on {args.workers} workers, {args.scrapes} scrapes: "
                  f"median {statistics.median(times):.1f} ms, p99 {p99:.1f} ms, max {times[-1]:.1f} ms, "
                  f"{statistics.median(sizes):.0f} bytes (idle broker: {idle_before * 1000:.1f} ms)")
            for sock in held:
                sock.close()
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
