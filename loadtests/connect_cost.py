"""What a connection costs each broker process: CPU seconds per 1,000 connections.

Starts ShardBroker (``serve --port 0 --workers N`` on a fresh data directory, at the given
log level), then runs the bench's ``connect-rate`` scenario against it ``--runs`` times
(``loadtests.bench --target ... --scenario connect-rate --repeat 1``) and reads the user +
system CPU time of the acceptor and of each worker from ``/proc/PID/stat`` before and after
each run. A run's window covers its connections from the TCP connect to the close at its
end (the close notices included). CPU time per connection is what other load on a shared
machine disturbs least; connections/s is printed beside it, and the waits per 1,000
connections of each process (voluntary context switches: wake-ups, each of which costs a
process tens of microseconds of CPU on a virtual machine)::

    .venv/bin/python -m loadtests.connect_cost                       # 3 runs, 2 workers, warning
    .venv/bin/python -m loadtests.connect_cost --log-level info      # with the connect/disconnect lines

Linux only (``/proc``). Exit status 1 if a run failed or lost a connection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtests.bench import child_pids

LISTENING = re.compile(r"listening on [^:\s]+:(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread so far: each is a wait for an
    event (an epoll wait that blocked), which is what a process spends most on per wake-up."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> dict[str, int]:
    """The broker's processes by role: ``acceptor``, ``worker 0``, ``worker 1``, ..."""
    out: dict[str, int] = {}
    for child in child_pids().get(pid, []):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"shardbroker.process.child" not in argv:
            continue
        at = argv.index(b"shardbroker.process.child")
        role = argv[at + 1].decode()
        out[role if role == "acceptor" else f"{role} {argv[at + 2].decode()}"] = child
    return dict(sorted(out.items()))


class Broker:
    """``shardbroker serve`` on a free loopback port, its output read in a thread."""

    def __init__(self, python: str, workers: int, data: Path, log_level: str,
                 extra: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "shardbroker.cli.main", "serve", "--port", "0", "--workers", str(workers),
             "--data-dir", str(data), "--log-level", log_level, *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = 0
        self.lines = 0
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines += 1
            line = raw.decode(errors="replace")
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(1))
            if "ready:" in line:
                self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and self.port > 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--log-level", default="warning", help="the broker's (info writes a line per connect)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ShardBroker and the bench")
    args = ap.parse_args(argv)
    status = 0
    with tempfile.TemporaryDirectory(prefix="connect-cost-") as tmp:
        broker = Broker(args.python, args.workers, Path(tmp) / "data", args.log_level)
        try:
            if not broker.wait_ready(30):
                print("the broker did not become ready", file=sys.stderr)
                return 1
            procs = children(broker.proc.pid)
            roles = list(procs)
            print(f"broker pid {broker.proc.pid}, port {broker.port}: "
                  + ", ".join(f"{r} {p}" for r, p in procs.items()))
            head = ["run", "conn/s", *[f"{r} s/1k" for r in roles], "broker s/1k", "generator s/1k",
                    *[f"{r} waits/1k" for r in roles]]
            rows: list[list[str]] = []
            for run in range(1, args.runs + 1):
                report = Path(tmp) / f"run-{run}.json"
                before = {r: cpu_seconds(p) for r, p in procs.items()}
                waits = {r: wakeups(p) for r, p in procs.items()}
                done = subprocess.run(
                    [args.python, "-m", "loadtests.bench", "--target", f"127.0.0.1:{broker.port}",
                     "--target-pid", str(broker.proc.pid), "--scenario", "connect-rate", "--repeat", "1",
                     "--duration", "2", "--connections", str(args.connections), "--json", str(report)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                after = {r: cpu_seconds(p) for r, p in procs.items()}
                waited = [(wakeups(p) - waits[r]) * 1000 // max(1, args.connections) for r, p in procs.items()]
                m = json.loads(report.read_text())["runs"][0]["runs"][0] if report.exists() else {}
                ok = args.connections - int(m.get("failed", args.connections))
                if done.returncode != 0 or not ok or m.get("failed"):
                    status = 1
                per = 1000 / max(1, ok)
                spent = [(after[r] - before[r]) * per for r in roles]
                rows.append([str(run), f"{m.get('conn/s', 0):,.0f}", *[f"{s:.3f}" for s in spent],
                             f"{sum(spent):.3f}", f"{m.get('_gen_cpu', 0) * per:.3f}", *map(str, waited)])
                time.sleep(1.0)
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
            for r in rows:
                print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
            print(f"broker log lines: {broker.lines}")
        finally:
            broker.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
