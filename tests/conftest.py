"""Fixtures for black-box tests: a real broker process, raw and paho clients.

The broker is started as ``python -m shardbroker.cli.main serve --host 127.0.0.1 --port 0 ...`` in
its own process group; its stderr/stdout are drained by a thread into ``Broker.lines``.
Start-up waits for the log line ``listening on HOST:PORT`` then a line containing
``ready``, then probes every shard with a real CONNECT/CONNACK.

Fixtures
    broker             the module's shared 1-worker broker (checked alive around each test)
    broker4            the module's shared 4-worker broker
    make_broker        factory, function scope: make_broker(workers=1, config="") -> Broker
    make_module_broker the same factory with module scope (for module-level fixtures)
    mqtt               factory of connected RawClients, closed at teardown:
                       mqtt(broker, client_id, version=4, **connect_kw) -> RawClient
                       (``.connack`` holds the CONNACK); mqtt.raw(broker) -> unconnected socket
    paho               factory of paho clients: paho(broker, client_id, version=4, ...) -> PahoClient
    uniq               unique names: uniq.cid(tag) (<= 23 alnum chars), uniq.topic(tag)
    etcd_single, etcd_three  a real etcd of one or three members (tests/cluster_fixtures.py)

Plain helpers (import from ``conftest``): Broker, client_id_on_shard, wait_until,
skip_unless_shardbroker, CONFIG_* snippets.

Setting ``MQTT_TEST_BROKER=mosquitto`` runs the same tests against /usr/sbin/mosquitto,
to check the tests themselves; ShardBroker-only tests skip there.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mqttbytes as mb
from cluster_fixtures import etcd_single, etcd_three  # noqa: F401  (fixtures: a real etcd)

REPO = Path(__file__).resolve().parents[1]
TARGET = os.environ.get("MQTT_TEST_BROKER", "shardbroker")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

LISTENING_RE = re.compile(r"listening on [^:\s]+:(\d+)")
READY_RE = re.compile(r"\bready\b", re.IGNORECASE)
WORKER_RE = re.compile(r"worker[^0-9]*(\d+)")

# Config snippets (TOML). Limits live in [limits]; kept here so one edit fixes all tests.
CONFIG_CONNECT_TIMEOUT_1 = "[limits]\nconnect_timeout = 1\n"
CONFIG_MAX_PACKET_2048 = "[limits]\nmax_packet_size = 2048\n"
CONFIG_MAX_KEEPALIVE_10 = "[limits]\nmax_keepalive = 10\n"
CONFIG_SMALL_LIMITS = "[limits]\nmax_packet_size = 2048\nmax_keepalive = 10\n"
# A store that fills at 1 MiB, with session queues that never limit first (a full store).
CONFIG_STORE_1_MIB = """
[storage]
map_size = 1048576
max_map_size = 1048576
[limits]
max_queued_messages = 100000
max_queued_bytes = 1099511627776
"""


def skip_unless_shardbroker(reason: str = "ShardBroker-specific") -> None:
    if TARGET != "shardbroker":
        pytest.skip(f"{reason} (running against {TARGET})")


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def client_id_on_shard(prefix: str, shard: int, shards: int) -> str:
    """A client id starting with ``prefix`` that ShardBroker places on ``shard``."""
    from shardbroker.sharding import shard_for

    for i in range(100_000):
        cid = f"{prefix}{i}"
        if shard_for(cid, shards) == shard:
            return cid
    raise AssertionError(f"no client id with prefix {prefix!r} on shard {shard}/{shards}")


def shard_of(client_id: str, shards: int) -> int:
    from shardbroker.sharding import shard_for

    return shard_for(client_id, shards)


# ---------------------------------------------------------------------------
# /proc helpers (stdlib only)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return rest[0], int(rest[1])


def _all_procs() -> dict[int, tuple[str, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _cmdline(pid: int) -> str:
    parts = []
    for fname in ("cmdline", "comm"):
        try:
            with open(f"/proc/{pid}/{fname}", "rb") as f:
                parts.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip())
        except OSError:
            pass
    return " ".join(parts)


def pid_alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# The broker process

_BROKERS: list[Broker] = []


class BrokerStartError(RuntimeError):
    pass


class Broker:
    """One broker process (supervisor) with its children, in its own process group."""

    def __init__(self, base_dir: Path, workers: int = 1, config: str = "",
                 name: str = "broker") -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.config = config
        self.name = name
        self.config_path: Path | None = None
        if config:
            self.config_path = self.base_dir / "broker.toml"
            self.config_path.write_text(config)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self._seen_pids: set[int] = set()
        self.starts = 0
        # start() waits until a client of each worker is accepted; a cluster node that serves
        # only some virtual shards sets this False and waits for what it needs itself
        self.probe = True
        _BROKERS.append(self)

    # -- lifecycle ------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self, port: int) -> list[str]:
        if TARGET == "mosquitto":
            return self._mosquitto_command(port)
        cmd = [sys.executable, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(self.workers),
               "--data-dir", str(self.data_dir), "--log-level", "debug"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _mosquitto_command(self, port: int) -> list[str]:
        import tomllib

        if port == 0:
            port = _free_port()
        cfg = tomllib.loads(self.config) if self.config else {}
        limits = cfg.get("limits", {})
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true",
                 f"persistence_location {self.data_dir}/", "log_dest stderr", "log_type all",
                 "max_inflight_messages 20"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to a user that cannot write data_dir
        if "max_packet_size" in limits:
            lines.append(f"max_packet_size {limits['max_packet_size']}")
        if "max_keepalive" in limits:
            lines.append(f"max_keepalive {limits['max_keepalive']}")
        path = self.base_dir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        self._mosquitto_port = port
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(path)]

    def start(self, port: int | None = None, timeout: float = READY_TIMEOUT) -> Broker:
        """Start (or start again) and wait until every shard accepts clients."""
        assert not self.alive(), "already running"
        want = self.port if port is None else port
        try:
            self._spawn(want, timeout)
        except BrokerStartError:
            if want == 0:
                raise
            # The old port may still be busy; any port will do.
            self._kill_group()
            self._spawn(0, timeout)
        return self

    def _spawn(self, port: int, timeout: float) -> None:
        self._ready.clear()
        self._listening.clear()
        self.starts += 1
        self._log(f"--- test harness: starting {self.name} (start #{self.starts}, port {port}) ---")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self._command(port), cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._reader.start()
        if TARGET == "mosquitto":
            self.port = self._mosquitto_port
            self._listening.set()
            self._ready.set()
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise BrokerStartError(
                    f"{self.name} exited with {self.proc.returncode} before ready:\n"
                    + self.tail(60))
            if time.monotonic() > deadline:
                self._kill_group()
                raise BrokerStartError(f"{self.name} not ready within {timeout}s:\n" + self.tail(60))
            self._ready.wait(0.05)
        if self.probe:
            self._probe(deadline)
        self._remember_pids()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._log(line)
            if not self._listening.is_set():
                m = LISTENING_RE.search(line)
                if m:
                    self.port = int(m.group(1))
                    self._listening.set()
            if self._listening.is_set() and READY_RE.search(line):
                self._ready.set()
        proc.stdout.close()

    def _log(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def _probe(self, deadline: float) -> None:
        """CONNECT to every shard until each answers CONNACK 0."""
        todo = list(range(self.workers))
        last_err: Exception | None = None
        while todo:
            shard = todo[0]
            cid = (client_id_on_shard("probe", shard, self.workers)
                   if TARGET == "shardbroker" else f"probe{shard}")
            try:
                c = mb.RawClient(port=self.port, connect_timeout=2)
                try:
                    ack = c.connect_mqtt(cid, version=4, clean=True, timeout=3)
                    if ack.rc in (0, 4, 5):  # 4, 5: a broker that wants credentials answered too
                        if ack.rc == 0:
                            c.disconnect()
                        todo.pop(0)
                        continue
                    last_err = AssertionError(f"CONNACK rc {ack.rc}")
                finally:
                    c.close()
            except (OSError, AssertionError, mb.MalformedError) as e:
                last_err = e
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerStartError(f"{self.name} died during probe:\n" + self.tail(60))
            if time.monotonic() > deadline:
                self._kill_group()
                raise BrokerStartError(
                    f"{self.name} logged ready but shard {shard} does not accept clients "
                    f"({last_err!r}):\n" + self.tail(60))
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole group. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._remember_pids()
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._log(f"--- test harness: {self.name} ignored SIGTERM for {timeout}s; SIGKILL ---")
                self._kill_group()
        self._wait_children_gone(timeout=3)
        self._join_reader()
        return self.proc.returncode

    def kill9(self) -> None:
        """kill -9 every process of the broker at once (a crash of the whole broker).

        The signal goes out first, before any bookkeeping, so that "kill -9 right after
        an acknowledgement" really is immediate."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._kill_group()  # stragglers that left the process group, reaping
        self._join_reader()

    def restart(self, timeout: float = READY_TIMEOUT) -> Broker:
        """Stop if running, then start again on the same data dir and, if possible, port."""
        if self.alive():
            self.stop()
        return self.start(port=self.port, timeout=timeout)

    def cleanup(self) -> None:
        """Leave nothing running, whatever state the broker is in."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.stop(timeout=5)
        self._kill_group()
        self._join_reader()

    def _kill_group(self) -> None:
        assert self.proc is not None
        self._remember_pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in list(self._seen_pids):
            if pid != self.proc.pid and pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._wait_children_gone(timeout=3)

    def _wait_children_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(pid_alive(p) for p in self._seen_pids if self.proc and p != self.proc.pid):
                return
            time.sleep(0.05)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(3)

    def _remember_pids(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._seen_pids.update(self.descendant_pids())

    # -- processes ------------------------------------------------------------

    def child_pids(self) -> list[int]:
        """Live direct children of the supervisor."""
        if not self.alive():
            return []
        return sorted(p for p, (state, ppid) in _all_procs().items()
                      if ppid == self.pid and state not in ("Z", "X"))

    def descendant_pids(self) -> list[int]:
        """Live children, grandchildren, ... of the supervisor."""
        if not self.alive():
            return []
        table = _all_procs()
        out: list[int] = []
        frontier = [self.pid]
        while frontier:
            parent = frontier.pop()
            for p, (state, ppid) in table.items():
                if ppid == parent and state not in ("Z", "X"):
                    out.append(p)
                    frontier.append(p)
        return sorted(out)

    def worker_pids(self) -> dict[int, int]:
        """shard index -> pid, from the descendants whose command line names a worker."""
        out: dict[int, int] = {}
        for pid in self.descendant_pids():
            m = WORKER_RE.search(_cmdline(pid))
            if m:
                out[int(m.group(1))] = pid
        return out

    # -- logs -----------------------------------------------------------------

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def log_len(self) -> int:
        with self._lock:
            return len(self.lines)

    def tail(self, n: int = 100, since: int = 0) -> str:
        with self._lock:
            lines = self.lines[since:]
        return "\n".join(lines[-n:])

    def wait_for_log(self, pattern: str, timeout: float = 5.0, since: int = 0) -> str:
        rx = re.compile(pattern)

        def find() -> str | None:
            with self._lock:
                for line in self.lines[since:]:
                    if rx.search(line):
                        return line
            return None

        return wait_until(find, timeout, message=f"log line matching {pattern!r}")

    def __repr__(self) -> str:
        return f"<Broker {self.name} port={self.port} workers={self.workers} pid={self.proc and self.proc.pid}>"


# ---------------------------------------------------------------------------
# Reporting: attach the broker log of the failing test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_MARKS] = {id(b): b.log_len() for b in _BROKERS}


_MARKS = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        marks = item.stash.get(_MARKS, {})
        for b in _BROKERS:
            since = marks.get(id(b), 0)
            if b.log_len() > since:
                status = "running" if b.alive() else f"exited {b.returncode}"
                rep.sections.append((f"{b.name} log (port {b.port}, {status}; last 150 lines)",
                                     b.tail(150, since)))


# ---------------------------------------------------------------------------
# Broker fixtures


def _factory(tmp_path_factory: pytest.TempPathFactory, created: list[Broker]):
    def make(workers: int = 1, config: str = "", name: str | None = None,
             start: bool = True, probe: bool = True) -> Broker:
        base = tmp_path_factory.mktemp(name or f"broker{workers}w")
        b = Broker(base, workers=workers, config=config,
                   name=name or f"broker({workers}w{', cfg' if config else ''})")
        b.probe = probe
        created.append(b)
        if start:
            try:
                b.start()
            except BrokerStartError as e:
                pytest.fail(str(e), pytrace=False)
        return b

    return make


@pytest.fixture
def make_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    created: list[Broker] = []
    try:
        yield _factory(tmp_path_factory, created)
    finally:
        for b in created:
            b.cleanup()


@pytest.fixture(scope="module")
def make_module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    created: list[Broker] = []
    try:
        yield _factory(tmp_path_factory, created)
    finally:
        for b in created:
            b.cleanup()


def _checked(b: Broker) -> Iterator[Broker]:
    """Yield a shared broker; restart it first if an earlier test killed it, and fail
    this test (at teardown) if the broker died during it."""
    if not b.alive():
        b._log("--- test harness: shared broker was dead; restarting ---")
        try:
            b.restart()
        except BrokerStartError as e:
            pytest.fail(str(e), pytrace=False)
    yield b
    if not b.alive():
        pytest.fail(f"{b.name} died during this test (exit {b.returncode}):\n{b.tail(80)}",
                    pytrace=False)


@pytest.fixture(scope="module")
def _broker1_module(make_module_broker: Callable[..., Broker]) -> Broker:
    return make_module_broker(workers=1, name="broker")


@pytest.fixture(scope="module")
def _broker4_module(make_module_broker: Callable[..., Broker]) -> Broker:
    return make_module_broker(workers=4, name="broker4")


@pytest.fixture
def broker(_broker1_module: Broker) -> Iterator[Broker]:
    yield from _checked(_broker1_module)


@pytest.fixture
def broker4(_broker4_module: Broker) -> Iterator[Broker]:
    yield from _checked(_broker4_module)


# ---------------------------------------------------------------------------
# Client fixtures


class Uniq:
    """Unique client ids and topics, so tests can share a broker."""

    def __init__(self, test_name: str) -> None:
        self.base = re.sub(r"[^A-Za-z0-9]", "", test_name.replace("test_", ""))[:24] or "t"
        self.n = 0

    def cid(self, tag: str = "c") -> str:
        self.n += 1
        tag = re.sub(r"[^A-Za-z0-9]", "", tag)[:6]
        return f"{tag}{self.n}x{secrets.token_hex(5)}"[:23]

    def topic(self, tag: str = "") -> str:
        self.n += 1
        return f"t/{self.base}/{secrets.token_hex(4)}{('/' + tag) if tag else ''}"

    def prefix(self, tag: str = "p") -> str:
        return f"{re.sub(r'[^A-Za-z0-9]', '', tag)[:6]}{secrets.token_hex(3)}x"


@pytest.fixture
def uniq(request: pytest.FixtureRequest) -> Uniq:
    return Uniq(request.node.name)


def _port(target: Broker | int) -> int:
    return target if isinstance(target, int) else target.port


class Clients:
    """mqtt(broker, client_id, version=4, **connect_kw) -> connected RawClient."""

    def __init__(self) -> None:
        self.all: list[mb.RawClient] = []

    def raw(self, target: Broker | int) -> mb.RawClient:
        c = mb.RawClient(port=_port(target))
        self.all.append(c)
        return c

    def __call__(self, target: Broker | int, client_id: str, version: int = 4,
                 expect_rc: int | None = 0, **kw: Any) -> mb.RawClient:
        c = self.raw(target)
        c.connack = c.connect_mqtt(client_id, version=version, **kw)  # type: ignore[attr-defined]
        if expect_rc is not None:
            assert c.connack.rc == expect_rc, (  # type: ignore[attr-defined]
                f"CONNACK for {client_id!r} v{version}: {c.connack}")  # type: ignore[attr-defined]
        return c

    def close_all(self) -> None:
        for c in self.all:
            c.close()


@pytest.fixture
def mqtt() -> Iterator[Clients]:
    clients = Clients()
    yield clients
    clients.close_all()


class PahoClient:
    """A paho-mqtt 2.x client on a background loop, with blocking helpers."""

    def __init__(self, port: int, client_id: str, version: int = 4, clean: bool = True,
                 connect_props: Any = None, keepalive: int = 30) -> None:
        import paho.mqtt.client as pm
        from paho.mqtt.enums import CallbackAPIVersion

        self.pm = pm
        self.version = version
        protocol = {3: pm.MQTTv31, 4: pm.MQTTv311, 5: pm.MQTTv5}[version]
        kwargs: dict[str, Any] = {}
        if version != 5:
            kwargs["clean_session"] = clean
        self.c = pm.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                           client_id=client_id, protocol=protocol, **kwargs)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.connected = threading.Event()
        self.connect_rc: Any = None
        self.session_present: bool | None = None
        self._subacks: dict[int, Any] = {}
        self._suback_cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        if version == 5:
            self.c.connect("127.0.0.1", port, keepalive=keepalive, clean_start=clean,
                           properties=connect_props)
        else:
            self.c.connect("127.0.0.1", port, keepalive=keepalive)
        self.c.loop_start()  # after connect(): else the loop idles up to 1 s first
        if not self.connected.wait(5):
            self.close()
            raise AssertionError(f"paho {client_id} v{version}: no CONNACK in 5 s")
        rc = self.connect_rc
        if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
            self.close()
            raise AssertionError(f"paho {client_id}: connect refused {rc}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connect_rc = rc
        self.session_present = bool(getattr(flags, "session_present", False))
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages.put(msg)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with self._suback_cv:
            self._subacks[mid] = rcs
            self._suback_cv.notify_all()

    def subscribe(self, topic: str, qos: int = 0, timeout: float = 5.0, **kw: Any) -> Any:
        if self.version == 5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            result, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **kw))
        else:
            result, mid = self.c.subscribe(topic, qos)
        assert result == 0, f"paho subscribe failed: {result}"
        with self._suback_cv:
            ok = self._suback_cv.wait_for(lambda: mid in self._subacks, timeout)
        assert ok, f"no SUBACK for {topic} in {timeout}s"
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Any = None, timeout: float = 5.0) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"paho publish to {topic} qos {qos} not completed in {timeout}s"

    def get(self, timeout: float = 5.0) -> Any:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"paho: no message within {timeout}s") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone is fine
            self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def paho() -> Iterator[Callable[..., PahoClient]]:
    made: list[PahoClient] = []

    def make(target: Broker | int, client_id: str, version: int = 4, **kw: Any) -> PahoClient:
        c = PahoClient(_port(target), client_id, version=version, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------------------
# Assertion helpers shared by the test modules


def reconnect(target: Broker | int, client_id: str, version: int = 4, timeout: float = 20.0,
              **kw: Any) -> mb.RawClient:
    """Connect ``client_id`` until the broker accepts it (a cluster node refuses it, "server
    unavailable", while its virtual shard is not served there yet); ``kw`` go to CONNECT (e.g.
    ``clean=False``). The connected client, its CONNACK in ``.connack``."""
    out: list[mb.RawClient] = []

    def accepted() -> bool:
        c = mb.RawClient(port=_port(target), connect_timeout=2)
        try:
            ack = c.connect_mqtt(client_id, version=version, **kw)
        except (OSError, mb.ConnectionClosed, mb.Timeout):
            c.close()
            return False
        if ack.rc != 0:
            c.close()
            return False
        c.connack = ack  # type: ignore[attr-defined]
        out.append(c)
        return True

    wait_until(accepted, timeout=timeout, message=f"{client_id} accepted")
    return out[0]


def assert_disconnected(c: mb.RawClient, version: int, reasons: set[int] | None = None,
                        timeout: float = 3.0, require_disconnect: bool | None = None) -> int | None:
    """The server must close ``c`` within ``timeout``.

    3.1/3.1.1: plain close (a server never sends DISCONNECT there).
    5.0: a DISCONNECT whose reason is in ``reasons`` comes first (DESIGN: "DISCONNECT with
    a reason code in v5"), unless ``require_disconnect`` is False (the spec only says MAY;
    by default it is required of ShardBroker only). Returns that reason."""
    if require_disconnect is None:
        require_disconnect = TARGET == "shardbroker"
    closed = c.expect_closed(timeout)
    got = [mb.describe(p) for p in c.before_close]
    assert closed, f"server did not close the connection within {timeout}s (received {got})"
    discs = [p for p in c.before_close if p[0] == mb.DISCONNECT]
    if version != 5:
        assert not discs, f"a 3.1.1 server must not send DISCONNECT, got {got}"
        return None
    if not discs:
        assert not require_disconnect, f"5.0: expected DISCONNECT {sorted(map(hex, reasons or []))} before close, got {got}"
        return None
    assert c.before_close[-1][0] == mb.DISCONNECT, f"DISCONNECT must be the last packet: {got}"
    reason = mb.parse_disconnect(discs[-1][2], 5).reason
    if reasons is not None:
        assert reason in reasons, (
            f"DISCONNECT reason 0x{reason:02X} not in {[hex(r) for r in sorted(reasons)]}")
    return reason


def collect_until(sub: mb.RawClient, payload: bytes, timeout: float = 5.0,
                  ack: bool = True) -> list[mb.Publish]:
    """Read PUBLISHes until one with ``payload`` arrives (a sentinel); return those before it."""
    deadline = time.monotonic() + timeout
    seen: list[mb.Publish] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"sentinel {payload!r} not received in {timeout}s; got {seen}")
        msg = sub.recv_publish(left, ack)
        if msg.payload == payload:
            return seen
        seen.append(msg)


def assert_no_publish(sub: mb.RawClient, timeout: float = 0.4, topic: str | None = None) -> None:
    """Nothing (or nothing on ``topic``) arrives within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        pkt = sub.recv_packet(left)
        if pkt is None:
            return
        if pkt[0] == mb.PUBLISH and topic is not None:
            msg = mb.parse_publish(pkt[1], pkt[2], sub.version)
            if msg.topic != topic:
                if msg.qos == 1 and msg.pid is not None:
                    sub.try_send(mb.puback(msg.pid, sub.version))
                continue
        raise AssertionError(f"expected nothing, got {mb.describe(pkt)}")


def check_bystanders(target: Broker | int, clients: Clients, uniq: Uniq, version: int = 4) -> None:
    """A fresh subscriber and publisher still work (QoS 1 round trip)."""
    topic = uniq.topic("bystander")
    sub = clients(target, uniq.cid("bys"), version=version)
    sub.subscribe(topic, 1)
    pub = clients(target, uniq.cid("byp"), version=version)
    pub.publish(topic, b"still-alive", qos=1)
    msg = sub.recv_publish(5)
    assert (msg.topic, msg.payload) == (topic, b"still-alive")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate (CN alice) and
    one from another CA (``tests/certs.py``); skipped without ``cryptography``."""
    pytest.importorskip("cryptography")
    from certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def _only_shardbroker() -> None:
    skip_unless_shardbroker("ShardBroker's own listener and security configuration")
