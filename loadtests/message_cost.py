"""What a delivered message costs each worker: CPU microseconds per message.

Starts ShardBroker (``serve --port 0 --workers N`` on a fresh data directory, with its
default durability ``fsync`` unless ``--durability`` says otherwise), then runs one bench
scenario against it ``--runs`` times (``loadtests.bench --target ... --target-pid ...
--scenario S --repeat 1``) and reads the user + system CPU time of each worker from
``/proc/PID/stat`` before and after each run. A run's window covers its clients' connects,
subscriptions and the removal of their sessions too, a small part of a run of a few
seconds. CPU per message is what other load on a shared machine disturbs least; msg/s is
printed beside it::

    .venv/bin/python -m loadtests.message_cost                          # persistent-qos1, 3 runs
    .venv/bin/python -m loadtests.message_cost --scenario pairs-qos1 --runs 5

Linux only (``/proc``). Exit status 1 if a run failed or lost a message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.connect_cost import Broker, children, cpu_seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="persistent-qos1",
                    help="a bench scenario whose report counts delivered messages")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of load per run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--durability", default=None, help="the broker's --durability (default: its own)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ShardBroker and the bench")
    args = ap.parse_args(argv)
    status = 0
    with tempfile.TemporaryDirectory(prefix="message-cost-") as tmp:
        extra = ["--durability", args.durability] if args.durability else []
        broker = Broker(args.python, args.workers, Path(tmp) / "data", "warning", extra)
        try:
            if not broker.wait_ready(30):
                print("the broker did not become ready", file=sys.stderr)
                return 1
            procs = {r: p for r, p in children(broker.proc.pid).items() if r.startswith("worker")}
            roles = list(procs)
            print(f"broker pid {broker.proc.pid}, port {broker.port}, {args.scenario}: "
                  + ", ".join(f"{r} {p}" for r, p in procs.items()))
            head = ["run", "delivered", "msg/s", *[f"{r} µs/msg" for r in roles], "workers µs/msg"]
            rows: list[list[str]] = []
            for run in range(1, args.runs + 1):
                report = Path(tmp) / f"run-{run}.json"
                before = {r: cpu_seconds(p) for r, p in procs.items()}
                done = subprocess.run(
                    [args.python, "-m", "loadtests.bench", "--target", f"127.0.0.1:{broker.port}",
                     "--target-pid", str(broker.proc.pid), "--scenario", args.scenario,
                     "--repeat", "1", "--duration", str(args.duration), "--json", str(report)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                after = {r: cpu_seconds(p) for r, p in procs.items()}
                m = json.loads(report.read_text())["runs"][0]["runs"][0] if report.exists() else {}
                delivered = int(m.get("delivered", 0))
                if done.returncode != 0 or not delivered or m.get("lost") or m.get("_verdict"):
                    status = 1
                per = 1e6 / max(1, delivered)
                spent = [(after[r] - before[r]) * per for r in roles]
                rows.append([str(run), f"{delivered:,}", f"{m.get('delivered msg/s', 0):,.0f}",
                             *[f"{s:.1f}" for s in spent], f"{sum(spent):.1f}"])
                time.sleep(1.0)
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
            for r in rows:
                print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        finally:
            broker.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
