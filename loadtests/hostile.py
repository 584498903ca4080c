"""Hostile clients beside a timed bystander: what one misbehaving client does to the others.

Run from the repository root (loopback only; each attack gets a broker of its own)::

    .venv/bin/python -m loadtests.hostile                            # every attack, ShardBroker, 2 workers
    .venv/bin/python -m loadtests.hostile --attack a6b --attack a4   # these two only
    .venv/bin/python -m loadtests.hostile --broker mosquitto         # the same against Mosquitto 2
    .venv/bin/python -m loadtests.hostile --quick --attack a3        # a short smoke run
    .venv/bin/python -m loadtests.hostile --json loadtests/reports/hostile.json

For each attack a fresh broker is started: ShardBroker as ``serve --port 0 --workers N`` on an
empty data directory (its port read from the "listening on" line, its default log level
unless ``--log-level``), or Mosquitto with ``loadtests.bench``'s configuration (a listener on
a free loopback port, anonymous access, no persistence, the log on stderr: Mosquitto's
defaults otherwise). Then:

* a bystander process (a process of its own, so that the attack does not slow it down)
  connects one MQTT 5.0 client per worker placement, its client ID chosen with
  ``shardbroker.sharding.shard_for`` so that one lands on each worker (``w0``, ``w1``, ...).
  Mosquitto is one process, where placement does not apply: two identical bystander clients
  run there (``#1``, ``#2``). Each client subscribes at QoS 1 to a topic of its own
  (``by/CLIENT``), publishes a QoS 1 message to it, waits for the PUBACK and for the message
  to come back, sleeps 10 ms and starts again, and records every round trip. A round trip
  that has not finished after 15 s, a refused PUBLISH or a closed connection is a failed
  round trip (a lost message); the client then reconnects and goes on;
* a baseline (5 s, ``--quick``: 1 s), the attack, another baseline;
* the attack's clients all run in this process on raw sockets (packets from
  ``loadtests.mqttwire``, a few builders here), read by one epoll thread.

Attacks (``--attack NAME``, repeatable; all by default, in this order):

a1   50,000 retained messages (QoS 1, 100 bytes, topics ``a/I/J/v``), then, per placement and
     round, a ``#`` QoS 0 subscriber and an ``a/+/+/v`` QoS 1 subscriber that each receive all
     of them; then a client that subscribes to ``#``, waits for the 50,000, unsubscribes and
     subscribes again, for 8 s.
a2   a subscription storm: one client sends 1,000 SUBSCRIBEs of 100 filters each at once
     (a broker's limit on subscriptions per client may refuse some), then the UNSUBSCRIBEs;
     then 10 clients subscribe and unsubscribe 10,000 filters each, in cycles, for 8 s.
a3   a QoS 0 flood: 100-byte messages as fast as the socket takes them, 7 s to a topic with
     one subscriber, then 7 s to a topic without any; a PINGREQ after each measures how far
     behind the broker's reading is.
a4   a PINGREQ flood, as fast as the socket takes them for 7 s; then it waits for every
     PINGRESP.
a5   1 MB QoS 1 messages (4 unacknowledged at most) for 8 s to one subscriber, then one
     10 MB PUBLISH (over ShardBroker's default maximum packet size).
a6   a ``#`` subscriber with a 4 KB receive buffer that reads 1 KB a second (at QoS 1 it
     acknowledges what it read) while 500 msg/s are published over 1,000 topics for 8 s;
     subscription / publish QoS 0/0, 1/1 and 1/0.
a6b  a ``#`` QoS 1 subscriber (keepalive 60 s) that never reads nor acknowledges anything,
     while 500 QoS 1 msg/s are published for 8 s; it stays connected up to 75 s in all.
a7   one client with 10,000 wildcard filters ``x/+/yN/#``; 2,000 msg/s to matching topics for
     8 s, then unpaced for 5 s; then 1,000 clients with 10 such filters each, 2,000 msg/s
     for 8 s.
a8   a will storm: 2,000 clients with persistent sessions (half 5.0 with a session expiry of
     1 h, half 3.1.1), each with a QoS 1 will, are aborted at once, the wills going to a
     ``will/#`` subscriber; a QoS 1 message is queued for each, then all reconnect.

``--quick`` shortens all of it for a smoke run: 1 s baselines, timed steps of 2 s at most
(waits for catching up are not shortened), 5,000 retained messages and one round in a1, 200
SUBSCRIBEs and cycles of 20 in a2, the stuck client 10 s in a6b, 200 clients in a7b, 500 in
a8.

Output, per attack: the attack's own figures as it goes (messages sent, received, seconds
to catch up, SUBACK codes...), then a table with a row per phase (the baselines, each step of
the attack, and ``attack (all)`` over every step) and placement:

* n: round trips started in the phase; p50 / p99 / max: their round-trip times, ms;
  >100ms: how many took longer than 100 ms;
* gap: the longest time, ms, in which that client completed no round trip (from the start
  of the phase to its first completion, between completions, from the last to the end of
  the phase); a stalled client shows here even when no round trip finished;
* failed: failed round trips (lost messages);
* RSS: the broker's resident memory (every process of it, MB) at the start of the phase,
  its peak (sampled every 0.5 s) and at its end;
* log: the broker's warning and error lines read during the phase (ShardBroker: WARNING,
  ERROR, CRITICAL, tracebacks; Mosquitto, whose lines carry no level: lines with "error" or
  "warning", and its "Outgoing messages are being dropped" notices). The first lines are
  printed below the table.

Then whether the broker stayed up: its process (ShardBroker: each of its processes, a
restarted worker counts as a crash) and a CONNECT to each placement after the last baseline.

Linux only (``/proc``). Exit status: 0 if every attack ran and the broker stayed up; 1 if a
broker died or a bystander lost a message (failed round trips); otherwise 2 if the harness
itself could not run an attack (a broker or the bystander that did not start, an attack that
stopped on an exception: its traceback is printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import re
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import bench
from loadtests import mqttwire as w
from loadtests.connect_cost import LISTENING, children
from loadtests.connect_cost import Broker as ServeBroker
from shardbroker.sharding import shard_for

BYSTANDER_TIMEOUT = 15.0  # a round trip not finished by then has failed
SLOW_MS = 100.0
SB_BAD_LINE = re.compile(r"ERROR|Traceback|WARNING|CRITICAL|Exception")
MOSQ_BAD_LINE = re.compile(r"error|warning|being dropped", re.IGNORECASE)

# =====================================================================================
# Packets that loadtests.mqttwire does not build
# =====================================================================================


def connect_packet(client_id: str, *, proto: int = 4, clean: bool = True, keepalive: int = 60,
                   session_expiry: int = 0, will: tuple[str, bytes, int] | None = None) -> bytes:
    """CONNECT; ``will`` is (topic, payload, QoS), without will properties."""
    if will is None:
        return w.connect(client_id, proto=proto, clean=clean, keepalive=keepalive,
                         session_expiry=session_expiry)
    topic, payload, qos = will
    flags = (0x02 if clean else 0x00) | 0x04 | (qos << 3)
    body = w.utf8("MQTT") + bytes((proto, flags)) + struct.pack("!H", keepalive)
    if proto == 5:
        props = bytes((w.PROP_SESSION_EXPIRY,)) + struct.pack("!I", session_expiry) if session_expiry else b""
        body += w.varint(len(props)) + props
    body += w.utf8(client_id)
    if proto == 5:
        body += b"\x00"  # will properties: none
    body += w.utf8(topic) + w.utf8(payload)
    return b"\x10" + w.varint(len(body)) + body


def unsubscribe_packet(packet_id: int, filters: list[str], *, proto: int = 4) -> bytes:
    body = w.PID_BYTES[packet_id] + (b"\x00" if proto == 5 else b"")
    for flt in filters:
        body += w.utf8(flt)
    return b"\xa2" + w.varint(len(body)) + body


# =====================================================================================
# The attack's connections: blocking sends, one epoll reader thread
# =====================================================================================

OnPublish = Callable[["Conn", bytes, int, int], None]  # (connection, topic, flags, length)


class Conn:
    """One raw MQTT connection: sends with ``sendall`` under a lock (from any thread), read by
    the ``Reactor``, which counts packets by type, records CONNACK, SUBACK / UNSUBACK codes and
    DISCONNECT, and acknowledges QoS 1 PUBLISHes (batched) when ``autoack``."""

    def __init__(self, reactor: Reactor, port: int, version: int = 5, autoack: bool = True,
                 rcvbuf: int | None = None, on_publish: OnPublish | None = None) -> None:
        self.r = reactor
        self.version = version
        self.autoack = autoack
        self.on_publish = on_publish
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.counts: Counter[int] = Counter()
        self.codes: Counter[int] = Counter()   # SUBACK codes
        self.ucodes: Counter[int] = Counter()  # UNSUBACK codes
        self.pub_bytes = 0
        self.connack: tuple[int, int] | None = None  # (session present, code)
        self.disconnect_reason: int | None = None
        self.closed_at: float | None = None
        self.close_err: str | None = None
        self._pid = 0
        reactor.add(self)

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def send(self, data: bytes) -> bool:
        try:
            with self.lock:
                self.sock.sendall(data)
            return True
        except OSError as e:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.close_err = f"send: {e}"
            return False

    def connect(self, cid: str, timeout: float = 10.0, **kw: Any) -> None:
        self.send(connect_packet(cid, proto=self.version, **kw))
        self.wait(lambda: self.connack is not None, timeout, f"CONNACK {cid}")
        if self.connack is None or self.connack[1] != 0:
            raise ConnectionError(f"{cid}: CONNACK {self.connack}")

    def wait(self, cond: Callable[[], bool], timeout: float, what: str = "") -> bool:
        """Until ``cond()`` or ``timeout``; raises ConnectionError if the connection closes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            if self.closed_at is not None and not cond():
                raise ConnectionError(f"closed while waiting for {what}: {self.close_err}, "
                                      f"DISCONNECT reason {self.disconnect_reason}")
            time.sleep(0.002)
        return cond()

    def abort(self) -> None:
        """Close with a reset, as a crashing client would."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.r.remove(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def feed(self, data: bytes) -> None:
        """Reactor side: split and count the packets in ``data``."""
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        acks = []
        v5 = self.version == 5
        while n - pos >= 2:
            head = w.frame_head(buf, pos)
            if head is None or n < head[0] + head[1]:
                break
            p, length = head
            kind = buf[pos] >> 4
            flags = buf[pos] & 15
            end = p + length
            self.counts[kind] += 1
            if kind == w.PUBLISH:
                tl = (buf[p] << 8) | buf[p + 1]
                q = p + 2 + tl
                if (flags >> 1) & 3 and self.autoack:
                    acks.append(b"\x40\x02" + bytes(buf[q:q + 2]))
                self.pub_bytes += length
                if self.on_publish is not None:
                    self.on_publish(self, bytes(buf[p + 2:p + 2 + tl]), flags, end - p)
            elif kind in (w.SUBACK, w.UNSUBACK):
                q = p + 2
                if v5:
                    plen, q = w.read_varint(buf, q)
                    q += plen
                codes = self.codes if kind == w.SUBACK else self.ucodes
                for c in buf[q:end]:
                    codes[c] += 1
            elif kind == w.CONNACK:
                self.connack = (buf[p] & 1, buf[p + 1])
            elif kind == w.DISCONNECT:
                self.disconnect_reason = buf[p] if length else 0
            pos = end
        if pos:
            del buf[:pos]
        if acks:
            self.send(b"".join(acks))


class Reactor:
    """One thread reading every ``Conn`` of an attack (epoll)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.conns: set[Conn] = set()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, c: Conn) -> None:
        with self.lock:
            self.conns.add(c)
            self.sel.register(c.sock, selectors.EVENT_READ, c)

    def remove(self, c: Conn) -> None:
        with self.lock:
            self.conns.discard(c)
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass

    def run(self) -> None:
        while not self.stopping:
            try:
                events = self.sel.select(0.05)
            except (OSError, ValueError, KeyError):
                events = []
                time.sleep(0.001)
            for key, _ in events:
                c: Conn = key.data
                try:
                    data = c.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    data = b""
                    c.close_err = f"recv: {e}"
                if not data:
                    if c.closed_at is None:
                        c.closed_at = time.monotonic()
                        c.close_err = c.close_err or "EOF"
                    self.remove(c)
                    continue
                try:
                    c.feed(data)
                except Exception as e:  # noqa: BLE001 - a malformed packet: that connection is done
                    c.close_err = f"parse: {e!r}"
                    c.closed_at = time.monotonic()
                    self.remove(c)

    def close_all(self) -> None:
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.close()

    def stop(self) -> None:
        self.close_all()
        self.stopping = True
        self.thread.join(5)
        self.sel.close()


