"""Real etcd for the cluster tests: one member, or a cluster of three, on loopback ports.

``etcd_single`` and ``etcd_three`` (function scope) start ``/usr/bin/etcd`` (Debian's
``etcd-server``; ``ETCD_BIN`` overrides it) with its data in ``tmp_path``, wait until every
member answers ``/health``, and stop the members at teardown. Elections are made fast
(heartbeat 50 ms, election timeout 500 ms) so that a stopped leader is replaced quickly.

Without etcd the tests skip, saying why; under ``CI=true`` they fail instead, since CI
(``.ci/run``) installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD_BIN = os.environ.get("ETCD_BIN", "/usr/bin/etcd")
START_TIMEOUT = 20.0


def etcd_binary() -> str:
    """The etcd binary; skip (or, in CI, fail) when there is none."""
    path = ETCD_BIN if os.access(ETCD_BIN, os.X_OK) else shutil.which("etcd")
    if path is None:
        message = f"etcd not installed ({ETCD_BIN}; apt-get install etcd-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must install it (.ci/run)")
        pytest.skip(message)
    return path


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (``ip_local_port_range``)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bus_address(workers: int = 4, host: str = "127.0.0.1") -> str:
    """A ``[cluster] advertise`` for a node on this host: ``HOST:PORT`` with the bus ports
    PORT..PORT+workers-1 (one per worker) free now. They are taken below the kernel's ephemeral
    range, so apart from every MQTT listener (whose ports the kernel picks from that range) and
    from the client ends of connections in TIME_WAIT, which a test that opened thousands of
    connections leaves there for a minute (a bind to such a port fails)."""
    import random

    top = _ephemeral_low() - workers
    for _ in range(200):
        port = random.randrange(10000, top)
        socks = [socket.socket() for _ in range(workers)]
        try:
            for i, s in enumerate(socks):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
                s.bind((host, port + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return f"{host}:{port}"
    raise RuntimeError(f"no {workers} free ports in a row on {host}")


@dataclass
class Member:
    """One etcd member: its name, ports and files; ``host`` its address, and ``prefix`` what
    its command runs under (``ip netns exec NS`` for a member in a network namespace)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """Members of one etcd cluster; ``endpoints`` are their client URLs."""

    binary: str
    members: list[Member] = field(default_factory=list)
    state: str = "new"
    token: str = "shardbroker-test"
    # where this process reaches the members from (a network namespace's ``inside``)
    reach: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            *m.prefix, self.binary, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", self.state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            # a member that comes back from a partition does not start an election (and so
            # does not cost the others their leader and the nodes their leases): the default
            # from etcd 3.5, off in Debian's 3.4; docs/CLUSTERING.md recommends it
            "--pre-vote",
            "--logger", "zap", "--log-level", "warn",
        ]

    def start(self, m: Member) -> None:
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(self._argv(m), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)

    def stop(self, m: Member, sig: int = signal.SIGTERM) -> None:
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(sig)
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        m.proc = None

    def leader(self) -> Member:
        """The member that leads now (asked of every running member)."""
        ids: dict[str, Member] = {}
        leader = ""
        with self.reach():
            for m in self.members:
                if m.proc is None:
                    continue
                request = urllib.request.Request(m.url + "/v3/maintenance/status", data=b"{}",
                                                 method="POST")
                with urllib.request.urlopen(request, timeout=2) as resp:
                    doc = json.loads(resp.read())
                ids[doc["header"]["member_id"]] = m
                leader = doc.get("leader", leader)
        return ids[leader]

    def healthy(self, m: Member) -> bool:
        try:
            with self.reach(), urllib.request.urlopen(m.url + "/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: list[Member] | None = None,
                     timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while not self.healthy(m):
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy after {timeout}s: "
                                       f"{m.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def close(self) -> None:
        for m in self.members:
            self.stop(m, signal.SIGKILL)


def single_etcd(base: Path) -> EtcdCluster:
    """One etcd member under ``base``, started and answering (the load tools' etcd); the
    caller closes it."""
    cluster = EtcdCluster(etcd_binary())
    client_port, peer_port = _free_ports(2)
    cluster.members.append(Member("m0", client_port, peer_port, base / "etcd", base / "etcd.log"))
    try:
        cluster.start(cluster.members[0])
        cluster.wait_healthy()
    except BaseException:
        cluster.close()
        raise
    return cluster


def _cluster(tmp_path: Path, size: int) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(etcd_binary())
    ports = _free_ports(2 * size)
    for i in range(size):
        cluster.members.append(Member(f"m{i}", ports[2 * i], ports[2 * i + 1],
                                      tmp_path / f"etcd-m{i}", tmp_path / f"etcd-m{i}.log"))
    try:
        for m in cluster.members:
            cluster.start(m)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd_single(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from _cluster(tmp_path, 1)


@pytest.fixture
def etcd_three(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from _cluster(tmp_path, 3)
