"""28: hostile clients against the real broker (TCP, TLS and WebSocket listeners), each while a
bystander on another topic makes QoS 1 round trips: afterwards the broker is up, the
bystander was served on time throughout, and a persistent session's queued messages are
all still there."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Self

import mqttbytes as mb
import pytest
from conftest import client_id_on_shard

pytestmark = pytest.mark.usefixtures("_only_shardbroker")

BYSTANDER_BOUND = 0.5  # seconds: a generous bound on one round trip (the figure itself is the bench's)


@pytest.fixture(scope="module")
def target(make_module_broker, pki):
    config = f"""
[limits]
connect_timeout = 1.0

[[listener]]
port = 0

[[listener]]
type = "mqtts"
port = 0
certfile = "{pki['crt']}"
keyfile = "{pki['key']}"

[[listener]]
type = "ws"
port = 0
"""
    b = make_module_broker(workers=2, config=config)
    import re

    ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", b.log_text())]
    b.tls_port, b.ws_port = ports[1], ports[2]
    return b


class Bystander:
    """QoS 1 round trips on a topic of its own, in a thread, timing each one."""

    def __init__(self, broker, uniq, cid: str | None = None) -> None:
        self.client = mb.RawClient(port=broker.port)
        self.client.connect_mqtt(cid or uniq.cid("by"), version=5)
        self.topic = uniq.topic("bystander")
        self.client.subscribe(self.topic, 1)
        self.worst = 0.0
        self.trips = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.client.publish(self.topic, b"%d" % self.trips, qos=1)
                assert self.client.recv_publish(timeout=5).payload == b"%d" % self.trips
                self.worst = max(self.worst, time.monotonic() - t0)
                self.trips += 1
                time.sleep(0.01)
        except (AssertionError, OSError, mb.MalformedError) as exc:  # check() reports it
            self.error = exc

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def check(self) -> None:
        assert self.error is None, f"the bystander failed: {self.error!r}"
        assert self.trips >= 5, f"only {self.trips} round trips"
        assert self.worst < BYSTANDER_BOUND, f"a bystander round trip took {self.worst * 1000:.0f} ms"


def _attack(target, uniq, attack: Callable[[], None], bystander: str | None = None) -> None:
    """Queue messages for a persistent session, run ``attack`` beside a bystander (client ID
    ``bystander``, or one of its own), then check."""
    scid = uniq.cid("keep")
    topic = uniq.topic("kept")
    s = mb.RawClient(port=target.port)
    s.connect_mqtt(scid, clean=False)
    s.subscribe(topic, 1)
    s.disconnect()
    p = mb.RawClient(port=target.port)
    p.connect_mqtt(uniq.cid("kp"))
    for i in range(20):
        p.publish(topic, b"%d" % i, qos=1)
    p.close()
    with Bystander(target, uniq, bystander) as by:
        time.sleep(0.1)
        attack()
        time.sleep(0.2)
    by.check()
    assert target.alive()
    back = mb.RawClient(port=target.port)
    assert back.connect_mqtt(scid, clean=False).session_present
    assert [m.payload for m in back.recv_publishes(20)] == [b"%d" % i for i in range(20)]
    back.disconnect()


def _sockets(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_byte_by_byte_connect_and_publish(target, uniq):
    def attack() -> None:
        c = mb.RawClient(port=target.port)
        data = mb.connect(uniq.cid("slow"), version=5) + mb.publish("slow/t", b"x" * 50, qos=1, pid=1, version=5)
        for i in range(len(data)):
            c.send(data[i:i + 1])
            time.sleep(0.002)
        assert c.recv_packet(5)[0] == mb.CONNACK
        assert c.recv_packet(5)[0] == mb.PUBACK
        c.close()

    _attack(target, uniq, attack)


def test_connections_that_never_send_connect(target, uniq):
    def attack() -> None:
        socks = _sockets(target.port, 200) + _sockets(target.tls_port, 50) + _sockets(target.ws_port, 50)
        time.sleep(1.6)  # past the connect deadline: all of them closed by the broker
        for s in socks:
            s.settimeout(2)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
            s.close()

    _attack(target, uniq, attack)


def test_remaining_lengths_that_claim_256_mb(target, uniq):
    def attack() -> None:
        for version in (4, 5):
            c = mb.RawClient(port=target.port)
            c.connect_mqtt(uniq.cid("big"), version=version)
            c.send(b"\x30\xff\xff\xff\x7f" + b"x" * 1000)  # PUBLISH of 268,435,455 bytes
            with pytest.raises((mb.ConnectionClosed, OSError)):
                while True:
                    if c.recv_packet(3) is None:
                        raise AssertionError("the broker waited for 256 MB")
            c.close()

    _attack(target, uniq, attack)


def test_invalid_utf8_and_duplicated_properties(target, uniq):
    def attack() -> None:
        bad = [
            mb.connect(b"\xff\xfe bad id", version=4),
            mb.connect(uniq.cid("dup"), version=5, props=b"\x11\x00\x00\x00\x0a\x11\x00\x00\x00\x0a"),
        ]
        for data in bad:
            c = mb.RawClient(port=target.port)
            c.send(data)
            _refused_and_closed(c)
        c = mb.RawClient(port=target.port)
        c.connect_mqtt(uniq.cid("utf"), version=4)
        c.send(mb.publish(b"bad/\xc0\xaf", b"x", qos=0))  # an overlong encoding of '/'
        with pytest.raises((mb.ConnectionClosed, OSError)):
            while c.recv_packet(3) is not None:
                pass
        c.close()

    _attack(target, uniq, attack)


def _refused_and_closed(c: mb.RawClient) -> None:
    """The broker closes the connection, without accepting it first."""
    with pytest.raises((mb.ConnectionClosed, OSError)):
        while True:
            pkt = c.recv_packet(3)
            assert pkt is not None, "the broker neither answered nor closed"
            assert pkt[0] != mb.CONNACK or pkt[2][1] != 0, "accepted"
    c.close()


def test_a_takeover_loop(target, uniq):
    cid = client_id_on_shard(uniq.prefix("loop"), 0, 2)

    def attack() -> None:
        clients = []
        for _ in range(60):
            c = mb.RawClient(port=target.port)
            c.connect_mqtt(cid, version=4)
            clients.append(c)
        for c in clients:
            c.close()

    _attack(target, uniq, attack)


def test_a_flood_to_a_client_that_never_reads(target, uniq):
    def attack() -> None:
        stuck = mb.RawClient(port=target.port)
        stuck.connect_mqtt(uniq.cid("stk"))
        stuck.subscribe("flood/#", 0)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads again
        p = mb.RawClient(port=target.port)
        p.connect_mqtt(uniq.cid("fl"))
        payload = b"f" * 1000
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            p.send(b"".join(mb.publish("flood/x", payload) for _ in range(100)))
        p.close()
        stuck.close()

    _attack(target, uniq, attack)


def _ws_socket(port: int) -> socket.socket:
    """A WebSocket connection made by hand (upgrade done), on which the test decides when to read."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    head = b""
    s.settimeout(5)
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "the upgrade was refused"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _ws_frame(data: bytes) -> bytes:
    """One masked binary frame (a client's, RFC 6455 5.2), mask 0."""
    n = len(data)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return b"\x82" + size + b"\0\0\0\0" + data