def blocking_subscriber(port: int, cid: str, flt: str, qos: int, *, rcvbuf: int,
                        keepalive: int = 60) -> tuple[socket.socket, bytearray]:
    """A 3.1.1 subscriber on a plain socket with a small receive buffer, read by the caller
    (or never): CONNECT and SUBSCRIBE, up to the SUBACK; returns the socket and what was read
    after the SUBACK."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(w.connect(cid, keepalive=keepalive) + w.subscribe(1, [(flt, qos)]))
    buf = bytearray()
    while True:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError(f"{cid}: closed before the SUBACK")
        buf += chunk
        frames, used = w.split_frames(buf)
        del buf[:used]
        for first, body in frames:
            if first >> 4 == w.CONNACK and body[1] != 0:
                raise ConnectionError(f"{cid}: CONNACK code {body[1]}")
            if first >> 4 == w.SUBACK:
                return s, buf


# =====================================================================================
# Helpers of the attacks
# =====================================================================================


@dataclass(frozen=True)
class Scale:
    """The sizes of a run (``--quick``: the smaller ones)."""

    quick: bool = False
    baseline: float = 5.0
    retained: int = 50_000
    rounds: int = 2          # a1: subscribe rounds per placement
    storm: int = 1000        # a2: SUBSCRIBEs of 100 filters from one client
    storm_cycle: int = 100   # a2: SUBSCRIBEs of 100 filters per client and cycle (10 clients)
    stuck_hold: float = 75.0  # a6b: how long the stuck subscriber stays connected
    wildcard_clients: int = 1000  # a7b
    will_clients: int = 2000  # a8

    def secs(self, full: float) -> float:
        return min(full, 2.0) if self.quick else full


FULL = Scale()
QUICK = Scale(quick=True, baseline=1.0, retained=5000, rounds=1, storm=200, storm_cycle=20,
              stuck_hold=10.0, wildcard_clients=200, will_clients=500)


class Ctx:
    """What an attack works with: the broker's port, the reactor, phases and notes."""

    def __init__(self, target: Target, reactor: Reactor, scale: Scale) -> None:
        self.target = target
        self.port = target.port
        self.r = reactor
        self.scale = scale
        self.phases: list[tuple[str, float, int]] = []  # (name, start, RSS kB then)
        self.notes: dict[str, Any] = {}

    def phase(self, name: str) -> None:
        rss = self.target.rss_kb()
        self.phases.append((name, time.monotonic(), rss))
        print(f"  [{time.strftime('%H:%M:%S')}] {name}  (broker RSS {rss / 1024:.0f} MB)", flush=True)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value
        print(f"    {key}: {json.dumps(value)}", flush=True)

    def cid(self, prefix: str, placement: int) -> str:
        """A client ID on ``placement`` (for Mosquitto: just one of two distinct IDs)."""
        ids = bench.ids_for_shards(prefix, self.target.placements)
        return ids[placement % len(ids)]

    def where(self, cid: str) -> int | None:
        """The worker that serves ``cid`` (None for Mosquitto)."""
        return shard_for(cid, self.target.workers) if self.target.workers else None

    def conn(self, version: int = 5, **kw: Any) -> Conn:
        return Conn(self.r, self.port, version=version, **kw)


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``xs``, nearest rank."""
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def windowed_publish(c: Conn, topics: list[str], payload: bytes, qos: int, n: int | None,
                     window: int = 100, retain: bool = False, duration: float | None = None,
                     rate: float | None = None, batch: int = 1) -> dict[str, Any]:
    """Publish ``n`` messages (or for ``duration`` s, at ``rate`` msg/s at most), QoS 1 with at
    most ``window`` unacknowledged, ``batch`` per write; then wait for the PUBACKs."""
    t0 = time.monotonic()
    sent = 0
    base_acks = c.counts[w.PUBACK]
    ntop = len(topics)
    while True:
        now = time.monotonic()
        if n is not None and sent >= n:
            break
        if duration is not None and now - t0 >= duration:
            break
        if c.closed_at is not None:
            break
        if rate is not None and sent > rate * (now - t0):
            time.sleep(0.002)
            continue
        if qos:
            outstanding = sent - (c.counts[w.PUBACK] - base_acks)
            if outstanding >= window:
                time.sleep(0.0005)
                continue
            k = min(batch, window - outstanding)
        else:
            k = batch
        if n is not None:
            k = min(k, n - sent)
        data = b"".join(w.publish(topics[(sent + j) % ntop], payload, qos=qos, retain=retain,
                                  packet_id=c.next_pid() if qos else 0, proto=c.version)
                        for j in range(k))
        if not c.send(data):
            break
        sent += k
    t_sent = time.monotonic()
    if qos:
        c.wait(lambda: c.counts[w.PUBACK] - base_acks >= sent, 120, "PUBACKs")
    took = time.monotonic() - t0
    return {"sent": sent, "acked": c.counts[w.PUBACK] - base_acks if qos else None,
            "send_s": round(t_sent - t0, 3), "total_s": round(took, 3),
            "rate_per_s": round(sent / max(1e-9, took)),
            "closed": c.close_err, "disconnect_reason": c.disconnect_reason}


def ping_barrier(c: Conn, timeout: float = 60) -> float:
    """Seconds until a PINGREQ is answered: how far behind the broker reads this connection."""
    t0 = time.monotonic()
    n = c.counts[w.PINGRESP]
    c.send(w.PINGREQ_PACKET)
    c.wait(lambda: c.counts[w.PINGRESP] > n, timeout, "PINGRESP")
    return round(time.monotonic() - t0, 3)


def wait_quiet(get: Callable[[], int], quiet: float = 1.0, timeout: float = 120,
               target: int | None = None) -> float:
    """Until ``get()`` reaches ``target`` or stops changing for ``quiet`` s: the seconds until
    it reached the target, or until its last change."""
    t0 = time.monotonic()
    last, last_t = get(), time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.02)
        v = get()
        if target is not None and v >= target:
            return round(time.monotonic() - t0, 3)
        if v != last:
            last, last_t = v, time.monotonic()
        elif time.monotonic() - last_t > quiet:
            return round(last_t - t0, 3)
    return round(time.monotonic() - t0, 3)


def wait_all(conns: list[Conn], cond: Callable[[Conn], bool], timeout: float) -> int:
    """Until ``cond`` holds for every connection still open (at most ``timeout`` s in all):
    how many it holds for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(cond(c) or c.closed_at is not None for c in conns):
            break
        time.sleep(0.02)
    return sum(1 for c in conns if cond(c))


