"""23: back-pressure and fairness with the default configuration.

Publishers pipeline QoS 1/2 against their acknowledgements only (up to ``WINDOW`` unacked, as
real clients do), subscribers on the other shard acknowledge, sometimes after a pause: every
acknowledged message arrives, once, in order, none dropped by a queue limit. A subscriber that
stops acknowledging is cut loose after its ack timeout and only its own messages are dropped.
A client on an unrelated topic keeps getting its messages while other clients never read.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time

import mqttbytes as mb
from conftest import client_id_on_shard, skip_unless_shardbroker, wait_until

SHARDS = 2
WINDOW = 100  # unacknowledged publishes per publisher


def _packets(sock: socket.socket, buf: bytearray) -> list[tuple[int, int, bytes]]:
    """Read once from ``sock`` and return the whole packets now in ``buf``."""
    data = sock.recv(1 << 16)
    if not data:
        raise mb.ConnectionClosed("the broker closed the connection")
    buf += data
    out = []
    while len(buf) >= 2:
        try:
            length, pos = mb.decode_varint(buf, 1)
        except mb.MalformedError:  # the length itself is not complete yet
            break
        if len(buf) < pos + length:
            break
        out.append((buf[0] >> 4, buf[0] & 0x0F, bytes(buf[pos:pos + length])))
        del buf[:pos + length]
    return out


class _Client(threading.Thread):
    """A client in its own thread; what went wrong in it is kept for the test to report."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _run(self) -> None:
        raise NotImplementedError


class Publisher(_Client):
    """Publishes ``count`` messages ``(index, seq)`` to ``topic``, at most WINDOW unacknowledged."""

    def __init__(self, port: int, cid: str, topic: str, qos: int, count: int, index: int) -> None:
        super().__init__()
        self.client = mb.RawClient(port=port)
        self.client.connect_mqtt(cid)
        self.topic, self.qos, self.count, self.index = topic, qos, count, index
        self.acked = 0

    def _run(self) -> None:
        sock = self.client.sock
        assert sock is not None
        sock.settimeout(60)
        buf = bytearray()
        unacked: set[int] = set()
        seq = 0
        while self.acked < self.count:
            out = []
            while seq < self.count and len(unacked) < WINDOW:
                pid = seq % 65535 + 1
                out.append(mb.publish(self.topic, struct.pack(">II", self.index, seq), qos=self.qos, pid=pid))
                unacked.add(pid)
                seq += 1
            if out:
                sock.sendall(b"".join(out))
            for ptype, _, body in _packets(sock, buf):
                pid = struct.unpack(">H", body[:2])[0]
                if ptype == mb.PUBREC:
                    sock.sendall(mb.pubrel(pid))  # accepted; the exchange ends at PUBCOMP
                elif ptype in (mb.PUBACK, mb.PUBCOMP):
                    unacked.discard(pid)
                    self.acked += 1


class Subscriber(_Client):
    """Acknowledges every message (after ``pause_every``-th ones it waits ``pause`` s first) and
    records each publisher's sequence numbers in arrival order."""

    def __init__(self, port: int, cid: str, topic: str, qos: int, expect: int, *, pause_every: int = 0,
                 pause: float = 0.0, acknowledge: bool = True, clean: bool = True) -> None:
        super().__init__()
        self.client = mb.RawClient(port=port)
        self.client.connect_mqtt(cid, clean=clean)
        self.client.subscribe(topic, qos)
        self.expect, self.pause_every, self.pause, self.acknowledge = expect, pause_every, pause, acknowledge
        self.got: dict[int, list[int]] = {}
        self.received = 0
        self.stop = threading.Event()

    def _run(self) -> None:
        sock = self.client.sock
        assert sock is not None
        sock.settimeout(0.5)
        buf = bytearray()
        while self.received < self.expect and not self.stop.is_set():
            try:
                packets = _packets(sock, buf)
            except TimeoutError:
                continue
            acks = []
            for ptype, flags, body in packets:
                if ptype == mb.PUBREL:
                    acks.append(mb.pubcomp(struct.unpack(">H", body[:2])[0]))
                    continue
                if ptype != mb.PUBLISH:
                    continue
                qos = (flags >> 1) & 3
                tlen = struct.unpack(">H", body[:2])[0]
                pos = 2 + tlen
                pid = struct.unpack(">H", body[pos:pos + 2])[0] if qos else 0
                index, seq = struct.unpack(">II", body[pos + (2 if qos else 0):])
                self.got.setdefault(index, []).append(seq)
                self.received += 1
                if qos == 1:
                    acks.append(mb.puback(pid))
                elif qos == 2:
                    acks.append(mb.pubrec(pid))
                if self.pause_every and self.received % self.pause_every == 0:
                    time.sleep(self.pause)
            if acks and self.acknowledge:
                sock.sendall(b"".join(acks))


