"""Interoperability with real clients: paho-mqtt (3.1.1, 5.0) and mosquitto_pub/_sub."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import termios
import threading
import time

import pytest
from conftest import wait_until

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
needs_mosquitto_clients = pytest.mark.skipif(
    not (MOSQUITTO_SUB and MOSQUITTO_PUB),
    reason="mosquitto_pub / mosquitto_sub not installed (apt-get install mosquitto-clients)")


# -- paho-mqtt ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_roundtrip(broker, paho, uniq, version, qos):
    topic = uniq.topic()
    sub = paho(broker, uniq.cid("ps"), version=version)
    granted = sub.subscribe(topic, qos)
    assert [int(getattr(g, "value", g)) for g in granted] == [qos]
    pub = paho(broker, uniq.cid("pp"), version=version)
    pub.publish(topic, f"paho v{version} q{qos}".encode(), qos=qos)
    msg = sub.get()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (
        topic, f"paho v{version} q{qos}".encode(), qos, False)


def test_paho_v311_v5_mixed(broker, paho, uniq):
    topic = uniq.topic()
    sub4 = paho(broker, uniq.cid("s4"), version=4)
    sub5 = paho(broker, uniq.cid("s5"), version=5)
    sub4.subscribe(topic, 2)
    sub5.subscribe(topic, 2)
    paho(broker, uniq.cid("p5"), version=5).publish(topic, b"from v5", qos=2)
    paho(broker, uniq.cid("p4"), version=4).publish(topic, b"from v4", qos=2)
    for s in (sub4, sub5):
        assert [s.get().payload for _ in range(2)] == [b"from v5", b"from v4"]


def test_paho_v5_properties(broker, paho, uniq):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = uniq.topic()
    sub = paho(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k1", "v1"), ("k1", "v2")]
    props.ResponseTopic = "reply/paho"
    props.CorrelationData = b"corr-1"
    props.ContentType = "text/plain"
    props.MessageExpiryInterval = 120
    pub = paho(broker, uniq.cid("p"), version=5)
    pub.publish(topic, b"props", qos=1, properties=props)
    msg = sub.get()
    got = msg.properties
    assert got.UserProperty == [("k1", "v1"), ("k1", "v2")]
    assert got.ResponseTopic == "reply/paho"
    assert got.CorrelationData == b"corr-1"
    assert got.ContentType == "text/plain"
    assert 0 < got.MessageExpiryInterval <= 120


@pytest.mark.parametrize("version", [4, 5])
def test_paho_retained(broker, paho, uniq, version):
    topic = uniq.topic()
    pub = paho(broker, uniq.cid("p"), version=version)
    pub.publish(topic, b"paho retained", qos=1, retain=True)
    sub = paho(broker, uniq.cid("s"), version=version)
    sub.subscribe(topic, 1)
    msg = sub.get()
    assert (msg.payload, msg.retain) == (b"paho retained", True)


def test_paho_persistent_session_v311(broker, paho, uniq):
    cid, topic = uniq.cid("ps"), uniq.topic()
    c = paho(broker, cid, version=4, clean=False)
    c.subscribe(topic, 1)
    c.close()
    paho(broker, uniq.cid("p"), version=4).publish(topic, b"queued for paho", qos=1)
    c2 = paho(broker, cid, version=4, clean=False)
    assert c2.session_present is True
    assert c2.get().payload == b"queued for paho"


def test_paho_v5_shared_subscription(broker, paho, uniq):
    topic = uniq.topic()
    group = f"$share/pg{uniq.cid()}/{topic}"
    members = [paho(broker, uniq.cid(f"m{i}"), version=5) for i in range(2)]
    for m in members:
        m.subscribe(group, 1)
    pub = paho(broker, uniq.cid("p"), version=5)
    for i in range(10):
        pub.publish(topic, str(i).encode(), qos=1)
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        for m in members:
            while not m.messages.empty():
                got.append(int(m.messages.get().payload))
        time.sleep(0.02)
    time.sleep(0.2)
    for m in members:
        while not m.messages.empty():
            got.append(int(m.messages.get().payload))
    assert sorted(got) == list(range(10))


# -- mosquitto_pub / mosquitto_sub -----------------------------------------------------------------


class MosquittoSub:
    """mosquitto_sub in the background, with -d so we can see its SUBACK. Its stdout is
    a pty so that it is line-buffered (a pipe would hold the lines back)."""

    def __init__(self, port: int, args: list[str]) -> None:
        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # no \r\n translation
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-d", *args],
            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, close_fds=True)
        os.close(slave)
        self._master = master
        self.lines: list[str] = []
        self.subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO once the child has exited
                break
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self.lines.append(line)
                if "received SUBACK" in line:
                    self.subscribed.set()
        if buf:
            self.lines.append(buf.decode("utf-8", "replace").rstrip("\r"))
        os.close(self._master)

    def messages(self) -> list[str]:
        """Output lines that are not -d debug chatter."""
        return [ln for ln in self.lines
                if not ln.startswith("Client ") and not ln.startswith("Subscribed (mid")]

    def wait(self, timeout: float = 10.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"mosquitto_sub did not finish; output: {self.lines}") from None
        self._reader.join(2)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def mosq_subs():
    made: list[MosquittoSub] = []

    def make(port: int, args: list[str]) -> MosquittoSub:
        s = MosquittoSub(port, args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def _mosquitto_pub(port: int, args: list[str]) -> None:
    r = subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), *args],
                       capture_output=True, timeout=10, check=False)
    assert r.returncode == 0, f"mosquitto_pub {args} failed: {r.stdout!r} {r.stderr!r}"


@needs_mosquitto_clients
@pytest.mark.parametrize("proto", ["mqttv311", "mqttv5", "mqttv31"])
def test_mosquitto_sub_receives_mosquitto_pub(broker, mosq_subs, uniq, proto):
    topic = uniq.topic()
    sub = mosq_subs(broker.port, ["-V", proto, "-t", topic, "-q", "1", "-C", "3",
                                  "-i", uniq.cid("ms")])
    assert sub.subscribed.wait(10), f"mosquitto_sub never subscribed: {sub.lines}"
    for i in range(3):
        _mosquitto_pub(broker.port, ["-V", proto, "-t", topic, "-q", "1", "-m", f"msg-{i}",
                                     "-i", uniq.cid("mp")])
    assert sub.wait(10) == 0
    assert sub.messages() == ["msg-0", "msg-1", "msg-2"]


@needs_mosquitto_clients
@pytest.mark.parametrize("proto", ["mqttv311", "mqttv5"])
def test_mosquitto_retained(broker, mosq_subs, uniq, proto):
    topic = uniq.topic()
    _mosquitto_pub(broker.port, ["-V", proto, "-t", topic, "-q", "1", "-r", "-m", "kept by broker"])
    sub = mosq_subs(broker.port, ["-V", proto, "-t", topic, "-q", "1", "-C", "1", "-v"])
    assert sub.wait(10) == 0
    assert sub.messages() == [f"{topic} kept by broker"]


@needs_mosquitto_clients
def test_mosquitto_pub_v5_user_property_to_paho(broker, paho, uniq):
    topic = uniq.topic()
    sub = paho(broker, uniq.cid("s"), version=5)
    sub.subscribe(topic, 1)
    _mosquitto_pub(broker.port, ["-V", "mqttv5", "-t", topic, "-q", "1", "-m", "with prop",
                                 "-D", "publish", "user-property", "origin", "mosquitto_pub"])
    msg = sub.get()
    assert msg.payload == b"with prop"
    assert msg.properties.UserProperty == [("origin", "mosquitto_pub")]


@needs_mosquitto_clients
def test_paho_to_mosquitto_sub_wildcard(broker, mosq_subs, paho, uniq):
    base = uniq.topic()
    sub = mosq_subs(broker.port, ["-V", "mqttv5", "-t", base + "/+/x", "-q", "2", "-C", "2", "-v"])
    assert sub.subscribed.wait(10), sub.lines
    pub = paho(broker, uniq.cid("p"), version=5)
    pub.publish(base + "/a/x", b"one", qos=2)
    pub.publish(base + "/a/y", b"not matched", qos=2)
    pub.publish(base + "/b/x", b"two", qos=2)
    assert sub.wait(10) == 0
    assert sub.messages() == [f"{base}/a/x one", f"{base}/b/x two"]


@needs_mosquitto_clients
def test_mosquitto_sub_persistent_session(broker, mosq_subs, uniq):
    topic, cid = uniq.topic(), uniq.cid("mc")
    sub = mosq_subs(broker.port, ["-V", "mqttv311", "-t", topic, "-q", "1", "-c", "-i", cid,
                                  "-C", "1"])
    assert sub.subscribed.wait(10), sub.lines
    _mosquitto_pub(broker.port, ["-t", topic, "-q", "1", "-m", "first"])
    assert sub.wait(10) == 0
    wait_until(lambda: sub.proc.poll() is not None, 5)
    _mosquitto_pub(broker.port, ["-t", topic, "-q", "1", "-m", "while offline"])
    again = mosq_subs(broker.port, ["-V", "mqttv311", "-t", topic, "-q", "1", "-c", "-i", cid,
                                    "-C", "1"])
    assert again.wait(10) == 0
    assert again.messages() == ["while offline"]