def count_at_least(kind: int, m: int) -> Callable[[Conn], bool]:
    """A condition for ``wait_all``: at least ``m`` packets of type ``kind`` received."""
    return lambda c: c.counts[kind] >= m


def codes_of(counter: Counter[int]) -> dict[str, int]:
    return {f"0x{k:02x}": v for k, v in sorted(counter.items())}


# =====================================================================================
# Attacks
# =====================================================================================


def _retained_round(ctx: Ctx, label: str, cid: str, flt: str, qos: int, n: int) -> None:
    """a1: a subscriber of ``flt`` that receives the ``n`` retained messages."""
    ctx.phase(f"a1.subscribe_{label}")
    got = {"n": 0, "ret": 0, "q1": 0}

    def count(c: Conn, topic: bytes, flags: int, size: int) -> None:
        if topic.startswith(b"a/"):
            got["n"] += 1
            got["ret"] += flags & 1
            got["q1"] += (flags >> 1) & 1

    s = ctx.conn(version=5, on_publish=count)
    s.connect(cid)
    s.send(w.subscribe(1, [(flt, qos)], proto=5))
    el = wait_quiet(lambda: got["n"], quiet=3.0, timeout=120, target=n)
    ctx.note(label, {"filter": flt, "qos": qos, "worker": ctx.where(cid), "received": got["n"],
                     "retain_flag": got["ret"], "qos1": got["q1"], "seconds_to_deliver": el,
                     "closed": s.close_err, "disconnect_reason": s.disconnect_reason})
    s.send(w.DISCONNECT_PACKET)
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)


def a1_retained(ctx: Ctx) -> None:
    n = ctx.scale.retained
    topics = [f"a/{i % 200}/{i // 200}/v" for i in range(n)]
    ctx.phase(f"a1.publish_{n // 1000}k_retained_qos1")
    p = ctx.conn(version=4)
    pcid = "retpub1"
    p.connect(pcid)
    ctx.note("publisher_worker", ctx.where(pcid))
    ctx.note("publish", windowed_publish(p, topics, b"r" * 100, 1, n, window=100, retain=True, batch=20))
    p.close()
    rounds = []
    for rep in range(ctx.scale.rounds):
        for pl in range(ctx.target.placements):
            rounds.append((f"hash_qos0_p{pl}_r{rep}", ctx.cid(f"rsA{rep}-", pl), "#", 0))
            rounds.append((f"plus_qos1_p{pl}_r{rep}", ctx.cid(f"rsB{rep}-", pl), "a/+/+/v", 1))
    for label, cid, flt, qos in rounds:
        _retained_round(ctx, label, cid, flt, qos, n)
    # a client that subscribes to "#" over and over: each SUBSCRIBE replays every retained message
    cid = ctx.cid("rsLoop-", 0)
    secs = ctx.scale.secs(8.0)
    ctx.phase(f"a1.resubscribe_hash_loop_{secs:g}s_p0")
    got = {"n": 0}

    def count_all(c: Conn, topic: bytes, flags: int, size: int) -> None:
        if topic.startswith(b"a/"):
            got["n"] += 1

    def received(m: int) -> Callable[[], bool]:
        return lambda: got["n"] >= m

    s = ctx.conn(version=5, on_publish=count_all)
    s.connect(cid)
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < secs and s.closed_at is None and k < 65535:
        k += 1
        s.send(w.subscribe(k, [("#", 0)], proto=5))
        s.wait(received(n * k), 30)
        s.send(unsubscribe_packet(k, ["#"], proto=5))
    ctx.note("resubscribe_loop", {"worker": ctx.where(cid), "subscribes": k, "received": got["n"],
                                  "closed": s.close_err})
    s.close()