@pytest.mark.parametrize("kind", ["tls", "ws"])
def test_a_flood_to_a_relayed_client_that_never_reads(target, pki, uniq, kind):
    """A TLS or WebSocket subscriber that stops reading under a flood: the relay in the acceptor
    stops taking its bytes, and the worker's end of the pair fills up. The worker must go on
    serving its other clients (its end is non-blocking), not wait in a ``send``. The
    bystander is on the stuck client's worker."""
    stuck_id = client_id_on_shard(uniq.prefix("stk"), 0, 2)
    bystander = client_id_on_shard(uniq.prefix("by"), 0, 2)

    def attack() -> None:
        if kind == "tls":
            ctx = ssl.create_default_context(cafile=str(pki["ca"]))
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", target.tls_port))
            stuck = ctx.wrap_socket(raw, server_hostname="localhost")
            stuck.settimeout(5)
            c = mb.RawClient(port=target.tls_port, sock=stuck)
            c.connect_mqtt(stuck_id)
            c.subscribe("flood/#", 0)
        else:
            stuck = _ws_socket(target.ws_port)
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.sendall(_ws_frame(mb.connect(stuck_id)) + _ws_frame(mb.subscribe(1, [("flood/#", 0)])))
            time.sleep(0.3)  # connected and subscribed (its CONNACK and SUBACK are never read)
        p = mb.RawClient(port=target.port)
        p.connect_mqtt(uniq.cid("fl"))
        payload = b"f" * 1000
        deadline = time.monotonic() + 3  # well beyond what the relay and both socket buffers hold
        while time.monotonic() < deadline:
            p.send(b"".join(mb.publish("flood/x", payload) for _ in range(100)))
        p.close()
        stuck.close()

    _attack(target, uniq, attack, bystander)


def test_tls_and_websocket_handshakes_that_never_finish(target, pki, uniq):
    def attack() -> None:
        socks = _sockets(target.tls_port, 30)
        for s in socks:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, no more
        ws = _sockets(target.ws_port, 30)
        for s in ws:
            s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # no end of headers
        huge = socket.create_connection(("127.0.0.1", target.ws_port))
        try:
            huge.sendall(b"GET /mqtt HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 60000 + b"\r\n\r\n")
        except OSError:
            pass
        time.sleep(1.6)
        for s in [*socks, *ws, huge]:
            s.settimeout(2)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
            s.close()
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))  # and a real TLS client still gets in
        t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", target.tls_port)), server_hostname="localhost")
        t.settimeout(5)
        c = mb.RawClient(port=target.tls_port, sock=t)
        assert c.connect_mqtt(uniq.cid("ok")).rc == 0
        c.close()

    _attack(target, uniq, attack)


