"""Crash test: acknowledged QoS 1/2 messages survive SIGKILL of any broker process.

    python -m loadtests.crash [--cycles 100] [--workers 4] [--seconds-per-cycle 1.5]
                              [--seed N] [--json FILE] [--rate 100] [--kills worker,tree,...]
                              [--early-kills 0.2] [--layout split|spread] [--keep]

The promise under test (README, "Durability", mode ``fsync``): a QoS 1/2 message that
the broker acknowledged to its publisher (PUBACK for QoS 1, PUBREC for QoS 2) reaches
every persistent subscriber (3.1.1 clean session 0, 5.0 Session Expiry Interval > 0)
subscribed before it was published, whatever broker process is killed with SIGKILL and
whenever; QoS 2 exactly once; per publisher and topic, in order.

What it does
  * starts the broker (``python -m shardbroker.cli.main serve``, through ``tests/conftest.Broker``)
    on a fresh data directory, with the session queue limits raised so that no message
    is dropped by the queue-full policy (that is a documented policy, not a crash);
  * subscribers (persistent, each subscribed QoS 2 to ``crash/#``; 3.1.1 and 5.0 mixed):
    some stay connected, some disconnect and come back (short or long absences);
  * publishers (persistent sessions too, 3.1.1 and 5.0, QoS 1 and QoS 2 mixed), each on
    its own topic ``crash/<name>`` with a payload ``<name>,<seq>,``; by default the
    subscribers are on the lower half of the shards and the publishers on the upper
    half, so every message crosses shards (``--layout spread`` mixes both);
  * each cycle: wait until every process is up and every client connected, run the load
    for a random time, then SIGKILL one of: a random worker, the acceptor, or the whole
    process tree (killpg, then a restart on the same data directory and port). The
    supervisor restarts a killed worker or acceptor by itself. A share of the kills
    (``--early-kills``) come shortly after the previous one, before recovery;
  * clients reconnect with their session (clean session 0 / clean start 0 with expiry).
    Publishers resend what was not acknowledged, in order, with DUP and the same packet
    id (PUBREL for a QoS 2 message that had its PUBREC). Subscribers acknowledge all
    (QoS 2: PUBREC, and PUBCOMP on PUBREL) and keep, like any QoS 2 receiver, the packet
    ids awaiting PUBREL across reconnects: a PUBLISH arriving again with such an id is
    the same message resent by the protocol, not a second delivery;
  * at the end: publishing stops, publishers finish their flows, every subscriber comes
    back and drains (until complete, or no progress for 12 s, at most 180 s), the broker
    is stopped, and the results are checked.

Checks, per subscriber
  lost          acknowledged to its publisher, never delivered;
  qos2 dup      a QoS 2 message delivered twice (a second PUBLISH of the same
                (publisher, seq) that is not a protocol resend of a packet id still
                awaiting PUBREL);
  qos1 dup      a QoS 1 message delivered more than once (allowed, counted);
  out of order  the first delivery of a (publisher, seq) that is lower than a seq of
                that publisher already delivered (later copies of a message are
                duplicates, not ordering errors);
  and also: sessions found missing at reconnect (CONNACK session present 0), a broker
  packet id reused while still awaiting PUBREL, deliveries of unknown messages.

Exit status: 0 all good; 1 an acknowledged message was lost, a QoS 2 message
duplicated, an ordering violation (or a lost session / reused packet id); 2 the
harness could not run (the broker would not start or come back).

Every wait is bounded; all traffic goes to 127.0.0.1. ``run()`` is the API used by
``tests/integration/test_11_crash.py``. ``loadtests/cluster_crash.py`` runs the same clients
and checks over a cluster by overriding the harness's view of the broker (``make_brokers``,
``address_for``, ``setup_client``, ``processes_up``, ``note``, ``alive``, ``tail``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import mqttbytes as mb  # tests/mqttbytes.py: independent of the broker's codec
from conftest import Broker, client_id_on_shard, pid_alive

KILL_KINDS = ("worker", "acceptor", "tree")
TOPIC_PREFIX = "crash/"
SESSION_EXPIRY = 3600
CONNACK_TIMEOUT = 3.0
PAYLOAD_SIZE = 32

# Enough that no queue in this test is ever full: a drop by the queue-full policy is a
# documented policy, and would show up here as a loss.
BROKER_CONFIG = """\
[limits]
max_queued_messages = 10000000
max_queued_bytes = 1099511627776
"""

# client connection states
DOWN, TCP, CONNACK, UP, CLOSING = "down", "tcp", "connack", "up", "closing"


@dataclass
class Options:
    cycles: int = 100
    workers: int = 4
    seconds_per_cycle: float = 1.5
    seed: int | None = None
    rate: float = 100.0  # messages/s per publisher
    window: int = 10  # unacknowledged QoS 1/2 publishes per publisher
    subscribers: int = 4
    publishers: int = 4
    layout: str = "split"  # split: subscribers and publishers on disjoint shards; spread
    kills: list[str] | None = None  # fixed sequence of kill kinds (cycled); None: random
    early_kill_ratio: float = 0.0  # share of kills made while still recovering from the last one
    recover_timeout: float = 20.0  # per cycle: processes up and clients connected
    finish_timeout: float = 10.0  # publishers completing their flows at the end
    drain_idle: float = 12.0  # end the drain after this long without progress (> the 5 s resend)
    drain_timeout: float = 180.0  # and in any case after this long
    keep: bool = False  # keep the data directory and log
    verbose: bool = True


# ---------------------------------------------------------------------------
# The broker: tests/conftest.Broker, with pid handling that is safe against pid reuse


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[2]) if rest[0] not in ("Z", "X") else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


class CrashBroker(Broker):
    """``conftest.Broker`` whose straggler kill only ever touches processes still in the
    broker's own process group: over many restarts a remembered pid may be reused by an
    unrelated process (pid_max can be 32768)."""

    def _remember_pids(self) -> None:
        if self.proc is None:
            return
        pg = self.proc.pid
        self._seen_pids = {p for p in self._seen_pids if _pgid(p) == pg}
        if self.proc.poll() is None:
            self._seen_pids.update(self.descendant_pids())

    def _kill_group(self) -> None:
        assert self.proc is not None
        pg = self.proc.pid
        try:
            os.killpg(pg, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in list(self._seen_pids):
            if pid != pg and _pgid(pid) == pg:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._seen_pids = {p for p in self._seen_pids if _pgid(p) == pg}
        self._wait_children_gone(timeout=3)

    def acceptor_pid(self) -> int | None:
        for pid in self.descendant_pids():
            if "shardbroker.process.child acceptor" in _cmdline(pid):
                return pid
        return None

    def run_dir(self) -> str | None:
        """The supervisor's private run directory (sockets), from a child's command line."""
        for pid in self.descendant_pids():
            args = _cmdline(pid).split()
            if "--run-dir" in args[:-1]:
                return args[args.index("--run-dir") + 1]
        return None

    def note(self, text: str) -> None:
        """A harness line in the broker log, timestamped like the broker's own."""
        self._log(f"{_stamp(time.time())} --- crash harness: {text} ---")