def a2_substorm(ctx: Ctx) -> None:
    cid = "substorm1"
    packets = ctx.scale.storm
    ctx.phase(f"a2.subscribe_{packets}x100")
    c = ctx.conn(version=5)
    c.connect(cid)
    ctx.note("worker", ctx.where(cid))
    pk = [w.subscribe(k + 1, [(f"s/{k}/{j}/x", 1) for j in range(100)], proto=5) for k in range(packets)]
    t0 = time.monotonic()
    for i in range(0, packets, 10):
        c.send(b"".join(pk[i:i + 10]))
    ts = time.monotonic() - t0
    c.wait(lambda: c.counts[w.SUBACK] >= packets, 180, "SUBACKs")
    ctx.note("subscribe", {"send_s": round(ts, 3), "all_subacks_s": round(time.monotonic() - t0, 3),
                           "subacks": c.counts[w.SUBACK], "codes": codes_of(c.codes), "closed": c.close_err})
    ctx.phase(f"a2.unsubscribe_{packets}x100")
    pk = [unsubscribe_packet(k + 1, [f"s/{k}/{j}/x" for j in range(100)], proto=5) for k in range(packets)]
    t0 = time.monotonic()
    for i in range(0, packets, 10):
        c.send(b"".join(pk[i:i + 10]))
    c.wait(lambda: c.counts[w.UNSUBACK] >= packets, 180, "UNSUBACKs")
    ctx.note("unsubscribe", {"all_unsubacks_s": round(time.monotonic() - t0, 3),
                             "unsubacks": c.counts[w.UNSUBACK], "codes": codes_of(c.ucodes),
                             "closed": c.close_err})
    c.send(w.DISCONNECT_PACKET)
    time.sleep(0.2)
    c.close()
    # 10 clients x (storm_cycle x 100) filters, interleaved, subscribed and unsubscribed in cycles
    per = ctx.scale.storm_cycle
    cs = []
    for i in range(10):
        cc = ctx.conn(version=5)
        cc.connect(f"substorm_b{i}")
        cs.append(cc)
    ctx.note("b_workers", [ctx.where(f"substorm_b{i}") for i in range(10)])
    t_loop = time.monotonic()
    cycle = 0
    while time.monotonic() - t_loop < ctx.scale.secs(8.0):
        cycle += 1
        ctx.phase(f"a2b.subscribe_10clients_x_{per * 100}_c{cycle}")
        t0 = time.monotonic()
        for k in range(per):
            for i, cc in enumerate(cs):
                cc.send(w.subscribe(k + 1, [(f"t/{i}/{k}/{j}/{cycle}/#", 1) for j in range(100)], proto=5))
        wait_all(cs, count_at_least(w.SUBACK, per * cycle), 180)
        total: Counter[int] = Counter()
        for cc in cs:
            total.update(cc.codes)
        ctx.note(f"b_subscribe_c{cycle}", {"all_subacks_s": round(time.monotonic() - t0, 3),
                                           "codes_cumulative": codes_of(total)})
        ctx.phase(f"a2b.unsubscribe_10clients_x_{per * 100}_c{cycle}")
        t0 = time.monotonic()
        for k in range(per):
            for i, cc in enumerate(cs):
                cc.send(unsubscribe_packet(k + 1, [f"t/{i}/{k}/{j}/{cycle}/#" for j in range(100)], proto=5))
        wait_all(cs, count_at_least(w.UNSUBACK, per * cycle), 180)
        total = Counter()
        for cc in cs:
            total.update(cc.ucodes)
        ctx.note(f"b_unsubscribe_c{cycle}", {"all_unsubacks_s": round(time.monotonic() - t0, 3),
                                             "codes_cumulative": codes_of(total),
                                             "closed": sum(1 for cc in cs if cc.closed_at is not None)})
        if all(cc.closed_at is not None for cc in cs):
            break
    for cc in cs:
        cc.send(w.DISCONNECT_PACKET)
    time.sleep(0.2)
    for cc in cs:
        cc.close()


def a3_qos0_flood(ctx: Ctx) -> None:
    payload = b"q" * 100
    sub = ctx.conn(version=4)
    sub.connect("fsub1")
    sub.send(w.subscribe(1, [("fl/sub", 0)]))
    sub.wait(lambda: sub.counts[w.SUBACK] >= 1, 10)
    pub = ctx.conn(version=4)
    pub.connect("fpub1")
    ctx.note("workers", {"sub": ctx.where("fsub1"), "pub": ctx.where("fpub1")})
    secs = ctx.scale.secs(7.0)
    for label, topic in (("to_subscriber", "fl/sub"), ("to_no_subscriber", "fl/none")):
        data = w.publish(topic, payload) * 200
        ctx.phase(f"a3.flood_{label}")
        before = sub.counts[w.PUBLISH]
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < secs and pub.closed_at is None:
            if not pub.send(data):
                break
            sent += 200
        ts = time.monotonic() - t0
        barrier = ping_barrier(pub) if pub.closed_at is None else None
        caught_up = wait_quiet(lambda: sub.counts[w.PUBLISH], quiet=1.0, timeout=60,
                               target=before + sent if label == "to_subscriber" else None)
        ctx.note(label, {"sent": sent, "send_s": round(ts, 2), "send_rate": round(sent / ts),
                         "ping_barrier_after_s": barrier, "sub_received": sub.counts[w.PUBLISH] - before,
                         "sub_catchup_s": caught_up, "pub_closed": pub.close_err,
                         "pub_disconnect_reason": pub.disconnect_reason, "sub_closed": sub.close_err})
    pub.close()
    sub.close()


def a4_ping_flood(ctx: Ctx) -> None:
    c = ctx.conn(version=4)
    c.connect("pinger1")
    ctx.note("worker", ctx.where("pinger1"))
    ctx.phase("a4.pingreq_flood")
    data = w.PINGREQ_PACKET * 1000
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < ctx.scale.secs(7.0) and c.closed_at is None:
        if not c.send(data):
            break
        sent += 1000
    ts = time.monotonic() - t0
    got_at_end = c.counts[w.PINGRESP]
    el = wait_quiet(lambda: c.counts[w.PINGRESP], quiet=2.0, timeout=60, target=sent)
    ctx.note("ping", {"sent": sent, "send_rate": round(sent / ts), "resp_at_send_end": got_at_end,
                      "resp_total": c.counts[w.PINGRESP], "catchup_s": el, "closed": c.close_err,
                      "disconnect_reason": c.disconnect_reason})
    c.close()


def a5_large(ctx: Ctx) -> None:
    size = 1_000_000
    sub = ctx.conn(version=5)
    sub.connect("bigsub1")
    sub.send(w.subscribe(1, [("big/t", 1)], proto=5))
    sub.wait(lambda: sub.counts[w.SUBACK] >= 1, 10)
    pub = ctx.conn(version=5)
    pub.connect("bigpub1")
    ctx.note("workers", {"sub": ctx.where("bigsub1"), "pub": ctx.where("bigpub1")})
    ctx.phase(f"a5.qos1_{size // 1000}kB")
    before, before_bytes = sub.counts[w.PUBLISH], sub.pub_bytes
    res = windowed_publish(pub, ["big/t"], b"L" * size, 1, None, window=4, duration=ctx.scale.secs(8.0))
    el = wait_quiet(lambda: sub.counts[w.PUBLISH], quiet=2.0, timeout=120, target=before + res["sent"])
    res.update(sub_received=sub.counts[w.PUBLISH] - before,
               sub_MB=round((sub.pub_bytes - before_bytes) / 1e6, 1), sub_catchup_s=el,
               sub_closed=sub.close_err)
    ctx.note(f"size_{size}", res)
    if pub.closed_at is None:
        ctx.phase("a5.one_10MB_publish")
        before = sub.counts[w.PUBLISH]
        t0 = time.monotonic()
        pub.send(w.publish("big/t", b"X" * 10_000_000, qos=1, packet_id=pub.next_pid(), proto=5))
        ts = time.monotonic() - t0
        pub.wait(lambda: pub.closed_at is not None, 10, "close")
        ctx.note("10MB", {"send_s": round(ts, 3), "closed": pub.close_err,
                          "disconnect_reason": pub.disconnect_reason,
                          "closed_after_s": round(pub.closed_at - t0, 3) if pub.closed_at else None,
                          "sub_received": sub.counts[w.PUBLISH] - before})
    pub.close()
    sub.close()


