"""Three cluster nodes in network namespaces, an etcd member each, clients in a fourth.

``netns_cluster`` (function scope; ``netns_cluster_module``: one per test module) builds, with ``ip`` (iproute2) as root:

* a namespace holding only a bridge, and namespaces ``n1``, ``n2``, ``n3`` and ``cl``
  (clients), each with lo up and a veth to the bridge carrying ``10.213.X.N/24`` (X chosen per
  run; the node namespaces are 1 to 3, the clients' 100). Nothing is added to the host's own
  namespace, so all the traffic stays between those namespaces;
* a three-member etcd cluster, one member in each node namespace (``ip netns exec``), on the
  node's address;
* a broker node in each (``shardbroker serve`` with ``[cluster]``, listening on its address,
  port 1883 in its namespace, and ``advertise`` its bus address, the same address from port
  7100: one port per worker), started by ``start_nodes``.

The test process itself talks to the namespaces through ``inside(ns)``: the calling thread
enters the namespace (``setns``), so the sockets it opens there (raw MQTT clients, the etcd
client of ``shardbroker cluster status``) belong to it for their whole life, and leaves it
again. The clients' namespace is the one used for everything a test does.

A partition is the node's veth taken down on the bridge side (``partition`` / ``heal``):
the kernel here has no netem. Teardown stops the brokers and etcd, kills whatever still runs
in the namespaces, and deletes them (their veths go with them), also when the test failed;
namespaces left by a run that was killed (their names carry its process ID) are removed
before the next one builds its own.

Not root, or no ``ip`` / network namespaces: the tests skip, saying why; under ``CI=true``
they fail instead (``.ci/run`` installs iproute2).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cluster_fixtures import EtcdCluster, Member, etcd_binary
from conftest import Broker

IP = "/usr/sbin/ip"
PREFIX = "sbt"  # namespace names: sbt<pid>x<run>-<role>
BROKER_PORT = 1883
BUS_PORT = 7100  # [cluster] advertise: worker w's bus at BUS_PORT + w
ETCD_CLIENT, ETCD_PEER = 2379, 2380
CLONE_NEWNET = 0x40000000
NODES = ("n1", "n2", "n3")

_libc = ctypes.CDLL(None, use_errno=True)


def _fail_or_skip(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + ": CI runs as root with iproute2 (.ci/run)")
    pytest.skip(message)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=10, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _delete_namespace(name: str) -> None:
    """Kill what runs in ``name`` (this harness started it), then delete it."""
    for _ in range(3):
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    ip("netns", "delete", name, check=False)


def clean_leftovers() -> None:
    """Remove the namespaces of earlier runs whose process is gone (killed mid-test)."""
    pattern = re.compile(rf"^{PREFIX}(\d+)x")
    for name in _namespaces():
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _delete_namespace(name)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``ns`` (sockets opened
    there stay there), then return the thread to the namespace it was in."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(own)


class NetnsBroker(Broker):
    """A broker node started with ``ip netns exec`` and listening on its namespace address."""

    def __init__(self, base_dir: Path, netns: str, host: str, workers: int, config: str,
                 name: str) -> None:
        super().__init__(base_dir, workers=workers, config=config, name=name)
        self.netns = netns
        self.host = host
        self.probe = False  # the harness cannot reach it from here: waits are the tests'

    def _command(self, port: int) -> list[str]:
        cmd = super()._command(BROKER_PORT)
        cmd[cmd.index("--host") + 1] = self.host
        return [IP, "netns", "exec", self.netns, *cmd]


@dataclass
class NetnsCluster:
    """The namespaces, the etcd members and the broker nodes of one test."""

    tag: str  # the namespace name prefix of this run
    subnet: str  # "10.213.X"
    base: Path
    etcd: EtcdCluster  # a member in each node namespace, reached from the clients' one
    members: dict[str, Member] = field(default_factory=dict)
    nodes: dict[str, NetnsBroker] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)  # namespaces made, in order

    # -- names and addresses -------------------------------------------------

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def address(self, role: str) -> str:
        return f"{self.subnet}.{100 if role == 'cl' else NODES.index(role) + 1}"

    @property
    def clients_ns(self) -> str:
        return self.ns("cl")

    @property
    def endpoints(self) -> list[str]:
        return self.etcd.endpoints

    # -- the network -----------------------------------------------------------

    def build_network(self) -> None:
        bridge = self.ns("br")
        ip("netns", "add", bridge)
        self.made.append(bridge)
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        for role in (*NODES, "cl"):
            name = self.ns(role)
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
            # one end in the namespace (eth0), the other on the bridge, named after the role
            ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", role,
               "netns", bridge)
            ip("-n", bridge, "link", "set", role, "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{self.address(role)}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    def partition(self, role: str) -> None:
        """Cut ``role`` off: its link to the bridge goes down (no packet in or out)."""
        ip("-n", self.ns("br"), "link", "set", role, "down")

    def heal(self, role: str) -> None:
        ip("-n", self.ns("br"), "link", "set", role, "up")

    # -- etcd -----------------------------------------------------------------

    def add_member(self, role: str) -> None:
        m = Member(role, ETCD_CLIENT, ETCD_PEER, self.base / f"etcd-{role}",
                   self.base / f"etcd-{role}.log", host=self.address(role),
                   prefix=(IP, "netns", "exec", self.ns(role)))
        self.members[role] = m
        self.etcd.members.append(m)

    def start_etcd(self, role: str) -> None:
        self.etcd.start(self.members[role])

    def kill_etcd(self, role: str) -> None:
        self.etcd.stop(self.members[role], signal.SIGKILL)

    def etcd_healthy(self, role: str) -> bool:
        return self.etcd.healthy(self.members[role])

    def leader(self) -> str:
        """The node namespace whose etcd member leads now (asked of every running member)."""
        return self.etcd.leader().name

    def wait_etcd(self, roles: tuple[str, ...] = NODES, timeout: float = 20.0) -> None:
        self.etcd.wait_healthy([self.members[role] for role in roles], timeout)

    # -- broker nodes ------------------------------------------------------------

    def node_config(self, role: str, ttl: int) -> str:
        endpoints = ", ".join(f'"{url}"' for url in self.endpoints)
        return (f'[cluster]\nnode_id = "{role}"\netcd_endpoints = [{endpoints}]\n'
                f'advertise = "{self.address(role)}:{BUS_PORT}"\nlease_ttl = {ttl}\n')

    def start_nodes(self, workers: dict[str, int], ttl: int = 2) -> None:
        """A broker node in each node namespace with ``workers[role]`` workers, started one
        after the other (each logs ready once its children run; serving waits for etcd and
        the map, which the tests wait for)."""
        for role in NODES:
            b = NetnsBroker(self.base / role, self.ns(role), self.address(role), workers[role],
                            self.node_config(role, ttl), role)
            self.nodes[role] = b
        for b in self.nodes.values():
            b.start(port=BROKER_PORT)

    def close(self) -> None:
        for b in self.nodes.values():
            with contextlib.suppress(Exception):
                b.cleanup()
        for role in list(self.members):
            with contextlib.suppress(Exception):
                self.kill_etcd(role)
        for name in reversed(self.made):
            _delete_namespace(name)


def _usable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.access(IP, os.X_OK):
        return f"no {IP} (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}xprobe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


_runs = 0


@contextlib.contextmanager
def built_cluster(base: Path) -> Iterator[NetnsCluster]:
    """The namespaces and a healthy three-member etcd under ``base`` (no broker node yet),
    taken down again when the block ends, also on failure."""
    global _runs
    why = _usable()
    if why is not None:
        _fail_or_skip(why)
    binary = etcd_binary()
    clean_leftovers()
    _runs += 1
    tag = f"{PREFIX}{os.getpid()}x{_runs}"
    subnet = f"10.213.{(os.getpid() + _runs) % 250 + 1}"
    cluster = NetnsCluster(tag, subnet, base, EtcdCluster(binary, token=tag))
    cluster.etcd.reach = lambda: inside(cluster.clients_ns)
    try:
        cluster.build_network()
        for role in NODES:
            cluster.add_member(role)
        for role in NODES:
            cluster.start_etcd(role)
        cluster.wait_etcd()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[NetnsCluster]:
    with built_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def netns_cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    """One cluster for every test of a module (a start costs tens of seconds)."""
    with built_cluster(tmp_path_factory.mktemp("netns")) as cluster:
        yield cluster


def bounded(pred: Callable[[], object], timeout: float, message: str,
            interval: float = 0.1) -> float:
    """Wait until ``pred()`` is true, at most ``timeout`` seconds; return the seconds taken."""
    start = time.monotonic()
    while True:
        try:
            if pred():
                return time.monotonic() - start
        except (OSError, AssertionError):
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{message}: not within {timeout}s")
        time.sleep(interval)