def _stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) + f",{int(wall * 1000) % 1000:03d}"


# ---------------------------------------------------------------------------
# Non-blocking MQTT clients, all driven by one selector loop


class Client:
    role = "client"

    def __init__(self, h: Harness, name: str, cid: str, shard: int, version: int) -> None:
        self.h = h
        self.name = name
        self.cid = cid
        self.shard = shard
        self.version = version
        self.sock: socket.socket | None = None
        self.state = DOWN
        self.mask = 0
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.deadline = 0.0
        self.next_attempt = 0.0
        self.want_online = True
        self.epoch = 0  # successful connections so far
        self.attempts = 0
        self.failures: dict[str, int] = {}
        self.sessions_lost = 0
        self.shutdown_after_flush = False

    # -- connection ---------------------------------------------------------

    def connect_packet(self) -> bytes:
        if self.version == 5:
            return mb.connect(self.cid, version=5, clean=False, keepalive=0,
                              props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, SESSION_EXPIRY))
        return mb.connect(self.cid, version=4, clean=False, keepalive=0)

    def start_connect(self, now: float) -> None:
        self.attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(self.h.address_for(self))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._count_failure(errno.errorcode.get(err, str(err)))
            self.next_attempt = now + 0.1
            return
        self.sock = s
        self.state = TCP
        self.deadline = now + CONNACK_TIMEOUT
        self.inbuf.clear()
        self.outbuf.clear()
        self.shutdown_after_flush = False
        self.mask = selectors.EVENT_WRITE
        self.h.sel.register(s, self.mask, self)

    def _count_failure(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    def _set_mask(self) -> None:
        if self.sock is None:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        if self.state == TCP:
            want = selectors.EVENT_WRITE
        if want != self.mask:
            self.mask = want
            self.h.sel.modify(self.sock, want, self)

    def drop(self, now: float, why: str) -> None:
        """The connection is gone (or given up)."""
        if self.sock is not None:
            try:
                self.h.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        was = self.state
        self.state = DOWN
        self.mask = 0
        self.outbuf.clear()
        self.inbuf.clear()
        if was != CLOSING:
            self._count_failure(why)
        self.next_attempt = now + 0.05 + self.h.rng.random() * 0.1
        self.on_down(now)

    def disconnect(self, now: float) -> None:
        """A clean DISCONNECT: nothing received after it is processed (the broker resends
        what we did not acknowledge when we come back)."""
        if self.state != UP:
            return
        self.send(mb.disconnect(self.version))
        self.state = CLOSING
        self.deadline = now + 1.0
        self.shutdown_after_flush = True
        self._flush_out(now)

    def send(self, data: bytes) -> None:
        self.outbuf += data

    def _flush_out(self, now: float) -> None:
        if self.sock is None:
            return
        if self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
                del self.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self.drop(now, f"send: {e.__class__.__name__}")
                return
        if not self.outbuf and self.shutdown_after_flush:
            self.shutdown_after_flush = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._set_mask()

    def on_event(self, now: float, mask: int) -> None:
        if self.sock is None:
            return
        if self.state == TCP:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.drop(now, errno.errorcode.get(err, str(err)))
                return
            self.state = CONNACK
            self.send(self.connect_packet())
            self._flush_out(now)
            return
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                self.drop(now, f"recv: {e.__class__.__name__}")
                return
            if data is not None:
                if not data:
                    self.drop(now, "EOF" if self.state != CONNACK else "EOF before CONNACK")
                    return
                if self.state != CLOSING:
                    self.inbuf += data
                    self._parse(now)
                    if self.sock is None:
                        return
        if self.sock is not None and (self.outbuf or self.shutdown_after_flush):
            self._flush_out(now)

    def _parse(self, now: float) -> None:
        buf = self.inbuf
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            length = 0
            mult = 1
            p = pos + 1
            complete = False
            while p < n and p <= pos + 4:
                byte = buf[p]
                length += (byte & 0x7F) * mult
                p += 1
                if not byte & 0x80:
                    complete = True
                    break
                mult *= 128
            if not complete:
                if p > pos + 4:
                    self.drop(now, "malformed remaining length")
                    return
                break
            if n < p + length:
                break
            first = buf[pos]
            body = bytes(buf[p:p + length])
            pos = p + length
            self._packet(now, first >> 4, first & 0x0F, body)
            if self.sock is None:
                return
        if pos:
            del buf[:pos]

    def _packet(self, now: float, ptype: int, flags: int, body: bytes) -> None:
        if self.state == CONNACK:
            if ptype != mb.CONNACK:
                self.drop(now, f"{mb.PACKET_NAMES.get(ptype, ptype)} before CONNACK")
                return
            ack = mb.parse_connack(body, self.version)
            if ack.rc != 0:
                self.drop(now, f"CONNACK rc {ack.rc:#x}")
                return
            self.state = UP
            self.epoch += 1
            if not ack.session_present:
                self.sessions_lost += 1
                self.h.event(now, "session-lost", f"{self.name} ({self.cid}): CONNACK session present 0")
            self.on_up(now, ack)
            return
        if self.state == UP:
            self.on_packet(now, ptype, flags, body)

    def tick(self, now: float) -> None:
        if self.state == DOWN:
            if self.want_online and now >= self.next_attempt and self.h.broker_up:
                self.start_connect(now)
        elif self.state in (TCP, CONNACK) and now >= self.deadline:
            self.drop(now, "connect timeout")
        elif self.state == CLOSING and now >= self.deadline:
            self.drop(now, "closing")
        if self.outbuf and self.sock is not None and self.state != TCP:
            self._flush_out(now)

    # -- role hooks -----------------------------------------------------------

    def on_up(self, now: float, ack: mb.ConnAck) -> None:
        pass

    def on_down(self, now: float) -> None:
        pass

    def on_packet(self, now: float, ptype: int, flags: int, body: bytes) -> None:
        pass

    @property
    def connected(self) -> bool:
        return self.state == UP


@dataclass
class Outgoing:
    seq: int
    pid: int
    state: str  # "sent" (awaiting PUBACK / PUBREC) or "rel" (QoS 2, awaiting PUBCOMP)
    t_sent: float


class Publisher(Client):
    role = "publisher"

    def __init__(self, h: Harness, name: str, cid: str, shard: int, version: int, qos: int) -> None:
        super().__init__(h, name, cid, shard, version)
        self.qos = qos
        self.topic = TOPIC_PREFIX + name
        self.next_seq = 1
        self.next_pid = 0
        self.inflight: dict[int, Outgoing] = {}  # pid -> message, in send order
        self.acked: dict[int, tuple[float, int, int]] = {}  # seq -> (time, reason, cycle)
        self.refused: dict[int, int] = {}  # seq -> reason >= 0x80
        self.window = h.opts.window
        self.next_at = 0.0
        self.interval = 1.0 / h.opts.rate if h.opts.rate > 0 else 0.0
        self.resent = 0
        self.no_subscribers = 0  # 5.0 reason 0x10 on an acknowledgement

    def _payload(self, seq: int) -> bytes:
        return f"{self.name},{seq},".encode().ljust(PAYLOAD_SIZE, b".")

    def _alloc_pid(self) -> int:
        for _ in range(65535):
            self.next_pid = self.next_pid % 65535 + 1
            if self.next_pid not in self.inflight:
                return self.next_pid
        raise RuntimeError("no free packet id")

    def on_up(self, now: float, ack: mb.ConnAck) -> None:
        rm = ack.props.get(mb.RECEIVE_MAXIMUM) if self.version == 5 else None
        self.window = min(self.h.opts.window, rm or 65535)
        # resend in the original order [MQTT-4.4.0-1]
        for out in sorted(self.inflight.values(), key=lambda o: o.seq):
            if out.state == "rel":
                self.send(mb.pubrel(out.pid, self.version))
            else:
                self.send(mb.publish(self.topic, self._payload(out.seq), qos=self.qos, dup=True,
                                     pid=out.pid, version=self.version))
                self.resent += 1
        self.next_at = max(self.next_at, now)

    def publish_due(self, now: float) -> None:
        if self.state != UP or not self.h.publishing:
            return
        while len(self.inflight) < self.window and now >= self.next_at:
            seq = self.next_seq
            self.next_seq += 1
            pid = self._alloc_pid()
            self.inflight[pid] = Outgoing(seq, pid, "sent", now)
            self.send(mb.publish(self.topic, self._payload(seq), qos=self.qos, pid=pid, version=self.version))
            self.h.sent += 1
            self.next_at = max(self.next_at + self.interval, now - 0.2)
            if not self.interval:
                break

    def on_packet(self, now: float, ptype: int, flags: int, body: bytes) -> None:
        if ptype in (mb.PUBACK, mb.PUBREC, mb.PUBCOMP):
            ack = mb.parse_ack(body, self.version)
            out = self.inflight.get(ack.pid)
            if out is None:
                self.h.stray_acks += 1
                return
            if ptype == mb.PUBACK and self.qos == 1:
                self._acked(now, out, ack.reason)
                del self.inflight[ack.pid]
            elif ptype == mb.PUBREC and self.qos == 2:
                if ack.reason >= 0x80:
                    self.refused[out.seq] = ack.reason
                    del self.inflight[ack.pid]
                    return
                self._acked(now, out, ack.reason)
                out.state = "rel"
                self.send(mb.pubrel(ack.pid, self.version))
            elif ptype == mb.PUBCOMP and self.qos == 2 and out.state == "rel":
                del self.inflight[ack.pid]
            else:
                self.h.stray_acks += 1

    def _acked(self, now: float, out: Outgoing, reason: int) -> None:
        if reason >= 0x80:
            self.refused[out.seq] = reason
            return
        if reason == 0x10:
            self.no_subscribers += 1
        if out.seq not in self.acked:
            self.acked[out.seq] = (now, reason, self.h.cycle)


class Subscriber(Client):
    role = "subscriber"

    def __init__(self, h: Harness, name: str, cid: str, shard: int, version: int, kind: str) -> None:
        super().__init__(h, name, cid, shard, version)
        self.kind = kind  # online | flappy | sleeper
        self.pending: dict[int, tuple[str, int]] = {}  # QoS 2 pids awaiting PUBREL -> message
        self.first: dict[tuple[str, int], tuple[float, int, int, bool, int]] = {}  # -> (t, epoch, qos, dup, cycle)
        self.max_seq: dict[str, int] = {}
        self.deliveries = 0
        self.qos1_dups = 0
        self.qos2_resends = 0  # same pid while awaiting PUBREL: the protocol's own resend
        self.qos2_dups: list[dict[str, Any]] = []
        self.out_of_order: list[dict[str, Any]] = []
        self.pid_reuse: list[dict[str, Any]] = []
        self.qos_mismatch = 0
        self.unknown = 0
        self.phase_end = 0.0

    def on_up(self, now: float, ack: mb.ConnAck) -> None:
        if not ack.session_present:
            self.pending.clear()  # no session: the broker forgot our QoS 2 state [MQTT-4.4.0-1]
        self.phase_end = now + self._online_time()

    def _online_time(self) -> float:
        r = self.h.rng
        return {"online": 1e9, "flappy": r.uniform(0.3, 1.2), "sleeper": r.uniform(1.0, 2.5)}[self.kind]

    def _offline_time(self) -> float:
        r = self.h.rng
        return {"online": 0.0, "flappy": r.uniform(0.1, 0.8), "sleeper": r.uniform(1.5, 4.0)}[self.kind]

    def tick(self, now: float) -> None:
        if self.kind != "online" and not self.h.draining:
            if self.state == UP and now >= self.phase_end:
                self.disconnect(now)
                self.want_online = False
                self.phase_end = now + self._offline_time()
            elif self.state == DOWN and not self.want_online and now >= self.phase_end:
                self.want_online = True
        super().tick(now)

    def on_packet(self, now: float, ptype: int, flags: int, body: bytes) -> None:
        if ptype == mb.PUBLISH:
            p = mb.parse_publish(flags, body, self.version)
            try:
                pub, seq_s, _ = p.payload.split(b",", 2)
                key = (pub.decode(), int(seq_s))
            except ValueError:
                self.unknown += 1
                key = None
            if p.qos == 2:
                assert p.pid is not None
                prev = self.pending.get(p.pid)
                self.send(mb.pubrec(p.pid, self.version))
                if prev is not None:
                    if prev == key:
                        self.qos2_resends += 1
                        return
                    self.pid_reuse.append({"pid": p.pid, "awaiting_pubrel_for": list(prev),
                                           "got": list(key) if key else None, "t": now,
                                           "cycle": self.h.cycle, "dup": p.dup})
                if key is not None:
                    self.pending[p.pid] = key
            elif p.qos == 1:
                assert p.pid is not None
                self.send(mb.puback(p.pid, self.version))
            if key is not None:
                self._record(now, key, p)
        elif ptype == mb.PUBREL:
            pid = mb.parse_ack(body, self.version).pid
            self.pending.pop(pid, None)
            self.send(mb.pubcomp(pid, self.version))

    def _record(self, now: float, key: tuple[str, int], p: mb.Publish) -> None:
        self.deliveries += 1
        pub, seq = key
        publisher = self.h.pubs_by_name.get(pub)
        if publisher is None or seq >= publisher.next_seq:
            self.unknown += 1
            return
        if p.qos != min(publisher.qos, 2):
            self.qos_mismatch += 1
        if key in self.first:
            if p.qos == 2:
                t0, ep0, _, dup0, c0 = self.first[key]
                self.qos2_dups.append({"publisher": pub, "seq": seq, "pid": p.pid, "dup": p.dup, "t": now,
                                       "cycle": self.h.cycle, "epoch": self.epoch,
                                       "first": {"t": t0, "epoch": ep0, "dup": dup0, "cycle": c0}})
            else:
                self.qos1_dups += 1
            return
        self.first[key] = (now, self.epoch, p.qos, p.dup, self.h.cycle)
        top = self.max_seq.get(pub, 0)
        if seq < top:
            self.out_of_order.append({"publisher": pub, "seq": seq, "after": top, "pid": p.pid,
                                      "dup": p.dup, "t": now, "cycle": self.h.cycle, "epoch": self.epoch})
        else:
            self.max_seq[pub] = seq


# ---------------------------------------------------------------------------
# The harness


class _Stuck(Exception):
    """The drain made no progress for ``Options.drain_idle`` seconds."""


class HarnessError(RuntimeError):
    """The broker would not start or come back: no verdict on the promise."""


@dataclass
class Kill:
    cycle: int
    kind: str
    target: str
    pid: int
    t: float  # monotonic
    wall: float
    early: bool = False  # made before the broker had recovered from the previous kill
    recovered_after: float | None = None


@dataclass
class Result:
    ok: bool
    exit_code: int
    summary: dict[str, Any]
    subscribers: list[dict[str, Any]]
    publishers: list[dict[str, Any]]
    kills: list[dict[str, Any]]
    violations: dict[str, Any]
    events: list[dict[str, Any]]
    error: str | None = None
    log_path: str | None = None

    def describe(self) -> str:
        s = self.summary
        lines = [
            (f"seed {s.get('seed')}: {s.get('cycles_done')} cycles, kills {s.get('kills')}, "
             f"{s.get('acked')} messages acknowledged ({s.get('sent')} sent)"),
            (f"lost {s.get('lost')}, qos2 duplicates {s.get('qos2_dups')}, "
             f"out of order {s.get('out_of_order')}, qos1 duplicates {s.get('qos1_dups')}, "
             f"sessions lost {s.get('sessions_lost')}, pid reuse {s.get('pid_reuse')}"),
        ]
        if self.error:
            lines.append(f"harness error: {self.error}")
        for kind, items in self.violations.items():
            if items:
                lines.append(f"{kind}: {json.dumps(items[:10], default=str)}")
        return "\n".join(lines)


class Harness:
    def __init__(self, opts: Options, base_dir: Path | None = None) -> None:
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="shardbroker-crash-"))
        self.make_brokers()
        self.sel = selectors.DefaultSelector()
        self.subs: list[Subscriber] = []
        self.pubs: list[Publisher] = []
        self.pubs_by_name: dict[str, Publisher] = {}
        self.publishing = False
        self.draining = False
        self.broker_up = False
        self.cycle = 0
        self.sent = 0
        self.stray_acks = 0
        self.kills: list[Kill] = []
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def make_brokers(self) -> None:
        """The broker under test (not started yet)."""
        self.broker = CrashBroker(self.base_dir, workers=self.opts.workers, config=BROKER_CONFIG,
                                  name=f"broker({self.opts.workers}w, crash)")

    # -- bookkeeping ----------------------------------------------------------

    def wall(self, mono: float) -> float:
        return self.wall0 + (mono - self.t0)

    def event(self, now: float, kind: str, detail: str) -> None:
        self.events.append({"t": round(now - self.t0, 3), "at": _stamp(self.wall(now)),
                            "cycle": self.cycle, "kind": kind, "detail": detail})
        if kind != "kill":
            self.note(f"{kind}: {detail}")
        if self.opts.verbose and kind in ("session-lost", "broker-error"):
            print(f"  ! {kind}: {detail}", flush=True)

    def say(self, text: str) -> None:
        if self.opts.verbose:
            print(text, flush=True)

    # -- the broker, as the clients and the checks see it (a cluster harness overrides these)

    def address_for(self, client: Client) -> tuple[str, int]:
        """Where ``client`` connects now (also in setup): the broker's port on 127.0.0.1."""
        return "127.0.0.1", self.broker.port

    def note(self, text: str) -> None:
        """A harness line in the broker log."""
        self.broker.note(text)

    def alive(self) -> bool:
        """Whether the broker runs (a recovery that times out without it ends the run)."""
        return self.broker.alive()

    def tail(self, n: int) -> str:
        """The broker log's last ``n`` lines, for an error."""
        return self.broker.tail(n)

    # -- setup ----------------------------------------------------------------

    def _layout(self) -> tuple[list[int], list[int]]:
        n = self.opts.workers
        if n == 1:
            return [0], [0]
        if self.opts.layout == "spread":
            return list(range(n)), [(i + 1) % n for i in range(n)]
        half = max(1, n // 2)
        return list(range(half)), list(range(half, n))

    def setup(self) -> None:
        o = self.opts
        tag = f"{self.seed % 100000:05d}"
        sub_shards, pub_shards = self._layout()
        kinds = ["online", "flappy", "online", "sleeper"]
        for i in range(o.subscribers):
            shard = sub_shards[i % len(sub_shards)]
            cid = client_id_on_shard(f"cs{tag}s{i}x", shard, o.workers)
            version = 4 if i % 2 == 0 else 5
            self.subs.append(Subscriber(self, f"s{i}", cid, shard, version, kinds[i % len(kinds)]))
        for j in range(o.publishers):
            shard = pub_shards[j % len(pub_shards)]
            if o.layout == "spread" and o.workers > 1 and o.subscribers:
                shard = (sub_shards[j % len(sub_shards)] + 1) % o.workers
            cid = client_id_on_shard(f"cs{tag}p{j}x", shard, o.workers)
            version = 4 if (j // 2) % 2 == 0 else 5
            qos = 1 if j % 2 == 0 else 2
            p = Publisher(self, f"p{j}", cid, shard, version, qos)
            self.pubs.append(p)
            self.pubs_by_name[p.name] = p
        # every session created, every subscription made, before anything is published
        for c in [*self.subs, *self.pubs]:
            self.setup_client(c)

    def setup_client(self, c: Client) -> None:
        """A new persistent session for ``c`` (a subscriber's subscription in it); no traffic."""
        host, port = self.address_for(c)
        rc = mb.RawClient(host=host, port=port, connect_timeout=5)
        try:
            props = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, SESSION_EXPIRY) if c.version == 5 else b""
            ack = rc.connect_mqtt(c.cid, version=c.version, clean=c.version == 5, props=props,
                                  keepalive=0, timeout=10)
            if ack.rc != 0:
                raise HarnessError(f"setup: CONNACK {ack.rc:#x} for {c.name}")
            if isinstance(c, Subscriber):
                codes = rc.subscribe(TOPIC_PREFIX + "#", 2, timeout=10)
                if codes != [2]:
                    raise HarnessError(f"setup: SUBACK {codes} for {c.name}")
            rc.disconnect(wait=3)
        finally:
            rc.close()

    # -- the loop ---------------------------------------------------------------

    def pump(self, seconds: float, until: Any = None) -> bool:
        """Run the clients for up to ``seconds``; True as soon as ``until()`` is."""
        end = time.monotonic() + seconds
        clients: list[Client] = [*self.subs, *self.pubs]
        check_at = 0.0
        while True:
            now = time.monotonic()
            if until is not None and now >= check_at:
                check_at = now + 0.05
                if until():
                    return True
            if now >= end:
                return False
            for c in clients:
                c.tick(now)
            if self.publishing:
                for p in self.pubs:
                    p.publish_due(now)
            for c in clients:
                if c.outbuf and c.sock is not None and c.state != TCP:
                    c._flush_out(now)
            timeout = 0.005 if self.publishing else 0.02
            try:
                ready = self.sel.select(min(timeout, max(0.0, end - now)))
            except OSError:
                ready = []
            now = time.monotonic()
            for key, mask in ready:
                key.data.on_event(now, mask)

    def all_connected(self) -> bool:
        return all(c.state == UP for c in self.pubs) and all(
            s.state == UP for s in self.subs if s.want_online)

    def processes_up(self) -> bool:
        b = self.broker
        if not b.alive():
            return False
        workers = b.worker_pids()
        return len(workers) == self.opts.workers and b.acceptor_pid() is not None

    def recover(self, kill: Kill | None) -> None:
        """Wait (serving the clients) until every process runs and every client that
        should be connected is; bounded."""
        self.pump(0.25)  # let the clients notice what the kill closed
        next_check = [0.0]

        def healthy() -> bool:
            now = time.monotonic()
            if now < next_check[0] or not self.all_connected():
                return False
            next_check[0] = now + 0.2
            return self.processes_up()

        if not self.pump(self.opts.recover_timeout, healthy):
            missing = [c.name for c in [*self.pubs, *self.subs] if c.want_online and c.state != UP]
            detail = (f"not recovered within {self.opts.recover_timeout}s after "
                      f"{kill.target if kill else 'start'}: processes_up={self.processes_up()}, "
                      f"clients not connected: {missing}")
            self.event(time.monotonic(), "broker-error", detail)
            if not self.alive():
                raise HarnessError(detail + "\n" + self.tail(40))
        if kill is not None:
            kill.recovered_after = round(time.monotonic() - kill.t, 3)  # restart included

    def choose_kill(self) -> str:
        if self.opts.kills:
            return self.opts.kills[(self.cycle - 1) % len(self.opts.kills)]
        return self.rng.choice(KILL_KINDS)

    def kill(self, kind: str, early: bool = False) -> Kill:
        b = self.broker
        workers = b.worker_pids() if kind != "tree" else {}
        acceptor = b.acceptor_pid() if kind == "acceptor" else None
        if kind == "acceptor" and acceptor is None:  # being restarted (early kill): something else
            kind = "worker" if workers else "tree"
        if kind == "worker" and not workers:
            kind = "tree"
        if kind == "worker":
            shard = self.rng.choice(sorted(workers))
            pid, target = workers[shard], f"worker {shard}"
        elif kind == "acceptor":
            assert acceptor is not None
            pid, target = acceptor, "acceptor"
        else:
            pid, target = b.pid, "process tree"
        # A supervisor killed by SIGKILL cannot remove its run directory: the harness does.
        run_dir = b.run_dir() if kind == "tree" else None
        now = time.monotonic()
        if kind == "tree":
            os.killpg(b.pid, signal.SIGKILL)
        elif pid > 0 and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        k = Kill(self.cycle, kind, target, pid, now, self.wall(now), early)
        self.kills.append(k)
        self.event(now, "kill", f"SIGKILL {target} (pid {pid})")
        b.note(f"cycle {self.cycle}: SIGKILL {target} (pid {pid}){' (early)' if early else ''}")
        if kind == "tree":
            self.broker_up = False
            b.kill9()  # reaps, and kills any straggler still in the process group
            if run_dir and Path(run_dir).name.startswith("shardbroker-"):
                shutil.rmtree(run_dir, ignore_errors=True)
            for c in [*self.subs, *self.pubs]:
                if c.sock is not None:
                    c.drop(time.monotonic(), "broker killed")
            try:
                b.start(port=b.port)
            except Exception as e:  # noqa: BLE001 - BrokerStartError, AssertionError
                raise HarnessError(f"restart after a whole-tree kill failed: {e}") from None
            self.broker_up = True
            self.event(time.monotonic(), "restart", f"broker restarted on port {b.port}")
        return k

    def run_cycles(self) -> None:
        o = self.opts
        for c in range(1, o.cycles + 1):
            self.cycle = c
            early = bool(self.kills) and self.rng.random() < o.early_kill_ratio
            if early:  # the next kill while the broker is still recovering from the last one
                load = self.rng.uniform(0.05, 0.6)
            else:
                self.recover(self.kills[-1] if self.kills else None)
                load = self.rng.uniform(min(0.2, o.seconds_per_cycle), o.seconds_per_cycle)
            self.pump(load)
            k = self.kill(self.choose_kill(), early)
            acked = sum(len(p.acked) for p in self.pubs)
            self.say(f"cycle {c:3d}: {'early ' if early else ''}load {load:4.2f}s, SIGKILL {k.target:12s} "
                     f"(pid {k.pid}); acked so far {acked}")
        self.cycle = o.cycles + 1
        self.recover(self.kills[-1] if self.kills else None)

    def finish(self) -> None:
        """Stop publishing, let the publishers finish, bring every subscriber back and drain."""
        self.publishing = False
        self.pump(self.opts.finish_timeout, lambda: all(not p.inflight for p in self.pubs))
        self.draining = True
        for s in self.subs:
            s.want_online = True
            s.next_attempt = 0.0

        t = time.monotonic()
        trace_at = [t]
        self.drain_trace: list[dict[str, Any]] = []

        def missing(s: Subscriber) -> int:
            return sum(1 for p in self.pubs for seq in p.acked if (p.name, seq) not in s.first)

        progress = {"left": -1, "at": t}

        def complete() -> bool:
            now = time.monotonic()
            if now >= trace_at[0]:  # progress once a second, for the report; stop when stuck
                trace_at[0] = now + 1.0
                row = {s.name: {"state": s.state, "missing": missing(s), "awaiting_pubrel": len(s.pending)}
                       for s in self.subs}
                self.drain_trace.append({"t": round(now - t, 2), **row})
                left = sum(v["missing"] + v["awaiting_pubrel"] for v in row.values())
                if left != progress["left"]:
                    progress["left"], progress["at"] = left, now
                elif now - progress["at"] > self.opts.drain_idle:
                    raise _Stuck()
            if not all(s.state == UP for s in self.subs):
                return False
            for s in self.subs:
                if s.pending:
                    return False
                for p in self.pubs:
                    for seq in p.acked:
                        if (p.name, seq) not in s.first:
                            return False
            return True

        try:
            done = self.pump(self.opts.drain_timeout, complete)
        except _Stuck:
            done = False
        self.drain_seconds = round(time.monotonic() - t, 3)
        self.drain_complete = done
        # a last moment for stragglers, then leave cleanly
        self.pump(0.3)
        for c in [*self.subs, *self.pubs]:
            c.disconnect(time.monotonic())
        self.pump(0.5, lambda: all(c.state == DOWN for c in [*self.subs, *self.pubs]))

    # -- results --------------------------------------------------------------

    kinds: tuple[str, ...] = KILL_KINDS  # the kinds of kill (event) the summary counts

    def results(self, error: str | None = None) -> Result:
        kills_by_kind = {k: sum(1 for x in self.kills if x.kind == k) for k in self.kinds}
        acked_total = sum(len(p.acked) for p in self.pubs)
        violations: dict[str, list[dict[str, Any]]] = {"lost": [], "qos2_dups": [], "out_of_order": [],
                                                        "sessions_lost": [], "pid_reuse": []}
        sub_rows = []
        for s in self.subs:
            lost_runs = []
            lost = 0
            for p in self.pubs:
                missing = sorted(seq for seq in p.acked if (p.name, seq) not in s.first)
                lost += len(missing)
                for run in _runs(missing):
                    lost_runs.append(self._explain_loss(s, p, run))
            violations["lost"] += lost_runs
            violations["qos2_dups"] += [{"subscriber": s.name, **d} for d in s.qos2_dups]
            violations["out_of_order"] += [{"subscriber": s.name, **d} for d in s.out_of_order]
            violations["pid_reuse"] += [{"subscriber": s.name, **d} for d in s.pid_reuse]
            if s.sessions_lost:
                violations["sessions_lost"].append({"client": s.name, "count": s.sessions_lost})
            sub_rows.append({
                "name": s.name, "client_id": s.cid, "shard": s.shard, "version": s.version, "kind": s.kind,
                "connections": s.epoch, "deliveries": s.deliveries, "unique": len(s.first),
                "lost": lost, "qos2_dups": len(s.qos2_dups), "qos1_dups": s.qos1_dups,
                "out_of_order": len(s.out_of_order), "qos2_protocol_resends": s.qos2_resends,
                "qos_mismatch": s.qos_mismatch, "unknown": s.unknown, "sessions_lost": s.sessions_lost,
                "pid_reuse": len(s.pid_reuse), "awaiting_pubrel_at_end": len(s.pending),
                "connect_failures": s.failures,
            })
        pub_rows = []
        for p in self.pubs:
            if p.sessions_lost:
                violations["sessions_lost"].append({"client": p.name, "count": p.sessions_lost})
            pub_rows.append({
                "name": p.name, "client_id": p.cid, "shard": p.shard, "version": p.version, "qos": p.qos,
                "sent": p.next_seq - 1, "acked": len(p.acked), "refused": len(p.refused),
                "unfinished": len(p.inflight), "resent": p.resent, "ack_reason_0x10": p.no_subscribers,
                "connections": p.epoch, "sessions_lost": p.sessions_lost, "connect_failures": p.failures,
            })
        totals = {k: sum(r[k] for r in sub_rows) for k in
                  ("lost", "qos2_dups", "qos1_dups", "out_of_order", "qos2_protocol_resends", "unknown",
                   "pid_reuse", "deliveries")}
        sessions_lost = sum(r["sessions_lost"] for r in sub_rows) + sum(r["sessions_lost"] for r in pub_rows)
        bad = totals["lost"] or totals["qos2_dups"] or totals["out_of_order"] or sessions_lost or totals["pid_reuse"]
        exit_code = 2 if error else (1 if bad else 0)
        summary = {
            "seed": self.seed, "workers": self.opts.workers, "layout": self.opts.layout,
            "cycles": self.opts.cycles, "cycles_done": len(self.kills), "kills": kills_by_kind,
            "early_kills": sum(1 for k in self.kills if k.early),
            "sent": sum(p.next_seq - 1 for p in self.pubs), "acked": acked_total,
            "acked_qos1": sum(len(p.acked) for p in self.pubs if p.qos == 1),
            "acked_qos2": sum(len(p.acked) for p in self.pubs if p.qos == 2),
            "subscribers": len(self.subs), "expected_deliveries": acked_total * len(self.subs),
            **totals, "sessions_lost": sessions_lost, "stray_acks": self.stray_acks,
            "drain_complete": getattr(self, "drain_complete", False),
            "drain_seconds": getattr(self, "drain_seconds", None),
            "drain_trace": getattr(self, "drain_trace", []),
            "seconds": round(time.monotonic() - self.t0, 1), "durability": "fsync",
        }
        return Result(ok=exit_code == 0, exit_code=exit_code, summary=summary, subscribers=sub_rows,
                      publishers=pub_rows, kills=[asdict(k) | {"t": round(k.t - self.t0, 3), "at": _stamp(k.wall)}
                                                  for k in self.kills],
                      violations=violations, events=self.events, error=error)

    def _explain_loss(self, s: Subscriber, p: Publisher, run: tuple[int, int]) -> dict[str, Any]:
        lo, hi = run
        t_ack, reason, cycle = p.acked[lo]
        t_last = p.acked[hi][0]
        after = [k for k in self.kills if k.t >= t_ack]
        nxt = after[0] if after else None
        others = [o.name for o in self.subs if o is not s and (p.name, lo) not in o.first]
        prev_ok = max((q for q in p.acked if q < lo and (p.name, q) in s.first), default=None)
        next_ok = min((q for q in p.acked if q > hi and (p.name, q) in s.first), default=None)
        return {
            "subscriber": s.name, "subscriber_shard": s.shard, "publisher": p.name, "publisher_shard": p.shard,
            "qos": p.qos, "seqs": [lo, hi], "count": sum(1 for q in p.acked if lo <= q <= hi),
            "first_acked_at": _stamp(self.wall(t_ack)), "last_acked_at": _stamp(self.wall(t_last)),
            "ack_reason": reason, "cycle": cycle, "also_lost_for": others,
            "delivered_neighbours": [prev_ok, next_ok],
            "next_kill": None if nxt is None else {"cycle": nxt.cycle, "target": nxt.target, "pid": nxt.pid,
                                                   "at": _stamp(nxt.wall),
                                                   "after_ack_ms": round((nxt.t - t_ack) * 1000, 1)},
        }


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for q in seqs:
        if out and q == out[-1][1] + 1:
            out[-1] = (out[-1][0], q)
        else:
            out.append((q, q))
    return out


# ---------------------------------------------------------------------------
# Entry points


def run(opts: Options, base_dir: Path | None = None) -> Result:
    """Run the whole crash test and return its result (the broker is always cleaned up)."""
    h = Harness(opts, base_dir)
    error = None
    h.say(f"crash test: seed {h.seed}, {opts.workers} workers, {opts.cycles} cycles, data in {h.base_dir}")
    try:
        try:
            h.broker.start()
        except Exception as e:  # noqa: BLE001 - BrokerStartError
            raise HarnessError(f"broker did not start: {e}") from None
        h.broker_up = True
        h.setup()
        h.say(f"broker on port {h.broker.port}; subscribers "
              + ", ".join(f"{s.name}(shard {s.shard}, v{'5' if s.version == 5 else '3.1.1'}, {s.kind})" for s in h.subs)
              + "; publishers "
              + ", ".join(f"{p.name}(shard {p.shard}, v{'5' if p.version == 5 else '3.1.1'}, qos {p.qos})"
                          for p in h.pubs))
        h.publishing = True
        h.run_cycles()
        h.finish()
    except HarnessError as e:
        error = str(e)
    finally:
        for c in [*h.subs, *h.pubs]:
            if c.sock is not None:
                c.drop(time.monotonic(), "end")
        try:
            h.broker.stop()
        finally:
            h.broker.cleanup()
            h.sel.close()
    result = h.results(error)
    log_path = h.base_dir / "broker.log"
    try:
        log_path.write_text(h.broker.log_text() + "\n")
        result.log_path = str(log_path)
    except OSError:
        pass
    if h.own_dir and result.ok and not opts.keep:
        shutil.rmtree(h.base_dir, ignore_errors=True)
        result.log_path = None
    return result


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        v = row.get(key, "")
        if key == "version" and v:
            return "5.0" if v == 5 else "3.1.1"
        return str(v)

    lines = ["  ".join(f"{title:>{n}}" for title, _, n in cols)]
    lines += ["  ".join(f"{cell(row, key):>{n}}" for _, key, n in cols) for row in rows]
    return "\n".join(lines) + "\n"


def print_report(r: Result, out: Any = sys.stdout) -> None:
    s = r.summary
    w = out.write
    w("\nCrash test: seed {seed}, {workers} workers ({layout}), durability {durability}, {seconds}s\n".format(**s))
    w(f"cycles {s['cycles_done']}/{s['cycles']}; kills: " + ", ".join(f"{k} {v}" for k, v in s["kills"].items())
      + f" ({s['early_kills']} before recovery from the previous one)\n")
    w(f"messages: sent {s['sent']}, acknowledged {s['acked']} (QoS 1 {s['acked_qos1']}, QoS 2 {s['acked_qos2']}); "
      f"drain {'complete' if s['drain_complete'] else 'INCOMPLETE'} in {s['drain_seconds']}s\n\n")
    sub_cols = [("subscriber", "name", 10), ("shard", "shard", 5), ("proto", "version", 5),
                ("kind", "kind", 7), ("conns", "connections", 5), ("received", "deliveries", 8),
                ("unique", "unique", 7), ("lost", "lost", 5), ("qos2 dup", "qos2_dups", 8),
                ("qos1 dup", "qos1_dups", 8), ("order", "out_of_order", 5),
                ("q2 resend", "qos2_protocol_resends", 9)]
    total = {"name": "total", "deliveries": s["deliveries"], "lost": s["lost"],
             "qos2_dups": s["qos2_dups"], "qos1_dups": s["qos1_dups"],
             "out_of_order": s["out_of_order"], "qos2_protocol_resends": s["qos2_protocol_resends"]}
    w(_table([*r.subscribers, total], sub_cols) + "\n")
    pub_cols = [("publisher", "name", 10), ("shard", "shard", 5), ("proto", "version", 5),
                ("qos", "qos", 3), ("sent", "sent", 6), ("acked", "acked", 6), ("refused", "refused", 7),
                ("unfinished", "unfinished", 10), ("resent", "resent", 6), ("conns", "connections", 5)]
    w(_table(r.publishers, pub_cols))
    trace = s.get("drain_trace") or []
    if len(trace) > 3 or not s["drain_complete"]:
        w("\ndrain progress (per subscriber: state, acknowledged messages still missing, QoS 2 awaiting PUBREL):\n")
        for row in trace:
            w(f"  t={row['t']:5.1f}s  " + "  ".join(
                f"{k}: {v['state']} {v['missing']}/{v['awaiting_pubrel']}" for k, v in row.items() if k != "t") + "\n")
    w(f"\nsessions lost {s['sessions_lost']}, broker packet ids reused while awaiting PUBREL {s['pid_reuse']}, "
      f"unknown deliveries {s['unknown']}, stray acks {s['stray_acks']}\n")
    for kind, items in r.violations.items():
        for item in items[:20]:
            w(f"  {kind}: {json.dumps(item, default=str)}\n")
        if len(items) > 20:
            w(f"  {kind}: ... {len(items) - 20} more\n")
    if r.error:
        w(f"\nHARNESS ERROR: {r.error}\n")
    if r.log_path:
        w(f"broker log: {r.log_path}\n")
    w(("PASS" if r.ok else "FAIL") + f" (exit {r.exit_code})\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.crash", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds-per-cycle", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the full result as JSON")
    ap.add_argument("--rate", type=float, default=100.0, help="messages/s per publisher (default 100)")
    ap.add_argument("--window", type=int, default=10, help="unacknowledged publishes per publisher (10)")
    ap.add_argument("--subscribers", type=int, default=4)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--layout", choices=["split", "spread"], default="split",
                    help="split: subscribers and publishers on disjoint shards; spread: on all shards")
    ap.add_argument("--kills", default=None,
                    help="comma-separated kill kinds to cycle through (worker, acceptor, tree); default random")
    ap.add_argument("--early-kills", type=float, default=0.2,
                    help="share of cycles whose kill comes 0.05-0.6 s after the previous one, before "
                         "the broker has recovered (restoring workers, resends); default 0.2")
    ap.add_argument("--drain-idle", type=float, default=12.0,
                    help="end the final drain after this many seconds without progress (12)")
    ap.add_argument("--drain-timeout", type=float, default=180.0, help="cap on the final drain (180 s)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory and broker log")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    kills = None
    if a.kills:
        kills = [k.strip() for k in a.kills.split(",") if k.strip()]
        bad = [k for k in kills if k not in KILL_KINDS]
        if bad:
            ap.error(f"unknown kill kinds {bad}; choose from {', '.join(KILL_KINDS)}")
    if a.cycles < 0 or a.workers < 1 or a.seconds_per_cycle <= 0:
        ap.error("--cycles >= 0, --workers >= 1, --seconds-per-cycle > 0")
    opts = Options(cycles=a.cycles, workers=a.workers, seconds_per_cycle=a.seconds_per_cycle, seed=a.seed,
                   rate=a.rate, window=a.window, subscribers=a.subscribers, publishers=a.publishers,
                   layout=a.layout, kills=kills, drain_timeout=a.drain_timeout, drain_idle=a.drain_idle,
                   early_kill_ratio=a.early_kills, keep=a.keep,
                   verbose=not a.quiet)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    return report(run(opts), a.json)


def report(r: Result, json_path: Path | None, printer: Callable[[Result], None] | None = None) -> int:
    """Print ``r`` (with ``printer``, ``print_report`` by default), write it as JSON to
    ``json_path`` when given; the exit status."""
    (printer or print_report)(r)
    if json_path:
        json_path.write_text(json.dumps(asdict(r), indent=2, default=str) + "\n")
    return r.exit_code


if __name__ == "__main__":
    sys.exit(main())