def _slow_reader(raw: socket.socket, buf: bytearray, qos: int, stop: threading.Event,
                 stat: dict[str, Any]) -> None:
    """Read 1 KB a second; at QoS 1 acknowledge the PUBLISHes read, like a slow but correct client."""
    raw.settimeout(1.0)
    while not stop.is_set():
        try:
            d = raw.recv(1024)
        except TimeoutError:
            continue
        except OSError as e:
            stat["closed"] = repr(e)
            return
        if not d:
            stat["closed"] = f"EOF after {stat['bytes']} B"
            return
        stat["bytes"] += len(d)
        buf += d
        if qos:
            frames, used = w.split_frames(buf)
            del buf[:used]
            acks = []
            for first, body in frames:
                if first >> 4 == w.PUBLISH and (first >> 1) & 3:
                    tl = (body[0] << 8) | body[1]
                    acks.append(b"\x40\x02" + body[2 + tl:4 + tl])
            if acks:
                try:
                    raw.sendall(b"".join(acks))
                except OSError:
                    pass
                stat["acks"] += len(acks)
        else:
            buf.clear()
        stop.wait(1.0)


def a6_slow_hash(ctx: Ctx) -> None:
    payload = b"m" * 100
    topics = [f"m/{i % 50}/{i}" for i in range(1000)]
    for qos, pqos in ((0, 0), (1, 1), (1, 0)):
        ctx.phase(f"a6.slow_hash_sub_qos{qos}_pub_qos{pqos}")
        cid = f"slowhash{qos}{pqos}"
        raw, buf = blocking_subscriber(ctx.port, cid, "#", qos, rcvbuf=4096)
        stop = threading.Event()
        stat: dict[str, Any] = {"bytes": 0, "acks": 0, "closed": None}
        th = threading.Thread(target=_slow_reader, args=(raw, buf, qos, stop, stat), daemon=True)
        th.start()
        pub = ctx.conn(version=4)
        pcid = f"mpub{qos}{pqos}"
        pub.connect(pcid)
        ctx.note(f"workers_{qos}{pqos}", {"slow": ctx.where(cid), "pub": ctx.where(pcid)})
        res = windowed_publish(pub, topics, payload, pqos, None, window=50, duration=ctx.scale.secs(8.0),
                               rate=500, batch=5)
        if not pqos:
            res["ping_barrier_s"] = ping_barrier(pub, 120)
        res["slow_sub"] = dict(stat)
        ctx.note(f"publisher_{qos}{pqos}", res)
        stop.set()
        pub.close()
        th.join(3)
        raw.close()
        time.sleep(1.0)


def a6b_stuck_hash_qos1(ctx: Ctx) -> None:
    payload = b"m" * 100
    topics = [f"m/{i % 50}/{i}" for i in range(1000)]
    secs = ctx.scale.secs(8.0)
    ctx.phase(f"a6b.stuck_hash_sub_qos1_publish{secs:g}s")
    cid = ctx.cid("stuckhash-", 0)
    raw, _ = blocking_subscriber(ctx.port, cid, "#", 1, rcvbuf=4096, keepalive=60)
    t0 = time.monotonic()
    pub = ctx.conn(version=4)
    pcid = ctx.cid("spub-", 1)
    pub.connect(pcid)
    ctx.note("workers", {"stuck": ctx.where(cid), "pub": ctx.where(pcid)})
    res = windowed_publish(pub, topics, payload, 1, None, window=50, duration=secs, rate=500, batch=5)
    ctx.phase("a6b.after_publish_waiting")
    ctx.note("publisher", res)
    # the stuck client stays connected, its socket unread, while the bystander goes on
    while time.monotonic() - t0 < ctx.scale.stuck_hold:
        time.sleep(0.5)
    ctx.phase("a6b.stuck_client_closed")
    raw.close()
    pub.close()
    time.sleep(2)


def a7_wildcards(ctx: Ctx) -> None:
    payload = b"w" * 100
    ctx.phase("a7.subscribe_1client_10000_wildcards")
    got = {"n": 0}

    def count(c: Conn, topic: bytes, flags: int, size: int) -> None:
        got["n"] += 1

    s = ctx.conn(version=5, on_publish=count)
    s.connect("wsub1")
    t0 = time.monotonic()
    s.send(b"".join(w.subscribe(k + 1, [(f"x/+/y{k * 100 + j}/#", 0) for j in range(100)], proto=5)
                    for k in range(100)))
    s.wait(lambda: s.counts[w.SUBACK] >= 100, 120)
    ctx.note("sub1", {"worker": ctx.where("wsub1"), "subacks_s": round(time.monotonic() - t0, 3),
                      "codes": codes_of(s.codes)})
    pub = ctx.conn(version=4)
    pub.connect("wpub1")
    ctx.note("pub_worker", ctx.where("wpub1"))
    topics = [f"x/a/y{k}/z" for k in range(10000)]
    ctx.phase("a7.publish_2000ps_1client")
    res = windowed_publish(pub, topics, payload, 0, None, duration=ctx.scale.secs(8.0), rate=2000, batch=20)
    res["ping_barrier_s"] = ping_barrier(pub)
    res["sub_catchup_s"] = wait_quiet(lambda: got["n"], quiet=1.0, timeout=60, target=res["sent"])
    res["sub_received"] = got["n"]
    ctx.note("pub1", res)
    ctx.phase("a7.publish_unpaced_1client")
    before = got["n"]
    res = windowed_publish(pub, topics, payload, 0, None, duration=ctx.scale.secs(5.0), rate=None, batch=200)
    res["ping_barrier_s"] = ping_barrier(pub)
    res["sub_catchup_s"] = wait_quiet(lambda: got["n"], quiet=1.0, timeout=60, target=before + res["sent"])
    res["sub_received"] = got["n"] - before
    ctx.note("pub1_unpaced", res)
    s.close()
    nclients = ctx.scale.wildcard_clients
    ctx.phase(f"a7b.connect_{nclients}clients_x10")
    got2 = {"n": 0}

    def count2(c: Conn, topic: bytes, flags: int, size: int) -> None:
        got2["n"] += 1

    cs = []
    t0 = time.monotonic()
    for i in range(nclients):
        c = ctx.conn(version=4, on_publish=count2)
        c.send(w.connect(f"wcl{i}", keepalive=600)
               + w.subscribe(1, [(f"x/+/y{i * 10 + j}/#", 0) for j in range(10)]))
        cs.append(c)
    subscribed = wait_all(cs, lambda c: c.counts[w.SUBACK] >= 1, 60)
    workers = Counter(ctx.where(f"wcl{i}") for i in range(nclients))
    ctx.note("b_setup", {"s": round(time.monotonic() - t0, 2), "subscribed": subscribed,
                         "workers": {str(k): v for k, v in sorted(workers.items(), key=str)}})
    ctx.phase(f"a7b.publish_2000ps_{nclients}clients")
    res = windowed_publish(pub, topics, payload, 0, None, duration=ctx.scale.secs(8.0), rate=2000, batch=20)
    res["ping_barrier_s"] = ping_barrier(pub)
    expect = sum(1 for k in range(res["sent"]) if k % 10000 < nclients * 10)
    res["subs_expected"] = expect
    res["subs_catchup_s"] = wait_quiet(lambda: got2["n"], quiet=1.0, timeout=60, target=expect)
    res["subs_received"] = got2["n"]
    res["subs_closed"] = sum(1 for c in cs if c.closed_at is not None)
    ctx.note("pub_b", res)
    for c in cs:
        c.close()
    pub.close()