# Publishes QoS 0 (3.1.1) to TOPIC/i from each client id given, as fast as the broker reads.
_BLAST = r"""
import socket, sys, threading
port, topic, ids = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
def s(x): return len(x).to_bytes(2, "big") + x
def pkt(t, body): 
    n, v = len(body), b""
    while True:
        d, n = n % 128, n // 128
        v += bytes([d | (0x80 if n else 0)])
        if not n: return bytes([t]) + v + body
def run(i, cid):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(pkt(0x10, s(b"MQTT") + bytes([4, 2]) + (0).to_bytes(2, "big") + s(cid.encode())))
    c.recv(4)
    chunk = pkt(0x30, s(f"{topic}/{i}".encode()) + b"x" * 200) * 500
    while True:
        c.sendall(chunk)
ts = [threading.Thread(target=run, args=(i, cid)) for i, cid in enumerate(ids)]
for t in ts: t.start()
for t in ts: t.join()
"""


def _sys_counter(port: int, cid: str, shard: int, name: str) -> int:
    watcher = mb.RawClient(port=port)
    try:
        watcher.connect_mqtt(cid)
        watcher.subscribe(f"$SYS/shardbroker/shard/{shard}/{name}", 0)
        return int(watcher.recv_publish(5).payload)
    finally:
        watcher.close()


def _flood_arrives_complete_and_in_order(make_broker, uniq, qos: int, clean: bool = True) -> None:
    skip_unless_shardbroker("back-pressure across shards")
    b = make_broker(workers=SHARDS, config="[server]\nsys_interval = 0.5\n")
    pairs, count = 4, 6000
    subs, pubs = [], []
    for i in range(pairs):
        topic = f"{uniq.topic()}/{i}"
        # every subscriber pauses 0.4 s after each 1,500 messages, so its queue outgrows the
        # high-water mark and its publisher (on the other shard) has to be held back
        subs.append(Subscriber(b.port, client_id_on_shard(uniq.prefix(f"s{i}-"), 0, SHARDS), topic, qos, count,
                               pause_every=1500, pause=0.4, clean=clean))
        pubs.append(Publisher(b.port, client_id_on_shard(uniq.prefix(f"p{i}-"), 1, SHARDS), topic, qos, count, i))
    for t in subs + pubs:
        t.start()
    for t in pubs + subs:
        t.join(90)
    for t in pubs + subs:
        assert t.error is None, repr(t.error)
        assert not t.is_alive(), "the flood did not finish"
    for i, (p, s) in enumerate(zip(pubs, subs)):
        assert p.acked == count
        assert s.got == {i: list(range(count))}, f"pair {i}: messages missing, repeated or out of order"
    assert _sys_counter(b.port, uniq.cid("w0"), 0, "dropped_queue_full") == 0
    assert _sys_counter(b.port, uniq.cid("w1"), 0, "holds") > 0  # the publishers were held back


def test_a_sustained_qos1_flood_arrives_complete_and_in_order(make_broker, uniq):
    _flood_arrives_complete_and_in_order(make_broker, uniq, 1)


def test_a_sustained_qos2_flood_arrives_complete_and_in_order(make_broker, uniq):
    _flood_arrives_complete_and_in_order(make_broker, uniq, 2)


def test_a_qos1_flood_to_persistent_sessions_arrives_complete_and_in_order(make_broker, uniq):
    """The same through the durable outbox between shards and the subscribers' stored queues."""
    _flood_arrives_complete_and_in_order(make_broker, uniq, 1, clean=False)