def _rss(broker) -> int:
    """Resident memory of the broker's processes, bytes."""
    total = 0
    for pid in [broker.pid, *broker.child_pids()]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * 4096
        except OSError:
            pass
    return total


STORM = """
import resource, socket, sys
sys.path.insert(0, sys.argv[3])
import mqttbytes as mb
port, n = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(mb.connect(f"{sys.argv[4]}-{i}", version=4, keepalive=600))
    socks.append(s)
for s in socks:
    s.settimeout(10)
    assert s.recv(4) == b"\\x20\\x02\\x00\\x00"
print("connected", flush=True)
sys.stdin.readline()
"""


def test_ten_thousand_idle_connections(target, uniq):
    """10,000 connected clients (from another process, so that it does not share the
    bystander's interpreter) that then say nothing and leave at once, twice: the bystander is
    served throughout, and the memory the first 10,000 cost serves the second (Python keeps
    what it freed for reuse, and tables do not shrink, so the measure of a leak is what the
    second round adds)."""
    import os
    import resource
    import subprocess
    import sys

    n = 10_000
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < n + 500:
        pytest.skip(f"the open files limit is below {n + 500}")
    before = _rss(target)
    peaks: list[int] = []

    def attack() -> None:
        storm = subprocess.Popen([sys.executable, "-c", STORM, str(target.port), str(n), os.path.dirname(mb.__file__),
                                  uniq.prefix(f"idle{len(peaks)}")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert storm.stdout is not None and storm.stdout.readline() == "connected\n"
            peaks.append(_rss(target) - before)
        finally:
            storm.communicate("go\n", timeout=30)  # it closes them all as it exits
        assert storm.returncode == 0

    _attack(target, uniq, attack)
    time.sleep(1.0)
    first = _rss(target) - before
    _attack(target, uniq, attack)
    time.sleep(1.0)
    second = _rss(target) - before
    print(f"10,000 idle clients: +{peaks[0] / 1e6:.1f} MB; after they went {first / 1e6:.1f} MB; "
          f"10,000 more: +{peaks[1] / 1e6:.1f} MB; after those {second / 1e6:.1f} MB")
    assert second - first < peaks[0] / 4, f"the second 10,000 left {second - first} more bytes"


def _connack(port: int, cid: str) -> bytes:
    """The CONNACK a new 3.1.1 client gets (a plain socket: its descriptor may be above what
    ``select`` takes, which ``RawClient`` uses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(mb.connect(cid, version=4))
        return s.recv(4)


def test_a_stopped_worker_does_not_stop_the_others_connections(make_broker, uniq):
    """A worker that takes no connections (stopped here; busy in real life) while thousands of
    clients of its shard connect: the acceptor keeps their hand-offs waiting instead of blocking
    on that worker's link, so a client of the other worker still connects at once. Those that
    waited ``HANDOFF_WAIT`` (5 s) get CONNACK "server unavailable"; the worker, back, serves
    the rest and new ones."""
    import resource

    from shardbroker.sharding import shard_for

    b = make_broker(workers=2)
    stopped = b.worker_pids()[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 3000
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    socks: list[socket.socket] = []
    os.kill(stopped, signal.SIGSTOP)
    try:
        prefix = uniq.prefix("w1")
        ids = [cid for cid in (f"{prefix}{i}" for i in range(4 * n)) if shard_for(cid, 2) == 1][:n]
        for cid in ids:
            s = socket.create_connection(("127.0.0.1", b.port))
            s.sendall(mb.connect(cid, version=4))
            socks.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert _connack(b.port, client_id_on_shard(uniq.prefix("w0"), 0, 2)) == b"\x20\x02\x00\x00"
        took = time.monotonic() - t0
        assert took < 1.0, f"a client of the running worker took {took:.2f} s to connect"
        time.sleep(6.0 - (time.monotonic() - t0))  # beyond HANDOFF_WAIT for every one of them
    finally:
        os.kill(stopped, signal.SIGCONT)
    try:
        answers = []
        for s in socks:
            s.settimeout(10)
            try:
                answers.append(s.recv(4))
            except OSError as exc:
                answers.append(repr(exc).encode())
        refused, taken = answers.count(b"\x20\x02\x00\x03"), answers.count(b"\x20\x02\x00\x00")
        assert refused + taken == n, set(answers) - {b"\x20\x02\x00\x03", b"\x20\x02\x00\x00"}
        assert refused > 0  # the acceptor held them, and answered them itself after 5 s
        assert "took no connections for 5 s" in b.log_text()
        assert _connack(b.port, client_id_on_shard(uniq.prefix("w1b"), 1, 2)) == b"\x20\x02\x00\x00"
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