def a8_will_storm(ctx: Ctx) -> None:
    n = ctx.scale.will_clients
    wills: Counter[bytes] = Counter()

    def count(c: Conn, topic: bytes, flags: int, size: int) -> None:
        wills[topic] += 1

    sub = ctx.conn(version=5, on_publish=count)
    sub.connect("willsub1")
    sub.send(w.subscribe(1, [("will/#", 1)], proto=5))
    sub.wait(lambda: sub.counts[w.SUBACK] >= 1, 10)
    ctx.phase(f"a8.connect_{n}_with_will_persistent")
    cs = []
    t0 = time.monotonic()
    for i in range(n):
        v = 5 if i % 2 == 0 else 4
        c = ctx.conn(version=v)
        c.send(connect_packet(f"wc{i}", proto=v, clean=False, keepalive=600,
                              session_expiry=3600 if v == 5 else 0, will=(f"will/{i}", b"gone %d" % i, 1))
               + w.subscribe(1, [(f"own/{i}", 1)], proto=v))
        cs.append(c)
    ok = wait_all(cs, lambda c: c.counts[w.SUBACK] >= 1, 60)
    workers = Counter(ctx.where(f"wc{i}") for i in range(n))
    ctx.note("connect", {"clients": n, "subscribed": ok, "s": round(time.monotonic() - t0, 2),
                         "refused": sum(1 for c in cs if c.connack and c.connack[1] != 0),
                         "workers": {str(k): v for k, v in sorted(workers.items(), key=str)}})
    time.sleep(1.0)
    ctx.phase("a8.abort_all_at_once")
    for c in cs:
        c.abort()
    el = wait_quiet(lambda: len(wills), quiet=3.0, timeout=60, target=n)
    time.sleep(0.5)
    ctx.note("wills", {"distinct_received": len(wills), "duplicates": sum(v - 1 for v in wills.values()),
                       "seconds": el, "sub_closed": sub.close_err})
    # one message queued for each session while it is offline, then all reconnect
    ctx.phase(f"a8.reconnect_{n}_persistent")
    p = ctx.conn(version=4)
    p.connect("ownpub1")
    windowed_publish(p, [f"own/{i}" for i in range(n)], b"queued", 1, n, window=100, batch=20)
    p.close()
    cs = []
    t0 = time.monotonic()
    for i in range(n):
        v = 5 if i % 2 == 0 else 4
        c = ctx.conn(version=v)
        c.send(connect_packet(f"wc{i}", proto=v, clean=False, keepalive=600))
        cs.append(c)
    wait_all(cs, lambda c: c.connack is not None and c.counts[w.PUBLISH] >= 1, 30)
    ctx.note("reconnect", {"s": round(time.monotonic() - t0, 2),
                           "session_present": sum(1 for c in cs if c.connack and c.connack[0]),
                           "connack_ok": sum(1 for c in cs if c.connack and c.connack[1] == 0),
                           "got_queued_msg": sum(1 for c in cs if c.counts[w.PUBLISH] >= 1),
                           "closed": sum(1 for c in cs if c.closed_at is not None)})
    for c in cs:
        c.send(w.DISCONNECT_PACKET)
    time.sleep(1.0)
    for c in cs:
        c.close()
    sub.close()


ATTACKS: dict[str, Callable[[Ctx], None]] = {
    "a1": a1_retained, "a2": a2_substorm, "a3": a3_qos0_flood, "a4": a4_ping_flood, "a5": a5_large,
    "a6": a6_slow_hash, "a6b": a6b_stuck_hash_qos1, "a7": a7_wildcards, "a8": a8_will_storm,
}

# =====================================================================================
# The bystander (a process of its own)
# =====================================================================================


def _bystander_session(port: int, cid: str) -> w.Wire:
    c = w.Wire(port, cid, proto=5, timeout=10)
    if c.connack[1] != 0:
        c.close()
        raise RuntimeError(f"{cid}: CONNACK code {c.connack[1]}")
    c.sock.sendall(w.subscribe(1, [(f"by/{cid}", 1)], proto=5))
    while True:
        first, body = c.packet()
        if first >> 4 == w.SUBACK:
            if body[-1] >= 0x80:
                raise RuntimeError(f"{cid}: SUBACK code 0x{body[-1]:02x}")
            return c


def _round_trip(c: w.Wire, topic: str, body: bytes, pid: int, deadline: float) -> list[bytes]:
    """PUBLISH ``body`` at QoS 1, until both its PUBACK and the message itself came back;
    returns the other payloads that arrived meanwhile."""
    c.sock.sendall(w.publish(topic, body, qos=1, packet_id=pid, proto=5))
    acked = back = False
    others = []
    while not (acked and back):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{'no PUBACK' if not acked else 'PUBACK'}, "
                               f"{'message back' if back else 'message not back'}")
        c.sock.settimeout(left)
        first, pkt = c.packet()
        kind = first >> 4
        if kind == w.PUBACK and pkt[:2] == w.PID_BYTES[pid]:
            if len(pkt) > 2 and pkt[2] >= 0x80:
                raise RuntimeError(f"PUBACK reason 0x{pkt[2]:02x}")
            acked = True
        elif kind == w.PUBLISH:
            pos = 2 + ((pkt[0] << 8) | pkt[1])
            if (first >> 1) & 3:
                c.sock.sendall(w.puback(int.from_bytes(pkt[pos:pos + 2], "big")))
                pos += 2
            plen, pos = w.read_varint(pkt, pos)
            payload = pkt[pos + plen:]
            if payload == body:
                back = True
            else:
                others.append(payload)
        elif kind == w.DISCONNECT:
            raise RuntimeError(f"DISCONNECT from the broker, reason 0x{pkt[0] if pkt else 0:02x}")
    return others


def bystander_main(port: int, cids: list[str], conn: mpc.Connection) -> None:
    """One thread per client: QoS 1 round trips on its own topic, 10 ms apart. Sends
    ``("ready", None)`` (or ``("error", text)``), waits for a message on ``conn``, then sends
    ``("done", {"trips": [(client, start, ms)], "events": [(client, time, kind, text)]})``;
    times are ``time.monotonic()``, the same clock in every process."""
    trips: list[tuple[int, float, float]] = []
    events: list[tuple[int, float, str, str]] = []
    stop = threading.Event()
    ready = [threading.Event() for _ in cids]
    errors: list[str] = []

    def run(i: int, cid: str) -> None:
        topic = f"by/{cid}"
        try:
            c = _bystander_session(port, cid)
        except (OSError, RuntimeError, ValueError) as e:
            errors.append(f"{cid}: {e!r}")
            ready[i].set()
            return
        ready[i].set()
        n = pid = 0
        while not stop.is_set():
            n += 1
            pid = pid % 65535 + 1
            body = b"%d" % n
            t0 = time.monotonic()
            try:
                for other in _round_trip(c, topic, body, pid, t0 + BYSTANDER_TIMEOUT):
                    events.append((i, time.monotonic(), "unexpected",
                                   f"payload {other[:40]!r} while waiting for {body!r}"))
                trips.append((i, t0, (time.monotonic() - t0) * 1000))
            except (OSError, RuntimeError, ValueError) as e:
                ms = (time.monotonic() - t0) * 1000
                events.append((i, t0, "failed", f"{type(e).__name__}: {e} after {ms:.0f} ms"[:300]))
                c.sock.close()
                while not stop.is_set():
                    try:
                        c = _bystander_session(port, cid)
                        events.append((i, time.monotonic(), "reconnected", ""))
                        break
                    except (OSError, RuntimeError, ValueError) as e2:
                        events.append((i, time.monotonic(), "reconnect failed", repr(e2)[:300]))
                        stop.wait(0.5)
            stop.wait(0.01)
        c.close()

    threads = [threading.Thread(target=run, args=(i, cid), daemon=True) for i, cid in enumerate(cids)]
    for t in threads:
        t.start()
    for r in ready:
        r.wait(30)
    if errors or not all(r.is_set() for r in ready):
        stop.set()
        conn.send(("error", "; ".join(errors) or "bystander clients not connected after 30 s"))
        return
    conn.send(("ready", None))
    conn.recv()
    stop.set()
    for t in threads:
        t.join(BYSTANDER_TIMEOUT + 5)
    conn.send(("done", {"trips": list(trips), "events": list(events)}))