def test_a_subscriber_that_stops_acknowledging_is_cut_loose_after_its_ack_timeout(make_broker, uniq):
    """Documented: a subscriber with a full window that acknowledges nothing for
    ``limits.ack_timeout`` seconds is slow; its publishers go on, its queue is limited."""
    skip_unless_shardbroker("ack timeout")
    b = make_broker(workers=SHARDS, config="[server]\nsys_interval = 0.5\n[limits]\nack_timeout = 2\n")
    topic = uniq.topic()
    count = 5000
    stuck = Subscriber(b.port, client_id_on_shard(uniq.prefix("stuck"), 0, SHARDS), topic, 1, count,
                       acknowledge=False)
    healthy = Subscriber(b.port, client_id_on_shard(uniq.prefix("ok"), 0, SHARDS), topic, 1, count)
    pub = Publisher(b.port, client_id_on_shard(uniq.prefix("p"), 1, SHARDS), topic, 1, count, 0)
    started = time.monotonic()
    for t in (stuck, healthy, pub):
        t.start()
    time.sleep(1.0)
    assert pub.is_alive() and pub.acked < count  # held back while the stuck one may yet acknowledge
    pub.join(30)
    took = time.monotonic() - started
    assert pub.error is None and pub.acked == count, f"publisher got {pub.acked} acknowledgements"
    assert took >= 2.0, f"the publisher was released after {took:.1f} s, before the ack timeout"
    healthy.join(30)
    assert healthy.error is None and healthy.got == {0: list(range(count))}
    # the stuck subscriber's own messages were subject to its queue limit, and counted
    dropped = wait_until(lambda: _sys_counter(b.port, uniq.cid("w"), 0, "dropped_queue_full") or None,
                         timeout=10, message="drops counted for the stuck subscriber")
    assert 0 < dropped < count
    assert _sys_counter(b.port, uniq.cid("w2"), 0, "slow_subscribers") == 1
    stuck.stop.set()
    stuck.join(5)


def test_a_canary_on_another_topic_is_served_while_other_clients_never_read(make_broker, uniq):
    """Four subscribers that never read are flooded with QoS 0 from four publishers; a QoS 1
    round trip on an unrelated topic, through the same shards, stays fast (a generous bound
    here; the benchmark's fairness scenario measures the figure)."""
    skip_unless_shardbroker("fairness")
    b = make_broker(workers=SHARDS)
    flood = uniq.topic()
    stuck = []
    for i in range(4):
        c = mb.RawClient(port=b.port)
        assert c.sock is not None
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        c.connect_mqtt(client_id_on_shard(uniq.prefix(f"stuck{i}-"), i % SHARDS, SHARDS))
        c.subscribe(f"{flood}/#", 0)
        stuck.append(c)
    # the flood comes from another process, so that it does not compete with the canary here
    flooders = [client_id_on_shard(uniq.prefix(f"flood{i}-"), i % SHARDS, SHARDS) for i in range(4)]
    blaster = subprocess.Popen([sys.executable, "-c", _BLAST, str(b.port), flood, *flooders])
    canary_topic = uniq.topic()
    sub = mb.RawClient(port=b.port)
    sub.connect_mqtt(client_id_on_shard(uniq.prefix("canary-s"), 0, SHARDS))
    sub.subscribe(canary_topic, 1)
    pub = mb.RawClient(port=b.port)
    pub.connect_mqtt(client_id_on_shard(uniq.prefix("canary-p"), 1, SHARDS))
    time.sleep(1.5)  # the stuck subscribers' buffers are full, and their grace has run out
    rtts = []
    try:
        for k in range(100):
            t0 = time.monotonic()
            pub.publish(canary_topic, str(k), qos=1)  # waits for its PUBACK
            msg = sub.recv_publish(timeout=5)  # and acknowledges it
            rtts.append(time.monotonic() - t0)
            assert msg.payload == str(k).encode()
            time.sleep(0.01)
    finally:
        blaster.kill()
        blaster.wait()
    rtts.sort()
    p99 = rtts[98]
    assert p99 < 0.25, f"canary p99 {p99 * 1000:.0f} ms (median {rtts[50] * 1000:.1f} ms)"
    for c in stuck + [sub, pub]:
        c.abort()
