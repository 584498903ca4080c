"""A broker node under etcd as a load tool starts it: ``shardbroker serve`` with ``[cluster]``
on ``--port 0``, its log read by a thread (``lines``), the port it took read from its
``listening on`` line, and its acceptor found in ``/proc``. Used by ``cluster_node`` and
``cluster_relay``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


class NodeProcess:
    def __init__(self, base: Path, node_id: str, data: Path, endpoints: list[str], *, ttl: int,
                 workers: int, advertise: str, log_level: str, extra: str = "") -> None:
        """``extra``: more lines of the ``[cluster]`` section (e.g. ``redirect = true``)."""
        config = base / f"{node_id}.toml"
        urls = ", ".join(f'"{u}"' for u in endpoints)
        config.write_text(f'[cluster]\nnode_id = "{node_id}"\netcd_endpoints = [{urls}]\n'
                          f'advertise = "{advertise}"\nlease_ttl = {ttl}\n{extra}')
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardbroker.cli.main", "serve", "--config", str(config),
             "--data-dir", str(data), "--workers", str(workers), "--port", "0",
             "--log-level", log_level], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                found = LISTENING.search(line)
                if found:
                    return int(found.group(1))
            time.sleep(0.01)
        raise RuntimeError("no listening line:\n" + "\n".join(self.lines[-30:]))

    def acceptor_pid(self) -> int:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"acceptor" in cmdline:
                return int(entry.name)
        raise RuntimeError("no acceptor process")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