class Bystander:
    """The bystander process, seen from here."""

    def __init__(self, port: int, cids: list[str]) -> None:
        mpctx = mp.get_context("spawn")
        self.conn, child = mpctx.Pipe()
        self.proc = mpctx.Process(target=bystander_main, args=(port, cids, child), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            self.kill()
            raise HarnessError("the bystander did not start in 60 s")
        what, text = self.conn.recv()
        if what != "ready":
            self.kill()
            raise HarnessError(f"bystander: {text}")

    def finish(self) -> dict[str, Any]:
        self.conn.send("stop")
        if not self.conn.poll(BYSTANDER_TIMEOUT + 30):
            self.kill()
            raise HarnessError("the bystander did not report")
        _, data = self.conn.recv()
        self.proc.join(10)
        return dict(data)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


# =====================================================================================
# Brokers
# =====================================================================================


class HarnessError(Exception):
    """The harness could not run an attack (a broker or the bystander did not start)."""


class _Serve(ServeBroker):
    """``loadtests.connect_cost``'s ``serve`` process, also keeping its warning and error lines
    (stamped when read) and its last lines."""

    def __init__(self, python: str, workers: int, data: Path, log_level: str) -> None:
        self.bad: list[tuple[float, str]] = []
        self.last: deque[str] = deque(maxlen=20)
        super().__init__(python, workers, data, log_level)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines += 1
            line = raw.decode(errors="replace").rstrip()
            self.last.append(line)
            if SB_BAD_LINE.search(line):
                self.bad.append((time.monotonic(), line))
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(1))
            if "ready:" in line:
                self._ready.set()


class _Tail(threading.Thread):
    """Follows a log file: the lines matching ``pattern``, stamped when read."""

    def __init__(self, path: Path, pattern: re.Pattern[str], into: list[tuple[float, str]]) -> None:
        super().__init__(daemon=True)
        self.path, self.pattern, self.into = path, pattern, into
        self.lines = 0
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        rest = b""
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    if self.halt.is_set():
                        return
                    self.halt.wait(0.2)
                    continue
                *lines, rest = (rest + chunk).split(b"\n")
                now = time.monotonic()
                for raw in lines:
                    self.lines += 1
                    line = raw.decode(errors="replace").rstrip()
                    if self.pattern.search(line):
                        self.into.append((now, line))

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


class Target:
    """A broker started for one attack: port, processes, log lines, liveness."""

    def __init__(self, kind: str, workers: int, python: str, log_level: str | None) -> None:
        self.kind = kind
        self.bad: list[tuple[float, str]] = []
        self._serve: _Serve | None = None
        self._mosq: bench.Broker | None = None
        self._tail: _Tail | None = None
        self._data: str | None = None
        if kind == "shardbroker":
            self.workers = self.placements = workers
            self._data = tempfile.mkdtemp(prefix="hostile-sb-")
            try:
                self._serve = _Serve(python, workers, Path(self._data) / "data", log_level or "info")
            except OSError as e:
                self.stop()
                raise HarnessError(f"ShardBroker did not start: {e}") from e
            if not self._serve.wait_ready(60):
                last = "\n".join(self._serve.last)
                self.stop()
                raise HarnessError(f"ShardBroker did not become ready:\n{last}")
            self.bad = self._serve.bad
            self.port, self.pid = self._serve.port, self._serve.proc.pid
        else:
            self.workers, self.placements = 0, 2
            try:
                self._mosq = bench.Broker.mosquitto("mosquitto", persistence=False, proto=4, timeout=30)
            except (RuntimeError, OSError) as e:
                raise HarnessError(f"Mosquitto did not start: {e}") from e
            assert self._mosq.errlog is not None and self._mosq.pid is not None
            self._tail = _Tail(self._mosq.errlog, MOSQ_BAD_LINE, self.bad)
            self.port, self.pid = self._mosq.port, self._mosq.pid
        self.roles_at_start = self.roles()

    @property
    def label(self) -> str:
        return f"ShardBroker ({self.workers} workers)" if self.workers else "Mosquitto"

    def placement_names(self) -> list[str]:
        return [f"w{i}" for i in range(self.placements)] if self.workers else ["#1", "#2"]

    def rss_kb(self) -> int:
        return bench.tree_rss_kb(self.pid) or 0

    def roles(self) -> dict[str, int]:
        return children(self.pid) if self.workers else {"mosquitto": self.pid}

    def log_lines(self) -> int:
        if self._serve is not None:
            return self._serve.lines
        return self._tail.lines if self._tail is not None else 0

    def health(self) -> list[str]:
        """What is wrong with the broker now: an exited or restarted process, a placement that
        does not accept a CONNECT. Empty if nothing."""
        proc = self._serve.proc if self._serve is not None else (self._mosq.proc if self._mosq else None)
        if proc is None or proc.poll() is not None:
            return [f"the broker exited with status {proc.returncode if proc else None}"]
        out = []
        now = self.roles()
        for role, pid in self.roles_at_start.items():
            if now.get(role) != pid:
                out.append(f"{role} (pid {pid}) is gone" + (f", now pid {now[role]}" if role in now else ""))
        for cid in bench.ids_for_shards("hostile-alive-", self.placements):
            if not bench.probe("127.0.0.1", self.port, cid, 4, timeout=5.0):
                where = f" (worker {shard_for(cid, self.workers)})" if self.workers else ""
                out.append(f"no CONNACK for {cid}{where}")
        return out

    def stop(self) -> int | None:
        """Stop the broker (SIGTERM); its exit status."""
        rc = None
        if self._serve is not None:
            self._serve.stop()
            rc = self._serve.proc.returncode
        if self._mosq is not None:
            proc = self._mosq.proc
            self._mosq.stop()
            rc = proc.returncode if proc is not None else None
        if self._tail is not None:
            self._tail.stop()
        if self._data:
            shutil.rmtree(self._data, ignore_errors=True)
            self._data = None
        return rc


# =====================================================================================
# One attack: broker, bystander, baselines, figures
# =====================================================================================


def _place_stats(trips: list[tuple[int, float, float]], events: list[tuple[int, float, str, str]],
                 place: int, start: float, end: float) -> dict[str, Any]:
    xs = sorted(ms for i, t0, ms in trips if i == place and start <= t0 < end)
    done = sorted(t0 + ms / 1000 for i, t0, ms in trips if i == place and start <= t0 + ms / 1000 < end)
    points = [start, *done, end]
    return {"n": len(xs), "p50_ms": round(pct(xs, 0.5), 2), "p99_ms": round(pct(xs, 0.99), 2),
            "max_ms": round(xs[-1], 1) if xs else None, "over_100ms": sum(1 for x in xs if x > SLOW_MS),
            "gap_ms": round(max(b - a for a, b in itertools.pairwise(points)) * 1000),
            "failed": sum(1 for i, t, kind, _ in events
                          if i == place and kind == "failed" and start <= t < end)}


def run_attack(name: str, args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    res: dict[str, Any] = {"attack": name, "broker": args.broker, "error": None, "harness_error": None,
                           "problems": []}
    print(f"=== {name} ===", flush=True)
    try:
        target = Target(args.broker, args.workers, args.python, args.log_level)
    except HarnessError as e:
        res["harness_error"] = str(e)
        print(f"  could not start the broker: {e}", flush=True)
        return res
    res["target"] = target.label
    reactor: Reactor | None = None
    by: Bystander | None = None
    samples: list[tuple[float, int]] = []
    halt = threading.Event()

    def sample() -> None:
        while not halt.is_set():
            samples.append((time.monotonic(), target.rss_kb()))
            halt.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    ran = False
    try:
        cids = bench.ids_for_shards("bystander-", target.placements)
        res["bystanders"] = dict(zip(target.placement_names(), cids, strict=True))
        print(f"  {target.label} on port {target.port}; bystander clients: "
              + ", ".join(f"{p} {c}" for p, c in res["bystanders"].items())
              + ("" if target.workers else " (one process: no worker placement, two identical clients)"),
              flush=True)
        by = Bystander(target.port, cids)
        reactor = Reactor()
        ctx = Ctx(target, reactor, scale)
        sampler.start()
        time.sleep(0.5)
        ctx.phase("baseline_before")
        time.sleep(scale.baseline)
        t_attack = time.monotonic()
        try:
            ATTACKS[name](ctx)
        except Exception:  # noqa: BLE001 - reported, and the broker is checked all the same
            res["error"] = traceback.format_exc()
            print(res["error"], flush=True)
        t_attack_end = time.monotonic()
        reactor.close_all()
        ctx.phase("baseline_after")
        time.sleep(scale.baseline)
        t_end = time.monotonic()
        rss_end = target.rss_kb()
        data = by.finish()
        by = None
        ran = True
    except HarnessError as e:
        res["harness_error"] = str(e)
        print(f"  {e}", flush=True)
        return res
    finally:
        halt.set()
        if sampler.is_alive():
            sampler.join(2)
        if reactor is not None:
            reactor.stop()
        if by is not None:
            by.kill()
        if not ran:
            target.stop()
    res["problems"] = target.health()
    res["log_lines"] = target.log_lines()
    res["exit_status"] = target.stop()
    trips, events = data["trips"], data["events"]
    bounds = [(p[0], p[1], p[2], ctx.phases[k + 1][1] if k + 1 < len(ctx.phases) else t_end,
               ctx.phases[k + 1][2] if k + 1 < len(ctx.phases) else rss_end)
              for k, p in enumerate(ctx.phases)]
    first_step = next((k for k, b in enumerate(bounds) if b[0] != "baseline_before"), len(bounds) - 1)
    after = next((b for b in bounds if b[0] == "baseline_after"), bounds[-1])
    bounds.append(("attack (all)", t_attack, bounds[first_step][2], t_attack_end, after[2]))
    phases = []
    for pname, start, rss0, end, rss1 in bounds:
        peak = max([rss0, rss1, *(kb for t, kb in samples if start <= t < end)])
        phases.append({"phase": pname, "secs": round(end - start, 2),
                       "placements": {p: _place_stats(trips, events, k, start, end)
                                      for k, p in enumerate(target.placement_names())},
                       "rss_mb": [round(rss0 / 1024, 1), round(peak / 1024, 1), round(rss1 / 1024, 1)],
                       "log_bad": sum(1 for t, _ in target.bad if start <= t < end)})
    res.update(phases=phases, notes=ctx.notes, bystander_events=events,
               failed_round_trips=sum(1 for e in events if e[2] == "failed"),
               log_bad_count=len(target.bad), log_bad_lines=[line for _, line in target.bad[:100]],
               round_trips=len(trips))
    print_result(res)
    return res


def print_result(res: dict[str, Any]) -> None:
    head = ["phase", "secs", "place", "n", "p50 ms", "p99 ms", "max ms", ">100ms", "gap ms", "failed",
            "RSS MB start/peak/end", "log"]
    rows = []
    for ph in res["phases"]:
        for k, (p, st) in enumerate(ph["placements"].items()):
            first = k == 0
            rows.append([ph["phase"] if first else "", f"{ph['secs']:.1f}" if first else "", p, str(st["n"]),
                         f"{st['p50_ms']:.2f}", f"{st['p99_ms']:.2f}",
                         "-" if st["max_ms"] is None else f"{st['max_ms']:.1f}", str(st["over_100ms"]),
                         str(st["gap_ms"]), str(st["failed"]),
                         " / ".join(f"{v:.0f}" for v in ph["rss_mb"]) if first else "",
                         str(ph["log_bad"]) if first else ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(wd) if i in (0, 2, 10) else c.rjust(wd)
                         for i, (c, wd) in enumerate(zip(cells, widths, strict=True)))

    print(f"--- {res['attack']} on {res['target']}: {res['round_trips']} bystander round trips, "
          f"{res['failed_round_trips']} failed; broker log: {res['log_lines']} lines, "
          f"{res['log_bad_count']} warnings/errors; stopped with status {res['exit_status']}")
    print(fmt(head))
    for r in rows:
        print(fmt(r).rstrip())
    if res["problems"]:
        print("  BROKER DIED OR UNREACHABLE: " + "; ".join(res["problems"]))
    if res["error"]:
        print("  the attack stopped on an exception (above)")
    for line in res["log_bad_lines"][:15]:
        print("  log:", line[:240])
    if res["log_bad_count"] > 15:
        print(f"  log: ... {res['log_bad_count'] - 15} more")
    shown = [e for e in res["bystander_events"] if e[2] != "reconnected"][:10]
    for place, t, kind, text in shown:
        print(f"  bystander {list(res['bystanders'])[place]}: {kind}: {text}")
    print(flush=True)


# =====================================================================================
# Main
# =====================================================================================


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.hostile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", action="append", choices=list(ATTACKS), help="run this attack (repeatable); "
                    "default: all")
    ap.add_argument("--broker", choices=("shardbroker", "mosquitto"), default="shardbroker")
    ap.add_argument("--workers", type=int, default=2, help="ShardBroker --workers (default 2)")
    ap.add_argument("--quick", action="store_true", help="short phases and smaller attacks: a smoke run")
    ap.add_argument("--json", metavar="FILE", help="also write the figures, notes and log lines as JSON")
    ap.add_argument("--log-level", default=None, help="ShardBroker's --log-level (default: its own, info)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ShardBroker")
    args = ap.parse_args(argv)
    if args.broker == "mosquitto" and not Path(bench.MOSQUITTO).exists():
        print(f"{bench.MOSQUITTO} not found", file=sys.stderr)
        return 2
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    bench._raise_nofile()
    scale = QUICK if args.quick else FULL
    results = []
    try:
        for name in args.attack or list(ATTACKS):
            try:
                results.append(run_attack(name, args, scale))
            except Exception as e:  # noqa: BLE001 - the harness failed: reported, exit status 2
                traceback.print_exc()
                results.append({"attack": name, "broker": args.broker, "error": None, "problems": [],
                                "harness_error": f"{type(e).__name__}: {e}"})
    finally:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"broker": args.broker, "workers": args.workers,
                                                   "quick": args.quick, "attacks": results}, indent=1) + "\n")
    print("summary:")
    status = 0
    for r in results:
        if r["harness_error"]:
            verdict = f"not run: {r['harness_error'].splitlines()[0]}"
        else:
            bits = ["broker DIED OR UNREACHABLE: " + "; ".join(r["problems"])
                    if r["problems"] else "broker up"]
            bits.append(f"{r['failed_round_trips']} failed bystander round trips")
            if r["error"]:
                bits.append("attack stopped on an exception")
            verdict = ", ".join(bits)
        print(f"  {r['attack']:4s} {verdict}")
        if r.get("problems") or r.get("failed_round_trips"):
            status = 1
        elif status == 0 and (r["harness_error"] or r["error"]):
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
