"""Side-by-side MQTT benchmark: ShardBroker against Mosquitto.

Run from the repository root (loopback only, every run bounded in time)::

    .venv/bin/python -m loadtests.bench                         # all scenarios, both brokers, 3 repeats
    .venv/bin/python -m loadtests.bench --scenario fanin-qos0 --duration 2 --repeat 1
    .venv/bin/python -m loadtests.bench --tls --scenario connect-rate  # connections/s with a TLS handshake each
    .venv/bin/python -m loadtests.bench --broker-only           # ShardBroker alone
    .venv/bin/python -m loadtests.bench --mosquitto-only        # Mosquitto alone (checks the generator)
    .venv/bin/python -m loadtests.bench --target 127.0.0.1:1883 # a broker that is already running
    .venv/bin/python -m loadtests.bench --json loadtests/reports/bench.json
    .venv/bin/python -m loadtests.bench --scenario connect-rate --logging quiet   # both brokers logging warnings only

Scenarios (``--scenario NAME``, repeatable; all by default): fanin-qos0,
pairs-qos1, pairs-qos2, fanout-qos0, latency-qos1, fairness, fairness-qos1,
connect-rate, connect-auth, subscriptions, persistent-qos1. See docs/BENCHMARKS.md for what
each one measures.

How the load generator works (it must not be the bottleneck):

* ``--procs`` generator processes (default: CPU count), each running its own
  level-triggered epoll loop over raw non-blocking TCP sockets (no asyncio);
* MQTT packets are pre-encoded by ``loadtests.mqttwire`` (an encoder written for
  this tool; nothing is imported from shardbroker's codec) and written in
  batches, one ``send`` per batch;
* subscribers split frames with an inlined incremental parser that counts
  PUBLISH packets (and reads the payload's header when messages are checked
  or latency is measured) and answers PUBACK / PUBREC / PUBCOMP in one
  ``send`` per read; when a pass of the loop read little, it sleeps
  ``--read-coalesce-ms`` so the next pass reads many messages per syscall
  (off for latency-qos1 and the canary of the fairness scenarios);
* QoS 1/2 publishers pipeline against the broker's acknowledgements only, as
  real clients do: up to ``--window`` (QoS 2: ``--window-qos2``) unacknowledged
  messages per publisher (capped by the broker's Receive Maximum under MQTT 5);
  nothing waits for end-to-end delivery unless ``--e2e-window`` asks for it
  (which hides a broker that acknowledges more than it delivers);
* every QoS 1/2 message is checked: its payload starts with the publisher's
  index and a sequence number; publishers record which sequence numbers the
  broker acknowledged (PUBACK; PUBREC for QoS 2), subscribers which ones
  arrived, how often and in what order. After the load the bench drains (until
  every acknowledged message has arrived, or nothing moved for
  ``--drain-idle`` seconds) and counts ``lost`` = acknowledged but never
  delivered to the online subscriber, duplicates and reordered messages. A run
  with lost > 0, reordered > 0 or (QoS 2) duplicates > 0 FAILED, and the exit
  status is then 1;
* latency-qos1 runs its publishers and its subscribers in separate processes
  (half of ``--procs`` publish, at least one of each): a publisher sleeps until
  each message's own due time (the pairs' messages evenly spread) and sends it
  alone, stamped right before the ``send``; a subscriber blocks in epoll until
  data arrives and takes the receive time right after the ``recv``;
* fairness / fairness-qos1: subscribers of ``bench/flood/#`` that never read
  their sockets (nor send anything) are flooded by publishers writing as fast
  as their sockets take data (QoS 1: pipelined against PUBACK); a canary pair
  on ``bench/canary``, in a process of its own, publishes stamped QoS 1
  messages at ``--canary-rate`` and measures publish-to-delivery latency;
* QoS 0 publishers run closed-loop: at most ``--qos0-window`` deliveries may
  be outstanding (sent but not yet counted by a subscriber, over all
  processes, via shared counters), so a broker is driven at its maximum rate
  without building an unbounded queue. Deliveries that never arrive are
  written off after a short stall so that a broker that drops messages does
  not stall the publishers.

Brokers are started on free loopback ports in their own process groups, with
a parent-death signal, and are stopped (SIGTERM, then SIGKILL) on exit,
error or Ctrl-C. Runs of the brokers are interleaved (A, B, A, B, ...) and the
table reports medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import mqttwire as w

try:  # the broker's client placement; only used to choose client ids
    from shardbroker.sharding import shard_for
except ImportError:  # pragma: no cover - same function, for use without the package
    def shard_for(client_id: str, shards: int) -> int:
        if shards <= 1:
            return 0
        digest = hashlib.blake2b(client_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % shards


REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = "/usr/sbin/mosquitto"
SCENARIOS = ["fanin-qos0", "pairs-qos1", "pairs-qos2", "fanout-qos0", "latency-qos1",
             "fairness", "fairness-qos1", "connect-rate", "connect-auth", "subscriptions", "persistent-qos1"]
FRESH = ("connect-rate", "connect-auth", "subscriptions")  # a broker started for each run
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
MAX_LAT_SAMPLES = 500_000
_PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pdeathsig(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _raise_nofile() -> None:
    with contextlib.suppress(Exception):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# =====================================================================================
# Generator side (runs in worker processes)
# =====================================================================================

@dataclass
class Plan:
    """What one generator process does in one run."""

    index: int
    host: str
    port: int
    proto: int = 4
    qos: int = 0
    payload: int = 64
    subs: list[tuple[str, str]] = field(default_factory=list)   # (client id, filter)
    pubs: list[tuple[str, str]] = field(default_factory=list)   # (client id, topic)
    pub_gids: list[int] = field(default_factory=list)           # checked publishers' indexes
    stuck: list[tuple[str, str]] = field(default_factory=list)  # subscribers that never read
    idle: list[str] = field(default_factory=list)               # client ids (connect-rate)
    subs_each: int = 0              # subscriptions: filters each idle connection subscribes to
    auth_users: int = 0             # connect-auth: client i logs in as user i % auth_users
    kind: str = ""                  # "canary" or "flood" in the fairness scenarios
    track: bool = False             # QoS 1/2: index + sequence number in payloads, checked
    sub_clean: bool = True
    sub_expiry: int = 0
    cleanup_sessions: bool = False
    rate_per_pub: float = 0.0       # msg/s per publisher; 0 = as fast as possible
    # latency: message k of pubs[j] is due at start + due_offsets[j] + k / rate_per_pub
    due_offsets: list[float] = field(default_factory=list)
    window: int = 100               # QoS 1/2 unacknowledged per publisher
    qos0_window: int = 20000        # QoS 0 deliveries outstanding (all processes)
    open_loop: bool = False         # QoS 0: write as fast as the sockets take data
    fan: int = 1                    # deliveries expected per published message
    batch: int = 64                 # QoS 0 messages per write
    stamp: bool = False             # latency: timestamp in payload, run_latency's loop
    stamp_paced: bool = True        # stamped: run_latency's loop (False: pipelined, run_load's)
    coalesce_ms: float = 2.0        # sleep after a loop pass that read little
    pairs: bool = False             # pubs[k] and subs[k] form a pair (end-to-end window)
    e2e_window: int = 0             # opt-in: sent but not yet received, per pair (hides loss)
    connect_concurrency: int = 100
    keepalive: int = 60
    stuck_keepalive: int = 0        # the never-reading subscribers' keepalive (0 = none)
    timeout: float = 20.0           # per wait (connect, CONNACK, SUBACK)
    tls_ca: str = ""                # --tls: the CA file; connections are TLS when set


S_CONNECTING, S_CONNACK, S_SUBACK, S_READY, S_CLOSED, S_HANDSHAKE = range(6)
TLS_WRITE = 16 * 1024  # bytes per SSL write: a retry after "want write" passes the same bytes
_EP_IN, _EP_OUT = select.EPOLLIN, select.EPOLLOUT
_EP_ERR = select.EPOLLERR | select.EPOLLHUP
_OUT_HIGH = 256 * 1024       # a QoS 0 publisher with more than this unsent waits
_COALESCE_BYTES = 64 * 1024  # read less than this in one pass: wait a little before the next
_HDR = struct.Struct(">II")  # checked payloads start with (publisher index, sequence number)
_HDR_LEN = _HDR.size
_MAX_SEQ = 1 << 28           # a sequence number above this is a corrupt payload
_TCP_ESTABLISHED = 1


class SetupError(Exception):
    pass


class Conn:
    """One MQTT connection on a raw non-blocking socket."""

    __slots__ = (
        "acked_bits",
        "batch",
        "blocked_e2e",
        "buf",
        "cid",
        "connack_code",
        "connect_pkt",
        "e2e",
        "error",
        "fd",
        "filter",
        "gid",
        "gid_b",
        "inflight",
        "leaving",
        "min_batch",
        "next_pid",
        "out",
        "partner",
        "pid_max",
        "pid_seq",
        "pkts",
        "prefix",
        "recv",
        "role",
        "sent",
        "seq",
        "sock",
        "state",
        "t0",
        "track",
        "tracks",
        "window",
    )

    def __init__(self, sock: socket.socket, cid: str, role: str, window: int, e2e: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.role = role
        self.state = S_CONNECTING
        self.buf = b""
        self.out = bytearray()
        self.leaving = False
        self.filter: str | None = None
        self.connect_pkt = b""
        self.connack_code = -1
        self.error = ""
        self.window = window
        self.min_batch = max(1, window // 4)
        self.inflight: set[int] = set()
        self.next_pid = 1
        self.pid_max = 65535
        self.pkts: list[bytes] = []
        self.prefix = b""
        self.batch = b""
        self.sent = 0
        self.recv = 0
        self.partner: Conn | None = None
        self.e2e = e2e
        self.blocked_e2e = False
        self.t0 = 0
        # checked messages: a publisher's index, next sequence number, the sequence number
        # of each packet id in flight (-1: none, or already acknowledged) and one byte per
        # sequence number, 1 once the broker acknowledged it; a subscriber's per-publisher
        # [copies received per sequence number, highest first delivery, reordered, dup]
        self.track = False
        self.gid = -1
        self.gid_b = b""
        self.seq = 0
        self.pid_seq: list[int] = []
        self.acked_bits = bytearray()
        self.tracks: dict[int, list[Any]] = {}


class Engine:
    """One generator process: a level-triggered epoll loop over raw sockets.

    No asyncio: each pass of the loop is one ``epoll.poll`` and, per ready
    socket, one ``recv`` and at most one ``send``. When a pass reads little,
    the loop sleeps ``coalesce_ms`` so that the next pass reads many messages
    per syscall (the sockets stay registered: no epoll_ctl churn). The latency
    scenario and the fairness canary run their own loop instead (``run_latency``).
    """

    def __init__(self, plan: Plan, pipe: mpc.Connection, shared: dict[str, Any]) -> None:
        self.plan = plan
        self.pipe = pipe
        self.sent_arr = shared["sent"]
        self.recv_arr = shared["recv"]
        self.acked_arr = shared["acked"]
        self.infl_arr = shared["inflight"]
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.pipe_fd = pipe.fileno()
        self.ep.register(self.pipe_fd, _EP_IN)
        self.cmds: collections.deque[tuple[str, Any]] = collections.deque()
        self.errors: list[str] = []
        self.error_count = 0
        self.subs: list[Conn] = []
        self.pubs: list[Conn] = []
        self.stuck: list[Conn] = []
        self.publishing = False
        self.paced = plan.rate_per_pub > 0
        self.sent_total = 0
        self.recv_total = 0     # checked subscribers: first deliveries only
        self.acked = 0          # accepted by the broker (PUBACK; PUBREC for QoS 2)
        self.t_acked = 0        # the same, checked publishers only (shared with the parent)
        self.t_inflight = 0     # checked publishers' unfinished flows (shared with the parent)
        self.ack_errors = 0
        self.bad_payload = 0
        self.skipped = 0        # paced messages not sent because the window was full
        self.reads = 0
        self.bytes_in = 0
        self.last_recv_ns = 0
        self.lat: list[int] = []
        self.warm_ns = 0
        self.recv_at_warm = self.recv_at_end = self.sent_at_warm = self.sent_at_end = 0
        self.acked_at_warm = self.acked_at_end = 0
        self.mid = b"\x00" if plan.proto == 5 else b""
        self.hdr_len = (_HDR_LEN if plan.track else 0) + (8 if plan.stamp else 0)
        size = max(plan.payload, self.hdr_len)
        self.payload_bytes = bytes((65 + k % 26) for k in range(size))
        self.pad = self.payload_bytes[self.hdr_len:]
        self.addr = (plan.host, plan.port)
        self.tls: ssl.SSLContext | None = None
        if plan.tls_ca:
            self.tls = ssl.create_default_context(cafile=plan.tls_ca)
            self.tls.check_hostname = False
        self.written_off = 0
        self.stalled = False
        self.stall_seen = -1
        self.stall_since = 0.0
        self.next_ping = 0.0
        self.cpu0 = os.times()

    # ------------------------------------------------------------------ plumbing
    def note(self, msg: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(msg)

    def tell(self, *msg: Any) -> None:
        self.pipe.send(msg)

    def open(self, cid: str, role: str, *, clean: bool = True, expiry: int = 0,
             keepalive: int | None = None) -> Conn:
        plan = self.plan
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(sock, cid, role, plan.window, plan.e2e_window)
        c.connect_pkt = w.connect(cid, proto=plan.proto, clean=clean,
                                  keepalive=plan.keepalive if keepalive is None else keepalive,
                                  session_expiry=expiry)
        c.t0 = time.monotonic_ns()
        rc = sock.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            c.state = S_CLOSED
            c.error = f"connect: {os.strerror(rc)}"
            return c
        self.by_fd[c.fd] = c
        self.ep.register(c.fd, _EP_OUT)
        return c

    def lost(self, c: Conn, why: str) -> None:
        if c.state == S_CLOSED:
            return
        if not c.leaving:
            c.error = c.error or why
            self.note(f"{c.cid}: {why}")
        c.state = S_CLOSED
        with contextlib.suppress(Exception):
            self.ep.unregister(c.fd)
        self.by_fd.pop(c.fd, None)
        c.sock.close()

    def send(self, c: Conn, data: bytes) -> None:
        if c.state == S_CLOSED:
            return
        if c.out:
            c.out += data
            return
        if self.tls is not None:  # through c.out: SSL writes go in records, retried alike
            c.out += data
            self._writable(c)
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.lost(c, f"send: {exc}")
            return
        if n < len(data):
            c.out += data[n:]
            self.ep.modify(c.fd, _EP_IN | _EP_OUT)

    def _recv_tls(self, c: Conn) -> bytes | None:
        """What TLS has for ``c``: one SSL read returns one record, so read until OpenSSL wants
        more from the kernel (up to 256 KB). ``b""``: closed; None: nothing yet (or lost)."""
        parts: list[bytes] = []
        size = 0
        while size < 262144:
            try:
                chunk = c.sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except OSError as exc:
                if parts:
                    break
                self.lost(c, f"recv: {exc}")
                return None
            if not chunk:
                if parts:
                    break
                return b""
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts) if parts else None

    def _handshake(self, c: Conn) -> None:
        try:
            c.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self.ep.modify(c.fd, _EP_IN)
            return
        except ssl.SSLWantWriteError:
            self.ep.modify(c.fd, _EP_IN | _EP_OUT)
            return
        except (ssl.SSLError, OSError) as exc:
            self.lost(c, f"TLS handshake: {exc}")
            return
        c.state = S_CONNACK
        self.ep.modify(c.fd, _EP_IN)
        self.send(c, c.connect_pkt)

    def _writable(self, c: Conn) -> None:
        if c.state == S_CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.lost(c, f"connect: {os.strerror(err)}")
                return
            if self.tls is not None:
                c.sock = self.tls.wrap_socket(c.sock, do_handshake_on_connect=False)
                c.state = S_HANDSHAKE
                self._handshake(c)
                return
            c.state = S_CONNACK
            self.ep.modify(c.fd, _EP_IN)
            self.send(c, c.connect_pkt)
            return
        if c.state == S_HANDSHAKE:
            self._handshake(c)
            return
        if c.out and self.tls is not None:
            while c.out:
                try:
                    n = c.sock.send(c.out[:TLS_WRITE])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self.ep.modify(c.fd, _EP_IN | _EP_OUT)
                    return
                except OSError as exc:
                    self.lost(c, f"send: {exc}")
                    return
                del c.out[:n]
        elif c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self.lost(c, f"send: {exc}")
                return
            del c.out[:n]
        if not c.out:
            self.ep.modify(c.fd, _EP_IN)
            if c.role == "pub" and self.plan.qos and not self.paced and self.publishing:
                self.top_up(c)

    def poll(self, timeout: float) -> int:
        """One pass: returns the bytes read."""
        got = 0
        by_fd = self.by_fd
        for fd, ev in self.ep.poll(timeout):
            c = by_fd.get(fd)
            if c is None:
                if fd == self.pipe_fd:
                    self._read_pipe()
                continue
            if ev & _EP_OUT or c.state == S_CONNECTING:
                self._writable(c)
                if c.state == S_CLOSED:
                    continue
            if c.state == S_HANDSHAKE:
                self._handshake(c)
                continue
            if ev & (_EP_IN | _EP_ERR) and c.state != S_CONNECTING:
                if self.tls is not None:
                    data = self._recv_tls(c)
                    if data is None:
                        continue
                else:
                    try:
                        data = c.sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.lost(c, f"recv: {exc}")
                        continue
                if not data:
                    self.lost(c, "closed by the broker")
                    continue
                got += len(data)
                self.on_data(c, data)
        self.bytes_in += got
        return got

    def _read_pipe(self) -> None:
        try:
            while self.pipe.poll():
                self.cmds.append(self.pipe.recv())
        except (EOFError, OSError):
            self.cmds.append(("exit", None))
            with contextlib.suppress(Exception):
                self.ep.unregister(self.pipe_fd)

    def wait_cmd(self, timeout: float) -> tuple[str, Any]:
        """Keep serving the sockets until the parent says something."""
        deadline = time.monotonic() + timeout
        while not self.cmds:
            left = deadline - time.monotonic()
            if left <= 0:
                return ("exit", "timeout waiting for the parent")
            self.poll(min(left, 0.005))
            self.ping()
        return self.cmds.popleft()

    def ping(self) -> None:
        now = time.monotonic()
        if now >= self.next_ping:
            self.next_ping = now + max(1.0, self.plan.keepalive / 2)
            for c in list(self.by_fd.values()):
                if c.state == S_READY and c.role != "stuck":
                    self.send(c, w.PINGREQ_PACKET)

    # ------------------------------------------------------------------ parser
    def _accepted(self, c: Conn, pid: int) -> None:
        """The broker took responsibility for the message sent with ``pid``."""
        seq = c.pid_seq[pid]
        if seq < 0:  # a second PUBREC for the same flow
            return
        c.pid_seq[pid] = -1
        self.acked += 1
        if c.track:
            c.acked_bits[seq] = 1
            self.t_acked += 1

    def on_data(self, c: Conn, data: bytes) -> None:
        plan = self.plan
        stamp = plan.stamp
        track = c.track and c.role == "sub"
        parse = stamp or track
        v5 = plan.proto == 5
        if stamp:
            now = time.monotonic_ns()  # the receive time, right after the recv
            lat = self.lat
            warm = self.warm_ns
        if track:
            tracks = c.tracks
            unpack = _HDR.unpack_from
        if c.buf:
            data = c.buf + data
            c.buf = b""
        self.reads += 1
        n = len(data)
        i = 0
        count = 0
        uniq = 0
        acks: list[bytes] = []
        freed = 0
        while i + 2 <= n:
            first = data[i]
            rl = data[i + 1]
            j = i + 2
            if rl & 0x80:
                rl &= 0x7F
                shift = 7
                complete = False
                while j < n and shift <= 21:
                    b = data[j]
                    j += 1
                    rl |= (b & 0x7F) << shift
                    if not b & 0x80:
                        complete = True
                        break
                    shift += 7
                if not complete:
                    if shift > 21:
                        self.lost(c, "malformed remaining length")
                        return
                    break
            end = j + rl
            if end > n:
                break
            t = first >> 4
            if t == 3:  # PUBLISH
                count += 1
                q = (first >> 1) & 3
                if q or parse:
                    p = j + 2 + ((data[j] << 8) | data[j + 1])
                    if q:
                        acks.append((b"\x40\x02" if q == 1 else b"\x50\x02") + data[p:p + 2])
                        p += 2
                    if parse and v5:  # skip the property list
                        plen, p = w.read_varint(data, p)
                        p += plen
                    if track:
                        if end - p >= _HDR_LEN:
                            gi, sq = unpack(data, p)
                            tr = tracks.get(gi)
                            if tr is None:
                                tr = tracks[gi] = [bytearray(4096), -1, 0, 0]
                            cnt = tr[0]
                            if sq >= len(cnt) and sq < _MAX_SEQ:
                                cnt.extend(bytes(max(sq + 1 - len(cnt), len(cnt))))
                            if sq >= _MAX_SEQ:
                                self.bad_payload += 1
                            elif cnt[sq]:  # a second copy
                                tr[3] += 1
                                if cnt[sq] < 255:
                                    cnt[sq] += 1
                            else:
                                cnt[sq] = 1
                                uniq += 1
                                if sq < tr[1]:
                                    tr[2] += 1  # first delivered after a later one
                                else:
                                    tr[1] = sq
                        else:
                            self.bad_payload += 1
                        p += _HDR_LEN
                    if stamp and end - p >= 8:
                        ts = int.from_bytes(data[p:p + 8], "big")
                        if ts >= warm and len(lat) < MAX_LAT_SAMPLES:
                            lat.append(now - ts)
            elif t == 4:  # PUBACK: a QoS 1 publish accepted (or refused), its slot is free
                pid = (data[j] << 8) | data[j + 1]
                if pid in c.inflight:
                    c.inflight.discard(pid)
                    freed += 1
                    if rl > 2 and data[j + 2] >= 0x80:
                        self.ack_errors += 1
                    else:
                        self._accepted(c, pid)
            elif t == 5:  # PUBREC: a QoS 2 publish accepted (or refused)
                pid = (data[j] << 8) | data[j + 1]
                if rl > 2 and data[j + 2] >= 0x80:  # refused: the flow ends here
                    self.ack_errors += 1
                    if pid in c.inflight:
                        c.inflight.discard(pid)
                        c.pid_seq[pid] = -1
                        freed += 1
                else:
                    acks.append(b"\x62\x02" + data[j:j + 2])
                    if pid in c.inflight:
                        self._accepted(c, pid)
            elif t == 7:  # PUBCOMP: the QoS 2 flow is over, its slot is free
                pid = (data[j] << 8) | data[j + 1]
                if pid in c.inflight:
                    c.inflight.discard(pid)
                    freed += 1
            elif t == 6:  # PUBREL (to a QoS 2 subscriber)
                acks.append(b"\x70\x02" + data[j:j + 2])
            elif t == 2:  # CONNACK
                self._connack(c, data[j:end])
            elif t == 9:  # SUBACK
                self._suback(c, data[j:end])
            elif t == 14:  # DISCONNECT from the server (MQTT 5)
                code = data[j] if rl else 0
                self.note(f"{c.cid}: DISCONNECT from the broker, reason 0x{code:02x}")
            # PINGRESP (13), UNSUBACK (11): nothing to do
            i = end
        if i < n:
            c.buf = data[i:]
        idx = plan.index
        if count:
            self.last_recv_ns = time.monotonic_ns()
            c.recv += uniq if track else count
            self.recv_total += uniq if track else count
            self.recv_arr[idx] = self.recv_total
            partner = c.partner
            if partner is not None and partner.blocked_e2e and self.publishing and not self.paced:
                self.top_up(partner)
        if acks:
            self.send(c, b"".join(acks))
        if c.track and c.role == "pub":
            self.t_inflight -= freed
            self.infl_arr[idx] = self.t_inflight
            self.acked_arr[idx] = self.t_acked
        if freed and not self.paced and self.publishing:
            self.top_up(c)

    def _connack(self, c: Conn, body: bytes) -> None:
        if c.state != S_CONNACK:
            return
        try:
            code, props = w.connack_result(body, self.plan.proto)
        except (ValueError, IndexError) as exc:
            self.lost(c, f"bad CONNACK: {exc}")
            return
        c.connack_code = code
        if code != 0:
            c.error = f"CONNACK refused, code 0x{code:02x}"
            self.lost(c, c.error)
            return
        rm = props.get(w.PROP_RECEIVE_MAXIMUM)
        if rm:
            c.window = min(c.window, rm)
        c.min_batch = max(1, c.window // 4)
        if c.filter is not None:
            c.state = S_SUBACK
            self.send(c, w.subscribe(1, [(c.filter, self.plan.qos)], proto=self.plan.proto))
        else:
            c.state = S_READY

    def _suback(self, c: Conn, body: bytes) -> None:
        if c.state != S_SUBACK:
            return
        codes = body[2:]
        if self.plan.proto == 5 and codes:
            plen, j = w.read_varint(codes, 0)
            codes = codes[j + plen:]
        if not codes or codes[0] >= 0x80:
            c.error = f"SUBSCRIBE {c.filter!r} refused: {codes.hex()}"
            self.lost(c, c.error)
            return
        c.state = S_READY

    # ------------------------------------------------------------------ setup
    def connect_many(self, specs: list[tuple[str, str, str | None, bool, int]],
                     concurrency: int, keepalive: int | None = None) -> list[Conn]:
        """Open ``(client id, role, filter, clean, expiry)`` connections; all must succeed."""
        todo = list(reversed(specs))
        active: list[Conn] = []
        done: list[Conn] = []
        deadline = time.monotonic() + self.plan.timeout + len(specs) / 200
        while todo or active:
            if time.monotonic() > deadline:
                raise SetupError(f"{len(active) + len(todo)} of {len(specs)} connections "
                                 f"not ready after {self.plan.timeout:.0f} s")
            while todo and len(active) < concurrency:
                cid, role, flt, clean, expiry = todo.pop()
                c = self.open(cid, role, clean=clean, expiry=expiry, keepalive=keepalive)
                c.filter = flt
                if c.state == S_CLOSED:
                    raise SetupError(f"{cid}: {c.error}")
                active.append(c)
            self.poll(0.02)
            still = []
            for c in active:
                if c.state == S_READY:
                    done.append(c)
                elif c.state == S_CLOSED:
                    raise SetupError(f"{c.cid}: {c.error or 'closed'}")
                else:
                    still.append(c)
            active = still
            if self.cmds and self.cmds[0][0] == "exit":
                raise SetupError("parent gone")
        return done

    def setup(self) -> None:
        plan = self.plan
        conc = max(1, plan.connect_concurrency)
        if plan.stuck:
            # subscribed, then never read again (and never write: no PINGREQ, keepalive 0);
            # out of the epoll set, so that their data does not wake the loop
            stuck = self.connect_many([(cid, "stuck", flt, True, 0) for cid, flt in plan.stuck],
                                      conc, keepalive=plan.stuck_keepalive)
            for c in stuck:
                with contextlib.suppress(Exception):
                    self.ep.unregister(c.fd)
                self.by_fd.pop(c.fd, None)
            self.stuck = stuck
        self.subs = self.connect_many(
            [(cid, "sub", flt, plan.sub_clean, plan.sub_expiry) for cid, flt in plan.subs], conc)
        by_id = {c.cid: c for c in self.subs}
        self.subs = [by_id[cid] for cid, _ in plan.subs]
        for c in self.subs:
            c.track = plan.track and plan.qos > 0
        pubs = self.connect_many([(cid, "pub", None, True, 0) for cid, _ in plan.pubs], conc)
        by_id = {c.cid: c for c in pubs}
        self.pubs = [by_id[cid] for cid, _ in plan.pubs]
        tail = self.mid + self.payload_bytes
        for k, (c, (_, topic)) in enumerate(zip(self.pubs, plan.pubs)):
            prefix, _ = w.publish_parts(topic, len(self.payload_bytes), qos=plan.qos, proto=plan.proto)
            c.prefix = prefix
            if plan.qos:
                size = len(prefix) + 2 + len(tail)
                # packet ids cycle through 1..pid_max, well above the window
                c.pid_max = min(65535, max(4 * c.window, min(4096, (4 << 20) // max(size, 1)), 16))
                c.pid_seq = [-1] * (c.pid_max + 1)
                c.track = plan.track
                if c.track:
                    c.gid = plan.pub_gids[k]
                    c.gid_b = c.gid.to_bytes(4, "big")
                    c.acked_bits = bytearray(4096)
                    # message = pkts[pid] + sequence number (+ stamp) + pad
                    c.pkts = [b""] + [prefix + w.PID_BYTES[i] + self.mid + c.gid_b
                                      for i in range(1, c.pid_max + 1)]
                else:
                    c.pkts = [b""] + [prefix + w.PID_BYTES[i] + tail for i in range(1, c.pid_max + 1)]
            else:
                c.batch = (prefix + tail) * plan.batch
        if plan.pairs and plan.e2e_window > 0 and plan.qos:
            for pub, sub in zip(self.pubs, self.subs):
                pub.partner = sub
                sub.partner = pub

    # ------------------------------------------------------------------ publishing
    def _pid(self, c: Conn) -> int:
        pid = c.next_pid
        inflight = c.inflight
        top = c.pid_max
        while pid in inflight:
            pid = pid + 1 if pid < top else 1
        c.next_pid = pid + 1 if pid < top else 1
        inflight.add(pid)
        return pid

    def send_qos(self, c: Conn, k: int, min_batch: int = 1) -> int:
        """Up to ``k`` QoS 1/2 messages within the windows; returns how many were sent.

        Nothing is sent while fewer than ``min_batch`` fit and some are still
        outstanding: a few more acknowledgements make one larger write.
        """
        room = c.window - len(c.inflight)
        k = min(k, room)
        partner = c.partner
        if partner is not None:  # opt-in end-to-end window: sent but not yet received
            room = c.e2e - (c.sent - partner.recv)
            c.blocked_e2e = room < k
            k = min(k, room)
        if k < min_batch and c.inflight:
            return 0
        if k <= 0 or c.state != S_READY:
            return 0
        pid = self._pid
        pkts, pid_seq = c.pkts, c.pid_seq
        parts = []
        if c.track:
            seq = c.seq
            if seq + k > len(c.acked_bits):
                c.acked_bits.extend(bytes(max(k, len(c.acked_bits))))
            pad = self.pad
            stamp = self.plan.stamp
            for _ in range(k):
                p = pid(c)
                pid_seq[p] = seq
                if stamp:  # stamped right before the send
                    parts.append(pkts[p] + seq.to_bytes(4, "big")
                                 + time.monotonic_ns().to_bytes(8, "big") + pad)
                else:
                    parts.append(pkts[p] + seq.to_bytes(4, "big") + pad)
                seq += 1
            c.seq = seq
            self.t_inflight += k
            self.infl_arr[self.plan.index] = self.t_inflight
        else:
            for _ in range(k):
                p = pid(c)
                pid_seq[p] = 0
                parts.append(pkts[p])
        self.send(c, b"".join(parts))
        c.sent += k
        self.sent_total += k
        self.sent_arr[self.plan.index] = self.sent_total
        return k

    def top_up(self, c: Conn) -> None:
        if not c.out:
            self.send_qos(c, c.window, c.min_batch)

    def qos0_step(self) -> int:
        """Closed-loop QoS 0: one batch per publisher unless too much is outstanding.

        Open loop (``plan.open_loop``): one batch per publisher whose socket took
        the last one, however many deliveries are outstanding.
        """
        plan = self.plan
        sent_arr, recv_arr = self.sent_arr, self.recv_arr
        if not plan.open_loop:
            got = sum(recv_arr)
            outstanding = sum(sent_arr) * plan.fan - got - self.written_off
            limit = plan.qos0_window
            if outstanding > (limit * 3 // 4 if self.stalled else limit):
                self.stalled = True
                now = time.monotonic()
                if got != self.stall_seen:
                    self.stall_seen, self.stall_since = got, now
                elif now - self.stall_since > 1.0:  # nothing arrives for 1 s: count the rest as lost
                    self.written_off += outstanding
                    self.stall_since = now
                return -1
            self.stalled = False
        wrote = 0
        nb = plan.batch
        for p in self.pubs:
            if len(p.out) < _OUT_HIGH and p.state == S_READY:
                self.send(p, p.batch)
                p.sent += nb
                wrote += nb
        if wrote:
            self.sent_total += wrote
            sent_arr[plan.index] = self.sent_total
        return wrote

    def paced_step(self, t_start: float, now: float) -> None:
        plan = self.plan
        due = int(plan.rate_per_pub * (now - t_start)) + 1
        pad = self.payload_bytes[8:]
        for p in self.pubs:
            k = due - p.sent
            if k <= 0 or len(p.out) >= _OUT_HIGH or p.state != S_READY:
                continue
            if plan.qos:
                self.send_qos(p, k)
                continue
            head = p.prefix + self.mid
            if plan.stamp:
                parts = [head + time.monotonic_ns().to_bytes(8, "big") + pad for _ in range(k)]
            else:
                parts = [head + self.payload_bytes] * k
            self.send(p, b"".join(parts))
            p.sent += k
            self.sent_total += k
            self.sent_arr[plan.index] = self.sent_total

    # ------------------------------------------------------------------ phases
    def mark_warm(self) -> None:
        self.recv_at_warm, self.sent_at_warm = self.recv_total, self.sent_total
        self.acked_at_warm = self.acked

    def mark_end(self) -> None:
        self.recv_at_end, self.sent_at_end = self.recv_total, self.sent_total
        self.acked_at_end = self.acked

    def run_load(self, t_start: float, t_warm: float, t_end: float) -> None:
        plan = self.plan
        mono = time.monotonic
        self.warm_ns = int(t_warm * 1e9)
        if plan.stamp and plan.stamp_paced:
            self.run_latency(t_start, t_warm, t_end)
            return
        while mono() < t_start:
            self.poll(min(0.005, max(0.0, t_start - mono())))
        coalesce = plan.coalesce_ms / 1000
        warm_marked = False
        self.publishing = bool(self.pubs)
        if self.publishing and plan.qos and not self.paced:
            for p in self.pubs:
                self.send_qos(p, p.window)
        last_tick = 0.0
        hard_stop = t_end + 5.0
        while True:
            now = mono()
            if not warm_marked and now >= t_warm:
                warm_marked = True
                self.mark_warm()
            if now >= t_end or now > hard_stop:
                break
            did = 0
            if self.publishing:
                if self.paced:
                    if now - last_tick >= 0.002:
                        last_tick = now
                        self.paced_step(t_start, now)
                elif plan.qos == 0:
                    did = self.qos0_step()
            got = self.poll(0 if did > 0 else 0.001)
            if coalesce and did <= 0 and got < _COALESCE_BYTES:
                time.sleep(coalesce)
            if self.cmds and self.cmds[0][0] == "exit":
                break
            self.ping()
        self.mark_end()
        self.publishing = False

    def run_latency(self, t_start: float, t_warm: float, t_end: float) -> None:
        """latency-qos1 and the fairness canary: paced, stamped messages.

        A publisher waits until each message's own due time (``due_offsets``
        spread the pairs evenly), sends it alone (``send_qos`` stamps it right
        before the ``send``), then reads the acknowledgements that have arrived
        without waiting. A process that only publishes sleeps until the due
        time; one that also subscribes (the canary) waits in epoll until the due
        time, so that a delivery is read as soon as it arrives. A process that
        only subscribes blocks in epoll until data arrives. None of them spins,
        coalesces reads or polls on a tick.
        """
        mono = time.monotonic
        pubs, offsets = self.pubs, self.plan.due_offsets
        period = 1.0 / self.plan.rate_per_pub if pubs else 0.0
        mixed = bool(self.subs)
        self.publishing = bool(pubs)
        k = j = 0  # the next message: round k, publisher j
        warm_marked = False
        while True:
            now = mono()
            if not warm_marked and now >= t_warm:
                warm_marked = True
                self.mark_warm()
            if now >= t_end:
                break
            wake = t_end if warm_marked else t_warm
            if pubs:
                due = t_start + offsets[j] + k * period
                if due > now:
                    if mixed:
                        self.poll(min(due, wake) - now)
                    else:
                        time.sleep(min(due, wake) - now)
                    continue
                if not self.send_qos(pubs[j], 1):  # the window is full: msg/s shows it
                    self.skipped += 1
                j += 1
                if j == len(pubs):
                    j, k = 0, k + 1
                self.poll(0)
            else:
                self.poll(min(1.0, wake - now))  # the pipe wakes it too
            if self.cmds and self.cmds[0][0] == "exit":
                break
            self.ping()
        self.mark_end()
        self.publishing = False

    def close_all(self, conns: list[Conn]) -> None:
        for c in conns:
            c.leaving = True
            self.send(c, w.DISCONNECT_PACKET)
        # the broker closes after DISCONNECT: its side keeps the TIME_WAIT, not our ports
        deadline = time.monotonic() + 3.0
        while any(c.state != S_CLOSED for c in conns) and time.monotonic() < deadline:
            self.poll(0.01)
        for c in conns:
            self.lost(c, "")

    def stuck_report(self) -> list[dict[str, Any]]:
        """The never-reading subscribers: still connected? bytes waiting unread."""
        out = []
        for c in self.stuck:
            state, unread = -1, -1
            with contextlib.suppress(OSError):
                state = c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
            with contextlib.suppress(OSError):
                unread = struct.unpack("i", fcntl.ioctl(c.fd, termios.FIONREAD, b"\0" * 4))[0]
            out.append({"cid": c.cid, "connected": state == _TCP_ESTABLISHED,
                        "tcp_state": state, "unread_bytes": unread})
        return out

    def drop_stuck(self) -> None:
        for c in self.stuck:
            with contextlib.suppress(OSError):
                c.sock.send(w.DISCONNECT_PACKET)
            c.state = S_CLOSED
            c.sock.close()
        self.stuck = []

    def stats(self) -> dict[str, Any]:
        t = os.times()
        return {
            "index": self.plan.index, "kind": self.plan.kind,
            "sent": self.sent_total, "recv": self.recv_total,
            "recv_warm": self.recv_at_warm, "recv_end": self.recv_at_end,
            "sent_warm": self.sent_at_warm, "sent_end": self.sent_at_end,
            "acked": self.acked, "acked_warm": self.acked_at_warm, "acked_end": self.acked_at_end,
            "ack_errors": self.ack_errors, "lat_ns": self.lat,
            "skipped": self.skipped, "bad_payload": self.bad_payload,
            # checked messages: what each publisher had acknowledged, what each subscriber got
            "pub_acked": {c.gid: bytes(c.acked_bits[:c.seq]) for c in self.pubs if c.track},
            "sub_tracks": {c.cid: {gi: (bytes(tr[0][:tr[1] + 1]), tr[2], tr[3])
                                   for gi, tr in c.tracks.items()}
                           for c in self.subs if c.track},
            "connect_ok": 0, "connect_fail": 0, "connect_ns": [], "first_connack": 0,
            "last_connack": 0,
            "cpu": (t.user + t.system) - (self.cpu0.user + self.cpu0.system),
            "reads": self.reads, "bytes_in": self.bytes_in, "last_recv_ns": self.last_recv_ns,
            "errors": self.errors[:20], "error_count": self.error_count,
        }

    def run(self) -> None:
        plan = self.plan
        try:
            self.setup()
        except SetupError as exc:
            self.tell("error", f"generator {plan.index} setup: {exc}")
            self.close_all(list(self.by_fd.values()))
            self.drop_stuck()
            return
        self.tell("ready", len(self.subs), len(self.pubs))
        kind, arg = self.wait_cmd(120)
        if kind != "start":
            self.close_all(self.subs + self.pubs)
            self.drop_stuck()
            return
        self.run_load(*arg)
        self.tell("published", self.sent_total)
        self.wait_cmd(300)
        stuck = self.stuck_report()
        self.drop_stuck()
        self.close_all(self.subs + self.pubs)
        if plan.cleanup_sessions and plan.subs:
            # remove the persistent sessions: connect again with a clean session, then leave
            with contextlib.suppress(SetupError):
                wipers = self.connect_many([(cid, "wipe", None, True, 0) for cid, _ in plan.subs],
                                           max(1, plan.connect_concurrency))
                self.close_all(wipers)
        st = self.stats()
        st["stuck"] = stuck
        self.tell("done", st)


class _Pending:
    __slots__ = ("buf", "cid", "index", "phase", "t0")

    def __init__(self, cid: str, t0: int, index: int = 0) -> None:
        self.cid, self.t0, self.phase, self.buf, self.index = cid, t0, 0, b"", index


def make_certificates(directory: Path) -> dict[str, str]:
    """--tls: a CA and a server certificate for 127.0.0.1 (ECDSA P-256), readable by a broker
    that dropped its privileges."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(cn: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    out = {"ca": directory / "ca.crt", "crt": directory / "server.crt", "key": directory / "server.key"}
    out["ca"].write_bytes(cert("bench CA", ca_key, "bench CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    out["crt"].write_bytes(cert("127.0.0.1", srv_key, "bench CA", ca_key, False)
                           .public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    for path in out.values():
        os.chmod(path, 0o644)
    return {k: str(v) for k, v in out.items()}


def auth_user(i: int, users: int) -> tuple[str, str]:
    """connect-auth: the user and password of client ``i``."""
    k = i % users
    return f"bench-user-{k}", f"pw-{k}-{k * 7919 % 1000}"


def write_password_file(path: Path, users: int, iterations: int) -> None:
    """``users`` users in Mosquitto's $7$ format (PBKDF2-HMAC-SHA512, 12-byte salt), which both
    brokers read; made here, not with either broker's code."""
    import base64

    lines = []
    for k in range(users):
        user, password = auth_user(k, users)
        salt = secrets.token_bytes(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
        lines.append(f"{user}:$7${iterations}${base64.b64encode(salt).decode()}$"
                     f"{base64.b64encode(digest).decode()}")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)


def run_idle(plan: Plan, conn: mpc.Connection) -> None:
    """connect-rate: raw non-blocking sockets on one epoll selector, no asyncio.

    Keeps up to ``connect_concurrency`` handshakes (TCP connect, with --tls a full TLS
    handshake (no session resumption), CONNECT, CONNACK) in flight, then holds the
    connections idle until told to stop.
    """
    tls: ssl.SSLContext | None = None
    if plan.tls_ca:
        tls = ssl.create_default_context(cafile=plan.tls_ca)
        tls.check_hostname = False
    t_begin = os.times()
    conn.send(("ready", 0, 0))
    if not conn.poll(120):
        return
    kind, arg = conn.recv()
    if kind != "start":
        return
    t_start = arg[0]
    delay = t_start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    sel = selectors.DefaultSelector()
    todo = list(reversed(plan.idle))
    pending: dict[socket.socket, _Pending] = {}
    held: list[socket.socket] = []
    times: list[int] = []
    errors: list[str] = []
    fail = 0
    first = last = 0
    limit = max(1, plan.connect_concurrency)
    timeout_ns = int(plan.timeout * 1e9)
    deadline = time.monotonic() + plan.timeout + len(plan.idle) / 100 + 30
    next_sweep = time.monotonic() + 0.5
    addr = (plan.host, plan.port)

    def send_connect(sock: socket.socket, st: _Pending) -> None:
        user = auth_user(st.index, plan.auth_users) if plan.auth_users else None
        sock.send(w.connect(st.cid, proto=plan.proto, keepalive=plan.keepalive,
                            username=user and user[0], password=user and user[1]))
        st.phase = 1
        sel.modify(sock, selectors.EVENT_READ)

    def drop(sock: socket.socket, why: str, cid: str) -> None:
        nonlocal fail
        fail += 1
        if len(errors) < 20:
            errors.append(f"{cid}: {why}")
        with contextlib.suppress(Exception):
            sel.unregister(sock)
        pending.pop(sock, None)
        sock.close()

    while (todo or pending) and time.monotonic() < deadline:
        while todo and len(pending) < limit:
            cid = todo.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            rc = sock.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                fail += 1
                if len(errors) < 20:
                    errors.append(f"{cid}: connect: {os.strerror(rc)}")
                sock.close()
                continue
            pending[sock] = _Pending(cid, time.monotonic_ns(), len(plan.idle) - len(todo) - 1 + plan.index * 1_000_000)
            sel.register(sock, selectors.EVENT_WRITE)
        for key, _mask in sel.select(timeout=0.2):
            sock = key.fileobj  # type: ignore[assignment]
            st = pending.get(sock)
            if st is None:
                continue
            if st.phase == 0:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(sock, f"connect: {os.strerror(err)}", st.cid)
                    continue
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if tls is None:
                        send_connect(sock, st)
                        continue
                    sel.unregister(sock)
                    del pending[sock]
                    sock = tls.wrap_socket(sock, do_handshake_on_connect=False)  # the same descriptor
                    pending[sock] = st
                    sel.register(sock, selectors.EVENT_READ)
                    st.phase = 2
                except OSError as exc:
                    drop(sock, f"send CONNECT: {exc}", st.cid)
                    continue
            if st.phase == 2:  # the TLS handshake, then CONNECT through it
                assert isinstance(sock, ssl.SSLSocket)
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                except ssl.SSLWantWriteError:
                    sel.modify(sock, selectors.EVENT_WRITE)
                    continue
                except OSError as exc:
                    drop(sock, f"TLS handshake: {exc}", st.cid)
                    continue
                try:
                    send_connect(sock, st)
                except OSError as exc:
                    drop(sock, f"send CONNECT: {exc}", st.cid)
                continue
            try:
                data = sock.recv(256)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as exc:
                drop(sock, f"recv: {exc}", st.cid)
                continue
            if not data:
                drop(sock, "closed before CONNACK", st.cid)
                continue
            st.buf += data
            try:
                frames, _ = w.split_frames(st.buf)
            except ValueError:
                drop(sock, "malformed reply", st.cid)
                continue
            if not frames:
                continue
            ptype, body = frames[0]
            code = w.connack_result(body, plan.proto)[0] if ptype >> 4 == w.CONNACK else -1
            if code != 0:
                drop(sock, f"CONNACK code {code}", st.cid)
                continue
            now = time.monotonic_ns()
            times.append(now - st.t0)
            first = first or now
            last = now
            sel.unregister(sock)
            del pending[sock]
            held.append(sock)
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + 0.5
            now = time.monotonic_ns()
            for sock, st in list(pending.items()):
                if now - st.t0 > timeout_ns:
                    drop(sock, "timeout", st.cid)
    for sock, st in list(pending.items()):
        drop(sock, "timeout", st.cid)
    fail += len(todo)

    def stats() -> dict[str, Any]:
        t = os.times()
        return {"index": plan.index, "sent": 0, "recv": 0, "recv_warm": 0, "recv_end": 0,
                "sent_warm": 0, "sent_end": 0, "acked": 0, "ack_errors": 0, "lat_ns": [],
                "connect_ok": len(times), "connect_fail": fail, "connect_ns": times,
                "first_connack": first, "last_connack": last,
                "cpu": (t.user + t.system) - (t_begin.user + t_begin.system), "reads": 0,
                "errors": errors[:20], "error_count": len(errors)}

    conn.send(("connected", stats()))
    if plan.subs_each:
        if not conn.poll(300):
            return
        if conn.recv()[0] != "subscribe":
            return
        conn.send(("subscribed", subscribe_idle(plan, held, sel)))
    conn.poll(300)  # "stop" (or the parent is gone)
    # DISCONNECT, then let the broker close first (its side keeps the TIME_WAIT)
    for sock in held:
        with contextlib.suppress(OSError):
            sock.send(w.DISCONNECT_PACKET)
        with contextlib.suppress(Exception):
            sel.register(sock, selectors.EVENT_READ)
    open_socks = set(held)
    end = time.monotonic() + 3.0
    while open_socks and time.monotonic() < end:
        for key, _mask in sel.select(timeout=0.2):
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(4096)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                open_socks.discard(sock)
    for sock in open_socks:
        sock.close()
    sel.close()
    conn.send(("done", stats()))


SUBS_PER_PACKET = 10


def subscription_filter(client: int, k: int) -> str:
    """The k-th filter of idle connection ``client`` in the subscriptions scenario: a
    device's own topics, every other one with a wildcard (``+`` or ``#``)."""
    if k % 4 == 1:
        return f"bench/dev/{client}/{k}/+"
    if k % 4 == 3:
        return f"bench/dev/{client}/{k}/#"
    return f"bench/dev/{client}/{k}/state"


def subscribe_idle(plan: Plan, held: list[socket.socket], sel: selectors.BaseSelector) -> dict[str, Any]:
    """subscriptions: every held connection subscribes to ``plan.subs_each`` filters of its
    own, ``SUBS_PER_PACKET`` per SUBSCRIBE, one SUBSCRIBE outstanding per connection;
    returns how many were granted and when the last SUBACK came."""
    t0 = time.monotonic_ns()
    todo: dict[socket.socket, list[list[tuple[str, int]]]] = {}
    for j, sock in enumerate(held):
        client = plan.index * 1_000_000 + j
        filters = [(subscription_filter(client, k), 1) for k in range(plan.subs_each)]
        todo[sock] = [filters[i:i + SUBS_PER_PACKET] for i in range(0, len(filters), SUBS_PER_PACKET)]
    bufs: dict[socket.socket, bytes] = {sock: b"" for sock in held}
    granted = refused = 0
    errors: list[str] = []
    pid = 1

    def send_next(sock: socket.socket) -> bool:
        nonlocal pid
        batches = todo[sock]
        if not batches:
            return False
        sock.sendall(w.subscribe(pid, batches.pop(), proto=plan.proto))
        pid = pid % 65535 + 1
        return True

    waiting = set()
    for sock in held:
        sel.register(sock, selectors.EVENT_READ)
        if send_next(sock):
            waiting.add(sock)
    deadline = time.monotonic() + plan.timeout + plan.subs_each * len(held) / 2000
    last = t0
    while waiting and time.monotonic() < deadline:
        for key, _mask in sel.select(timeout=0.2):
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                errors.append(f"recv: {exc}")
            if not data:
                waiting.discard(sock)
                sel.unregister(sock)
                errors.append("closed while subscribing")
                continue
            frames, used = w.split_frames(bufs[sock] + data)
            bufs[sock] = (bufs[sock] + data)[used:]
            for ptype, body in frames:
                if ptype >> 4 != w.SUBACK:
                    continue
                codes = body[2:] if plan.proto != 5 else body[2 + 1 + body[2]:]
                granted += sum(1 for c in codes if c < 0x80)
                refused += sum(1 for c in codes if c >= 0x80)
                last = time.monotonic_ns()
                if not send_next(sock):
                    waiting.discard(sock)
    for sock in held:
        with contextlib.suppress(Exception):
            sel.unregister(sock)
    if waiting:
        errors.append(f"{len(waiting)} connections still waiting for a SUBACK")
    return {"granted": granted, "refused": refused, "first": t0, "last": last, "errors": errors[:5]}


def worker_main(plan: Plan, conn: mpc.Connection, shared: dict[str, Any]) -> None:
    _pdeathsig(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    _raise_nofile()
    if plan.idle:
        try:
            run_idle(plan, conn)
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                conn.send(("error", f"worker {plan.index} crashed: {exc!r}"))
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return
    profile_dir = os.environ.get("BENCH_PROFILE")  # for profiling the generator itself
    prof = None
    if profile_dir:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        Engine(plan, conn, shared).run()
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            conn.send(("error", f"generator {plan.index} crashed: {exc!r}"))
    finally:
        if prof is not None:
            prof.disable()
            with contextlib.suppress(Exception):
                prof.dump_stats(os.path.join(profile_dir or ".",
                                             f"gen-{plan.index}-{os.getpid()}.prof"))
        with contextlib.suppress(Exception):
            conn.close()


# =====================================================================================
# Brokers
# =====================================================================================

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:
    os.setsid()
    _pdeathsig(signal.SIGTERM)


def ids_for_shards(prefix: str, shards: int) -> list[str]:
    """One client id per shard (``shards`` ids), found by counting up a suffix."""
    out: dict[int, str] = {}
    k = 0
    while len(out) < shards and k < 100_000:
        cid = f"{prefix}{k}"
        out.setdefault(shard_for(cid, shards), cid)
        k += 1
    return [out[s] for s in sorted(out)]


def probe(host: str, port: int, client_id: str, proto: int, timeout: float = 2.0,
          creds: tuple[str, str] | None = None) -> bool:
    """CONNECT / CONNACK / DISCONNECT over a blocking socket."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(w.connect(client_id, proto=proto, username=creds and creds[0],
                                password=creds and creds[1]))
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
                frames, _ = w.split_frames(data)
                if frames:
                    first, body = frames[0]
                    ok = first >> 4 == w.CONNACK and w.connack_result(body, proto)[0] == 0
                    if ok:
                        with contextlib.suppress(OSError):
                            s.sendall(w.DISCONNECT_PACKET)
                    return ok
    except (OSError, ValueError):
        return False
    return False


class Broker:
    """A broker under test: started by us, or an external ``--target``."""

    def __init__(self, label: str, kind: str, host: str, port: int, shards: int = 1) -> None:
        self.label = label
        self.kind = kind  # "shardbroker", "mosquitto" or "target"
        self.host = host
        self.port = port
        self.shards = shards
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.tmp: str | None = None
        self.errlog: Path | None = None
        self.creds: tuple[str, str] | None = None  # what the readiness probe logs in with
        self.tls_port = 0  # --tls: the generators connect here, over TLS
        self.tls_ca = ""

    def __repr__(self) -> str:
        return f"{self.label} ({self.host}:{self.port})"

    def _spawn(self, argv: list[str], cwd: Path | None = None) -> None:
        assert self.tmp is not None
        self.errlog = Path(self.tmp) / "stderr.log"
        err = open(self.errlog, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=cwd, preexec_fn=_child_setup,  # noqa: PLW1509 - no threads here
                                         close_fds=True)
        finally:
            err.close()
        self.pid = self.proc.pid

    def _tail(self) -> str:
        if self.errlog and self.errlog.exists():
            return self.errlog.read_text(errors="replace")[-2000:]
        return ""

    def wait_ready(self, timeout: float, proto: int) -> None:
        deadline = time.monotonic() + timeout
        ids = ids_for_shards("bench-probe-", self.shards)
        pending = list(ids)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with status {self.proc.returncode}:\n{self._tail()}")
            pending = [cid for cid in pending if not probe(self.host, self.port, cid, proto, 1.0, self.creds)]
            if not pending:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s:\n{self._tail()}")

    @classmethod
    def shardbroker(cls, label: str, workers: int, durability: str | None, python: str,
                    proto: int, timeout: float, password_file: Path | None = None,
                    tls: dict[str, str] | None = None, quiet: bool = False) -> Broker:
        b = cls(label, "shardbroker", "127.0.0.1", free_port(), shards=workers)
        b.tmp = tempfile.mkdtemp(prefix="bench-sb-")
        argv = [python, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1", "--port", str(b.port),
                "--workers", str(workers), "--data-dir", str(Path(b.tmp) / "data")]
        if quiet:
            argv += ["--log-level", "warning"]
        if durability:
            argv += ["--durability", durability]
        text = ""
        if password_file is not None:
            text += f'[auth]\npassword_file = "{password_file}"\n'
            b.creds = auth_user(0, 1)
        if tls is not None:
            b.tls_port, b.tls_ca = free_port(), tls["ca"]
            text += (f'[[listener]]\nport = {b.port}\n\n[[listener]]\ntype = "mqtts"\nport = {b.tls_port}\n'
                     f'certfile = "{tls["crt"]}"\nkeyfile = "{tls["key"]}"\n')
        if text:
            conf = Path(b.tmp) / "broker.toml"
            conf.write_text(text)
            argv += ["--config", str(conf)]
        b._spawn(argv, cwd=REPO_ROOT)
        try:
            b.wait_ready(timeout, proto)
        except BaseException:
            b.stop()
            raise
        return b

    @classmethod
    def mosquitto(cls, label: str, persistence: bool, proto: int, timeout: float,
                  password_file: Path | None = None, tls: dict[str, str] | None = None,
                  quiet: bool = False) -> Broker:
        b = cls(label, "mosquitto", "127.0.0.1", free_port())
        b.tmp = tempfile.mkdtemp(prefix="bench-mosq-")
        os.chmod(b.tmp, 0o777)  # mosquitto drops root privileges to its own user
        lines = [f"listener {b.port} 127.0.0.1",
                 "allow_anonymous true" if password_file is None else "allow_anonymous false",
                 "log_dest stderr"]  # its default when not a daemon: error, warning, notice, information
        if quiet:
            lines += ["log_type error", "log_type warning", "connection_messages false"]
        if password_file is not None:
            lines.append(f"password_file {password_file}")
            b.creds = auth_user(0, 1)
        if tls is not None:
            b.tls_port, b.tls_ca = free_port(), tls["ca"]
            lines += [f"listener {b.tls_port} 127.0.0.1", f"certfile {tls['crt']}", f"keyfile {tls['key']}"]
        if persistence:
            pdir = Path(b.tmp) / "persist"
            pdir.mkdir()
            os.chmod(pdir, 0o777)
            lines += ["persistence true", f"persistence_location {pdir}/"]
        else:
            lines += ["persistence false"]
        conf = Path(b.tmp) / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o644)
        b._spawn([MOSQUITTO, "-c", str(conf)])
        try:
            b.wait_ready(timeout, proto)
        except BaseException:
            b.stop()
            raise
        return b

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        if self.proc is not None:
            # children left in the group (a worker that outlived its supervisor)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def child_pids() -> dict[int, list[int]]:
    """Every process's children by parent pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree_pids(root: int | None) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    if not root:
        return []
    children = child_pids()
    out, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_kb(root: int | None) -> int | None:
    """Sum of VmRSS (kB) over ``root`` and all its descendants."""
    total, found = 0, False
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        found = True
                        break
        except OSError:
            continue
    return total if found else None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_s(root: int | None) -> float | None:
    """CPU seconds (user + system) used so far by ``root`` and its descendants."""
    total, found = 0, False
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total / _CLK_TCK if found else None


# =====================================================================================
# Scenarios (parent side)
# =====================================================================================

@dataclass
class Metric:
    key: str
    unit: str
    higher_is_better: bool = True


def _checked_metrics(qos: int) -> list[Metric]:
    return [Metric("delivered msg/s", "msg/s"), Metric("acked msg/s", "msg/s"),
            Metric("acked", "msgs"), Metric("delivered", "msgs"), Metric("lost", "msgs", False),
            Metric(f"qos{qos} dup", "msgs", False), Metric("reordered", "msgs", False)]


_FAIRNESS_METRICS = [
    Metric("canary p50 ms", "ms", False), Metric("canary p99 ms", "ms", False),
    Metric("canary max ms", "ms", False), Metric("canary sent", "msgs"),
    Metric("canary delivered", "msgs"), Metric("canary lost", "msgs", False),
    Metric("canary not sent", "msgs", False),
    Metric("flood msg/s", "msg/s"), Metric("stuck connected", "conns"),
]

SCENARIO_METRICS: dict[str, list[Metric]] = {
    "fanin-qos0": [Metric("msg/s", "msg/s"), Metric("loss", "msgs", False)],
    "pairs-qos1": _checked_metrics(1),
    "pairs-qos2": _checked_metrics(2),
    "fanout-qos0": [Metric("deliveries/s", "msg/s"), Metric("loss", "msgs", False)],
    "latency-qos1": [Metric("p50 ms", "ms", False), Metric("p90 ms", "ms", False), Metric("p99 ms", "ms", False),
                     Metric("p99.9 ms", "ms", False), Metric("max ms", "ms", False),
                     Metric("delivered msg/s", "msg/s"), Metric("acked", "msgs"),
                     Metric("delivered", "msgs"), Metric("lost", "msgs", False),
                     Metric("qos1 dup", "msgs", False), Metric("reordered", "msgs", False)],
    "fairness": _FAIRNESS_METRICS,
    "fairness-qos1": _FAIRNESS_METRICS,
    "connect-rate": [Metric("conn/s", "conn/s"), Metric("KB/idle conn", "KB", False),
                     Metric("failed", "conns", False)],
    "connect-auth": [Metric("conn/s", "conn/s"), Metric("failed", "conns", False)],
    "subscriptions": [Metric("B/subscription", "B", False), Metric("subscriptions/s", "subs/s"),
                      Metric("refused", "subs", False)],
    "persistent-qos1": _checked_metrics(1),
}
# scenarios whose QoS 1/2 messages are checked one by one: a loss fails the run
CHECKED = {"pairs-qos1", "pairs-qos2", "latency-qos1", "persistent-qos1", "fairness",
           "fairness-qos1"}
FAIRNESS = {"fairness", "fairness-qos1"}
CANARY_TOPIC = "bench/canary"
FLOOD_FILTER = "bench/flood/#"


def _cross_pair_ids(tag: str, i: int, shards: int) -> tuple[str, str]:
    pub = f"bp{i}-{tag}"
    ps = shard_for(pub, shards)
    k = 0
    while True:
        sub = f"bs{i}-{tag}-{k}"
        if shards <= 1 or shard_for(sub, shards) != ps or k > 1000:
            return pub, sub
        k += 1


def _ids_avoiding(prefix: str, count: int, shards: int, avoid: int) -> list[str]:
    """``count`` ids spread round-robin over every shard except ``avoid`` (-1: all shards)."""
    if shards <= 1:
        return [f"{prefix}{i}" for i in range(count)]
    targets = [s for s in range(shards) if s != avoid]
    buckets: dict[int, list[str]] = {s: [] for s in targets}
    need = {s: (count // len(targets)) + (1 if idx < count % len(targets) else 0)
            for idx, s in enumerate(targets)}
    k = 0
    while any(len(buckets[s]) < need[s] for s in targets) and k < count * 50 + 1000:
        cid = f"{prefix}{k}"
        s = shard_for(cid, shards)
        if s in buckets and len(buckets[s]) < need[s]:
            buckets[s].append(cid)
        k += 1
    out: list[str] = []
    for r in range(max(need.values())):
        for s in targets:
            if r < len(buckets[s]):
                out.append(buckets[s][r])
    return out


def _id_on_shard(prefix: str, shard: int, shards: int) -> str:
    """The first ``prefix<k>`` that ``shard_for`` places on ``shard``."""
    for k in range(100_000):
        cid = f"{prefix}{k}"
        if shards <= 1 or shard_for(cid, shards) == shard:
            return cid
    return f"{prefix}0"


def fairness_ids(tag: str, stuck: int, flood: int, shards: int) -> dict[str, Any]:
    """Client ids of a fairness run.

    The never-reading subscribers and the flood publishers are spread over all
    shards; with 2+ shards the canary's publisher and subscriber are on different
    shards, each one shared with a never-reading subscriber.
    """
    stuck_ids = _ids_avoiding(f"bk-{tag}-", stuck, shards, -1)
    flood_ids = _ids_avoiding(f"bf-{tag}-", flood, shards, -1)
    on = sorted({shard_for(cid, shards) for cid in stuck_ids}) or [0]
    pub = _id_on_shard(f"bcp-{tag}-", on[0], shards)
    sub = _id_on_shard(f"bcs-{tag}-", on[1 % len(on)], shards)
    return {"stuck": stuck_ids, "flood": flood_ids, "canary_pub": pub, "canary_sub": sub}


def build_plans(scn: str, broker: Broker, args: argparse.Namespace,
                tag: str) -> tuple[list[Plan], dict[int, list[str]]]:
    """The generator processes' plans, and for each checked publisher (by index) the
    client ids of the subscribers that must receive everything it had acknowledged."""
    procs = max(2 if scn == "latency-qos1" or scn in FAIRNESS else 1, args.procs)
    shards = broker.shards
    common: dict[str, Any] = {
        "host": broker.host, "port": broker.tls_port or broker.port, "proto": args.protocol, "payload": args.payload,
        "coalesce_ms": args.read_coalesce_ms, "e2e_window": args.e2e_window, "window": args.window,
        "qos0_window": args.qos0_window, "batch": args.batch,
        "connect_concurrency": args.connect_concurrency, "timeout": args.timeout,
        "tls_ca": broker.tls_ca if broker.tls_port else "",
    }
    plans = [Plan(index=k, **common) for k in range(procs)]
    expect: dict[int, list[str]] = {}

    def every(**kw: Any) -> None:
        for p in plans:
            for k, v in kw.items():
                setattr(p, k, v)

    rate_total = args.rate
    if scn == "fanin-qos0":
        n = args.fanin_publishers
        every(qos=0, fan=1)
        sub_id = f"bs-fanin-{tag}"
        pub_ids = _ids_avoiding(f"bp-fanin-{tag}-", n, shards, shard_for(sub_id, shards))
        plans[0].subs.append((sub_id, "bench/fanin/+"))
        pub_procs = plans[1:] if procs > 1 else plans
        for i, cid in enumerate(pub_ids):
            pub_procs[i % len(pub_procs)].pubs.append((cid, f"bench/fanin/{i}"))
        npub = n
    elif scn in ("pairs-qos1", "pairs-qos2", "latency-qos1", "persistent-qos1"):
        qos = 2 if scn == "pairs-qos2" else 1
        every(qos=qos, fan=1, pairs=True, track=True,
              window=args.window_qos2 if qos == 2 else args.window)
        n = args.pairs
        base = {"persistent-qos1": f"bench/persist/{tag}", "latency-qos1": "bench/lat"}.get(scn, "bench/pairs")
        pub_plans = sub_plans = plans
        if scn == "latency-qos1":
            # publishers and subscribers in separate processes; message k of pair i is
            # due at k * n / rate + i / rate: the pairs' messages evenly spread
            every(stamp=True, coalesce_ms=0.0)
            rate_total = args.latency_rate
            pub_plans, sub_plans = plans[:procs // 2], plans[procs // 2:]
        for i in range(n):
            pub, sub = _cross_pair_ids(tag, i, shards)
            pp = pub_plans[i % len(pub_plans)]
            pp.pubs.append((pub, f"{base}/{i}"))
            pp.pub_gids.append(i)
            sub_plans[i % len(sub_plans)].subs.append((sub, f"{base}/{i}"))
            expect[i] = [sub]
            if pp.stamp:
                pp.due_offsets.append(i / rate_total)
        if scn == "persistent-qos1":
            every(sub_clean=False, sub_expiry=3600 if args.protocol == 5 else 0,
                  cleanup_sessions=True)
        npub = n
    elif scn in FAIRNESS:
        # process 0: the canary pair alone; the others: flood publishers and the
        # subscribers that never read
        qos = 1 if scn == "fairness-qos1" else 0
        every(qos=qos, kind="flood", coalesce_ms=0.0, open_loop=qos == 0,
              stuck_keepalive=args.stuck_keepalive)
        ids = fairness_ids(tag, args.stuck_subscribers, args.flood_publishers, shards)
        flood = plans[1:]
        for i, cid in enumerate(ids["stuck"]):
            flood[i % len(flood)].stuck.append((cid, FLOOD_FILTER))
        for i, cid in enumerate(ids["flood"]):
            flood[i % len(flood)].pubs.append((cid, f"bench/flood/{i}"))
        canary = plans[0]
        canary.kind, canary.qos, canary.track, canary.stamp = "canary", 1, True, True
        canary.open_loop = False
        canary.rate_per_pub = args.canary_rate
        canary.pubs.append((ids["canary_pub"], CANARY_TOPIC))
        canary.pub_gids.append(0)
        canary.due_offsets.append(0.0)
        canary.subs.append((ids["canary_sub"], CANARY_TOPIC))
        expect[0] = [ids["canary_sub"]]
        npub = 0  # --rate does not apply: the flood goes as fast as the sockets take it
    elif scn == "fanout-qos0":
        n = args.fanout_subscribers
        every(qos=0, fan=n)
        pub_id = f"bp-fanout-{tag}"
        plans[0].pubs.append((pub_id, "bench/fanout"))
        for i, cid in enumerate(_ids_avoiding(f"bs-fanout-{tag}-", n, shards, shard_for(pub_id, shards))):
            plans[i % procs].subs.append((cid, "bench/fanout"))
        npub = 1
        # keep a batch well under the delivery window
        every(batch=max(1, min(args.batch, args.qos0_window // (4 * n))))
    elif scn in FRESH:
        count = args.subscribers if scn == "subscriptions" else args.connections
        for i in range(count):
            plans[i % procs].idle.append(f"bc-{tag}-{i}")
        every(keepalive=300, connect_concurrency=max(1, args.connect_concurrency // procs))
        if scn == "subscriptions":
            every(subs_each=args.subscriptions_each)
        if scn == "connect-auth":
            every(auth_users=args.auth_users)
        npub = 0
    else:
        raise ValueError(scn)
    if rate_total and npub:
        every(rate_per_pub=rate_total / npub)
    # large payloads: keep a write batch near 64 KB and the outstanding deliveries near 16 MB
    pkt = args.payload + 40
    for p in plans:
        p.batch = max(1, min(p.batch, (64 << 10) // pkt))
        p.qos0_window = max(4 * p.batch * max(1, p.fan), min(p.qos0_window, (16 << 20) // pkt))
    return [p for p in plans if p.subs or p.pubs or p.idle or p.stuck], expect


class RunError(Exception):
    pass


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return float(sorted_vals[k])


_NONZERO_TO_0 = bytes([1] + [0] * 255)  # bytes.translate: 0 -> 1, anything else -> 0
_ZERO_TO_0 = bytes([0] + [1] * 255)     # bytes.translate: 0 -> 0, anything else -> 1


def _runs(flags: bytes, limit: int = 5) -> list[str]:
    """The first ``limit`` runs of 1 bytes in ``flags``, as 'a-b' strings."""
    out: list[str] = []
    i = flags.find(1)
    while i >= 0 and len(out) < limit:
        j = flags.find(0, i)
        j = len(flags) if j < 0 else j
        out.append(f"{i}" if j == i + 1 else f"{i}-{j - 1}")
        i = flags.find(1, j)
    return out


def check_messages(res: list[dict[str, Any]], expect: dict[int, list[str]]) -> dict[str, Any]:
    """Compare what the broker acknowledged with what the subscribers received.

    ``lost``: acknowledged, never delivered to a subscriber that was online and
    subscribed all along; ``dup``: copies beyond the first; ``reordered``: first
    deliveries of a message after a later one of the same publisher.
    """
    pub_acked: dict[int, bytes] = {}
    tracks: dict[str, dict[int, tuple[bytes, int, int]]] = {}
    for r in res:
        pub_acked.update(r.get("pub_acked", {}))
        tracks.update(r.get("sub_tracks", {}))
    acked = delivered = lost = dup = reordered = not_acked = 0
    examples: list[str] = []
    expected_pairs = set()
    for gid, bits in pub_acked.items():
        acked += bits.count(1)
        for cid in expect.get(gid, []):
            expected_pairs.add((cid, gid))
            counts, reord, dups = tracks.get(cid, {}).get(gid, (b"", 0, 0))
            size = max(len(bits), len(counts))
            bits_p = bits.ljust(size, b"\0")
            missing = counts.ljust(size, b"\0").translate(_NONZERO_TO_0)  # 1 = never arrived
            delivered += len(counts) - counts.count(0)
            reordered += reord
            dup += dups
            a, m = int.from_bytes(bits_p, "big"), int.from_bytes(missing, "big")
            n_lost = (a & m).bit_count()
            # delivered although the acknowledgement never came (in flight at the end,
            # or refused): not a loss, shown for information
            arrived = counts.ljust(size, b"\0").translate(_ZERO_TO_0)
            unacked = bits_p.translate(_NONZERO_TO_0)
            not_acked += (int.from_bytes(arrived, "big") & int.from_bytes(unacked, "big")).bit_count()
            if n_lost:
                lost += n_lost
                if len(examples) < 5:
                    flags = (a & m).to_bytes(size, "big")
                    examples.append(f"publisher {gid} -> {cid}: seq {', '.join(_runs(flags))}")
    unexpected = sum(len(counts) - counts.count(0)
                     for cid, per in tracks.items() for gid, (counts, _, _) in per.items()
                     if (cid, gid) not in expected_pairs)
    return {"acked": acked, "delivered": delivered, "lost": lost, "dup": dup,
            "reordered": reordered, "delivered_not_acked": not_acked,
            "unexpected": unexpected, "lost_examples": examples,
            "bad_payload": sum(r.get("bad_payload", 0) for r in res)}


def verdict(scn: str, out: dict[str, Any]) -> list[str]:
    """Why a run failed (empty: it passed)."""
    if out.get("_failed"):
        return [f"run error: {out['_failed']}"]
    if scn not in CHECKED:
        return []
    pre = "canary " if scn in FAIRNESS else ""
    why = []
    if out.get(f"{pre}lost"):
        why.append(f"{pre}lost {out[f'{pre}lost']:.0f}")
    if out.get(f"{pre}reordered"):
        why.append(f"{pre}reordered {out[f'{pre}reordered']:.0f}")
    if out.get(f"{pre}qos2 dup"):
        why.append(f"{pre}qos2 dup {out[f'{pre}qos2 dup']:.0f}")
    if out.get("_bad_payload"):
        why.append(f"{out['_bad_payload']} unreadable payloads")
    if out.get("_unexpected"):
        why.append(f"{out['_unexpected']} messages delivered to the wrong subscriber")
    if not out.get(f"{pre}acked"):
        why.append("nothing was acknowledged")
    return why


def run_once(scn: str, broker: Broker, args: argparse.Namespace) -> dict[str, Any]:
    """One run of one scenario against one broker: returns {metric: value}."""
    tag = secrets.token_hex(3)
    plans, expect = build_plans(scn, broker, args, tag)
    return run_plans(scn, plans, expect, args, {"broker": broker.pid})


def _trees_rss_kb(roots: dict[str, int | None]) -> int | None:
    sizes = [tree_rss_kb(pid) for pid in roots.values()]
    return None if not sizes or None in sizes else sum(s for s in sizes if s is not None)


def _trees_cpu_s(roots: dict[str, int | None]) -> dict[str, float | None]:
    return {label: tree_cpu_s(pid) for label, pid in roots.items()}


def run_plans(scn: str, plans: list[Plan], expect: dict[int, list[str]], args: argparse.Namespace,
              roots: dict[str, int | None]) -> dict[str, Any]:
    """Run the generator processes of ``plans`` as scenario ``scn`` and return {metric: value}.

    ``expect``: the subscribers of each checked publisher (``build_plans``); ``roots``: the
    root pid of each broker process tree by label (several for a broker over several nodes),
    whose memory is summed and whose CPU seconds over the measured window are given one by
    one as ``_cpu_s`` (with that window's length, ``_cpu_wall_s``). Of ``args``, the timing
    options are used (duration, timeout, drain, drain_idle; subscribers and
    subscriptions_each for the subscriptions scenario)."""
    ctx = mp.get_context("fork")
    shared = {k: ctx.RawArray("q", len(plans) + 1) for k in ("sent", "recv", "acked", "inflight")}
    sent_arr, recv_arr = shared["sent"], shared["recv"]
    acked_arr, infl_arr = shared["acked"], shared["inflight"]
    workers: list[tuple[Any, mpc.Connection]] = []
    try:
        for plan in plans:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(plan, child_end, shared),
                               daemon=True, name=f"bench-gen-{plan.index}")
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        conns = [c for _, c in workers]

        def collect(kind: str, timeout: float) -> list[Any]:
            got: dict[int, Any] = {}
            deadline = time.monotonic() + timeout
            while len(got) < len(conns):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunError(f"timeout waiting for '{kind}' from generator processes")
                ready = mpc.wait([c for i, c in enumerate(conns) if i not in got], timeout=left)
                for c in ready:
                    assert isinstance(c, mpc.Connection)
                    idx = conns.index(c)
                    try:
                        msg = c.recv()
                    except EOFError:
                        raise RunError(f"generator {idx} exited") from None
                    if msg[0] == "error":
                        raise RunError(msg[1])
                    if msg[0] == kind:
                        got[idx] = msg[1:]
            return [got[i] for i in range(len(conns))]

        def broadcast(*msg: Any) -> None:
            for c in conns:
                with contextlib.suppress(OSError):
                    c.send(msg)

        collect("ready", args.timeout * 3 + 10)
        rss_before = _trees_rss_kb(roots)
        warm = min(1.0, max(0.2, args.duration * 0.1))
        t_start = time.monotonic() + 0.3
        t_warm, t_end = t_start + warm, t_start + args.duration
        broadcast("start", (t_start, t_warm, t_end))
        out: dict[str, Any] = {}
        if scn == "subscriptions":
            collect("connected", args.timeout * 3 + 60)
            time.sleep(1.0)
            rss_mid = _trees_rss_kb(roots)
            broadcast("subscribe", None)
            res = [r[0] for r in collect("subscribed", args.timeout * 3 + 600)]
            time.sleep(1.0)
            rss_after = _trees_rss_kb(roots)
            granted = sum(r["granted"] for r in res)
            first = min(r["first"] for r in res)
            last = max(r["last"] for r in res)
            out["B/subscription"] = ((rss_after - rss_mid) * 1024 / granted
                                     if rss_mid is not None and rss_after is not None and granted else None)
            out["subscriptions/s"] = granted / ((last - first) / 1e9) if last > first else 0.0
            out["refused"] = float(sum(r["refused"] for r in res)
                                   + args.subscribers * args.subscriptions_each - granted)
            out["_rss_mid_kb"], out["_rss_after_kb"] = rss_mid, rss_after
            errors = [e for r in res for e in r["errors"]]
            if errors:
                out["_errors"] = errors[:5]
            broadcast("stop", None)
            collect("done", 60)
            return out
        if scn in ("connect-rate", "connect-auth"):
            res = [r[0] for r in collect("connected", args.timeout * 3 + 60)]
            ok = sum(r["connect_ok"] for r in res)
            fail = sum(r["connect_fail"] for r in res)
            last = max((r["last_connack"] for r in res), default=0)
            elapsed = (last / 1e9 - t_start) if last else float("nan")
            time.sleep(1.0)  # let the broker settle before measuring memory
            rss_after = _trees_rss_kb(roots)
            out["conn/s"] = ok / elapsed if ok and elapsed > 0 else 0.0
            out["failed"] = float(fail)
            out["KB/idle conn"] = ((rss_after - rss_before) / ok
                                   if rss_before is not None and rss_after is not None and ok else None)
            lat = sorted(x for r in res for x in r["connect_ns"])
            out["_connect_p50_ms"] = _percentile(lat, 50) / 1e6 if lat else None
            out["_connect_p99_ms"] = _percentile(lat, 99) / 1e6 if lat else None
            out["_rss_before_kb"] = rss_before
            out["_rss_after_kb"] = rss_after
            errors = [e for r in res for e in r["errors"]]
            broadcast("stop", None)
            final = [r[0] for r in collect("done", 60)]
            out["_gen_cpu"] = sum(r["cpu"] for r in final)
            out["_gen_cpu_each"] = [round(r["cpu"], 2) for r in final]
            if errors:
                out["_errors"] = errors[:5]
            return out

        time.sleep(max(0.0, t_warm - time.monotonic()))
        cpus_before, wall_before = _trees_cpu_s(roots), time.monotonic()
        collect("published", args.duration + args.timeout + 10)
        cpus_after = _trees_cpu_s(roots)
        cpu_wall = time.monotonic() - wall_before
        used = {label: after - before for label, before in cpus_before.items()
                if before is not None and (after := cpus_after[label]) is not None and after >= before}
        if used and len(used) == len(roots):
            out["_broker_cpu_pct"] = round(100 * sum(used.values()) / cpu_wall, 1)
            out["_cpu_s"], out["_cpu_wall_s"] = used, cpu_wall
        fan = plans[0].fan
        checked = scn in CHECKED
        # drain: until everything expected has arrived, or nothing moves for a while
        t_drain = time.monotonic()
        deadline = t_drain + args.drain
        idle = args.drain_idle if checked else min(1.0, args.drain_idle)
        last: tuple[int, ...] = ()
        last_change = t_drain
        while time.monotonic() < deadline:
            got = sum(recv_arr)
            if checked:  # every acknowledged message delivered, no flow still open
                state = (sum(acked_arr), got, sum(infl_arr))
                if state[2] == 0 and got >= state[0]:
                    break
            else:
                state = (got,)
                if got >= sum(sent_arr) * fan:
                    break
            if state != last:
                last, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > idle:
                break
            time.sleep(0.02)
        out["_drain_s"] = round(time.monotonic() - t_drain, 2)
        broadcast("stop", None)
        res = [r[0] for r in collect("done", args.timeout + 30)]
        window = t_end - t_warm
        errors = [e for r in res for e in r["errors"]]
        out["_gen_cpu"] = sum(r["cpu"] for r in res)
        out["_gen_cpu_each"] = [round(r["cpu"], 2) for r in res]
        out["_reads"] = [r["reads"] for r in res]
        out["_ack_errors"] = sum(r["ack_errors"] for r in res)
        if errors:
            out["_errors"] = errors[:5]
        if scn in FAIRNESS:
            can = [r for r in res if r["kind"] == "canary"]
            flood = [r for r in res if r["kind"] == "flood"]
            chk = check_messages(can, expect)
            lat = sorted(x for r in can for x in r["lat_ns"])
            out["canary p50 ms"] = _percentile(lat, 50) / 1e6 if lat else None
            out["canary p99 ms"] = _percentile(lat, 99) / 1e6 if lat else None
            out["canary max ms"] = lat[-1] / 1e6 if lat else None
            out["canary sent"] = float(sum(r["sent"] for r in can))
            out["canary acked"] = float(chk["acked"])
            out["canary delivered"] = float(chk["delivered"])
            out["canary lost"] = float(chk["lost"])
            out["canary qos1 dup"] = float(chk["dup"])
            out["canary reordered"] = float(chk["reordered"])
            out["_canary_samples"] = len(lat)
            out["canary not sent"] = float(sum(r["skipped"] for r in can))
            key = "acked" if plans[-1].qos else "sent"
            out["flood msg/s"] = sum(r[f"{key}_end"] - r[f"{key}_warm"] for r in flood) / window
            stuck = [s for r in flood for s in r.get("stuck", [])]
            out["stuck connected"] = float(sum(1 for s in stuck if s["connected"]))
            out["_stuck"] = len(stuck)
            out["_stuck_unread_bytes"] = [s["unread_bytes"] for s in stuck]
            out["_lost_examples"] = chk["lost_examples"]
            out["_bad_payload"] = chk["bad_payload"]
            out["_unexpected"] = chk["unexpected"]
            # the broker refusing or dropping the never-reading clients is its right
            out.pop("_errors", None)
            mine = [e for e in errors if not e.startswith("bk-")]
            if mine:
                out["_errors"] = mine[:5]
        elif checked:
            chk = check_messages(res, expect)
            qos = plans[0].qos
            out["delivered msg/s"] = (sum(r["recv_end"] - r["recv_warm"] for r in res)) / window
            out["acked msg/s"] = (sum(r["acked_end"] - r["acked_warm"] for r in res)) / window
            out["acked"] = float(chk["acked"])
            out["delivered"] = float(chk["delivered"])
            out["lost"] = float(chk["lost"])
            out[f"qos{qos} dup"] = float(chk["dup"])
            out["reordered"] = float(chk["reordered"])
            out["_sent"] = sum(r["sent"] for r in res)
            out["_publish_rate"] = sum(r["sent_end"] - r["sent_warm"] for r in res) / window
            out["_delivered_not_acked"] = chk["delivered_not_acked"]
            out["_lost_examples"] = chk["lost_examples"]
            out["_bad_payload"] = chk["bad_payload"]
            out["_unexpected"] = chk["unexpected"]
            if scn == "latency-qos1" or any(p.stamp for p in plans):
                lat = sorted(x for r in res for x in r["lat_ns"])
                for q in (50, 90, 99, 99.9):
                    out[f"p{q:g} ms"] = _percentile(lat, q) / 1e6 if lat else None
                out["max ms"] = lat[-1] / 1e6 if lat else None
                out["_samples"] = len(lat)
                out["_not_sent"] = sum(r["skipped"] for r in res)
        else:
            sent = sum(r["sent"] for r in res)
            recv = sum(r["recv"] for r in res)
            key = "deliveries/s" if scn == "fanout-qos0" else "msg/s"
            out[key] = (sum(r["recv_end"] for r in res) - sum(r["recv_warm"] for r in res)) / window
            out["loss"] = float(sent * fan - recv)
            out["_sent"] = sent
            out["_received"] = recv
            out["_publish_rate"] = sum(r["sent_end"] - r["sent_warm"] for r in res) / window
            last_recv = max((r.get("last_recv_ns", 0) for r in res), default=0)
            if last_recv:
                # everything received over the time from start to the last delivery (drain included)
                out["_overall_rate"] = recv / max(1e-9, last_recv / 1e9 - t_start)
        return out
    except BaseException:  # Ctrl-C, SIGTERM, a failed run: do not wait for the generators
        for proc, _ in workers:
            with contextlib.suppress(Exception):
                proc.kill()
        raise
    finally:
        for proc, c in workers:
            with contextlib.suppress(Exception):
                c.close()
        for proc, _ in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# =====================================================================================
# Reporting
# =====================================================================================

def fmt(v: float | str | None, metric: str) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if metric.endswith("ms"):
        return f"{v:,.2f}"
    if metric.startswith("KB"):
        return f"{v:,.1f}"
    return f"{v:,.0f}"


def median(vals: list[float | None]) -> float | None:
    good = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(good) if good else None


def print_table(rows: list[dict[str, Any]], col_a: str, col_b: str | None) -> None:
    header = ["scenario", "metric", col_a] + ([col_b, "ratio"] if col_b else [])
    lines = [header]
    for r in rows:
        line = [r["scenario"], r["metric"], fmt(r["a"], r["metric"])]
        if col_b:
            ratio = r.get("ratio")
            line += [fmt(r["b"], r["metric"]), "n/a" if ratio is None else f"{ratio:.2f}"]
        lines.append(line)
    widths = [max(len(str(row[k])) for row in lines) for k in range(len(header))]
    for n, row in enumerate(lines):
        cells = [str(c).ljust(widths[k]) if k < 2 else str(c).rjust(widths[k]) for k, c in enumerate(row)]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * wdt for wdt in widths))


def describe(scn: str, label: str, n: int, total: int, m: dict[str, Any], dur: float) -> str:
    bits = []
    for metric in SCENARIO_METRICS[scn]:
        bits.append(f"{metric.key} {fmt(m.get(metric.key), metric.key)}")
    if m.get("_connect_p50_ms") is not None:
        bits.append(f"CONNACK p50/p99 {m['_connect_p50_ms']:.1f}/{m['_connect_p99_ms']:.1f} ms")
    if "_broker_cpu_pct" in m:
        bits.append(f"broker cpu {m['_broker_cpu_pct']:.0f}%")
    if "_gen_cpu_each" in m:
        bits.append(f"generator cpu s {m['_gen_cpu_each']}")
    if "_drain_s" in m:
        bits.append(f"drain {m['_drain_s']:.1f} s")
    if m.get("_publish_rate") is not None and scn in CHECKED:
        bits.append(f"published {m['_publish_rate']:,.0f} msg/s")
    if m.get("_delivered_not_acked"):
        bits.append(f"delivered before their ack {m['_delivered_not_acked']}")
    if m.get("_not_sent"):
        bits.append(f"not sent (window full) {m['_not_sent']}")
    if m.get("_stuck_unread_bytes"):
        bits.append(f"stuck unread bytes {m['_stuck_unread_bytes']}")
    if m.get("_ack_errors"):
        bits.append(f"refused by the broker {m['_ack_errors']}")
    if m.get("_errors"):
        bits.append(f"errors: {m['_errors'][:2]}")
    why = m.get("_verdict")
    if why:
        bits.append("FAILED: " + "; ".join(why))
        if m.get("_lost_examples"):
            bits.append(f"lost e.g. {m['_lost_examples'][:3]}")
    elif scn in CHECKED:
        bits.append("ok")
    return f"  [{scn}] {label} run {n}/{total}: " + ", ".join(bits)


# =====================================================================================
# Main
# =====================================================================================

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench",
                                 description="ShardBroker vs Mosquitto, side by side, on loopback.")
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="run only this scenario (repeatable); default: all")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load per run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per broker and scenario (default 3)")
    ap.add_argument("--payload", type=int, default=64, help="payload bytes (default 64)")
    ap.add_argument("--protocol", type=int, choices=(4, 5), default=4,
                    help="MQTT protocol level: 4 = 3.1.1 (default), 5 = 5.0")
    ap.add_argument("--workers", type=int, default=cpus,
                    help=f"ShardBroker --workers (default: CPU count = {cpus})")
    ap.add_argument("--durability", choices=("fsync", "no-fsync"), default=None,
                    help="ShardBroker --durability for the non-persistent scenarios (default: its own)")
    ap.add_argument("--procs", type=int, default=max(2, cpus),
                    help="generator processes (default: CPU count, at least 2; latency-qos1: "
                         "half publish, the others subscribe)")
    ap.add_argument("--broker-only", action="store_true", help="ShardBroker alone, no Mosquitto")
    ap.add_argument("--mosquitto-only", action="store_true",
                    help="Mosquitto alone (to check the generator)")
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="benchmark an already running broker on loopback (nothing is started)")
    ap.add_argument("--target-pid", type=int, default=None,
                    help="pid of the --target broker's top process (for connect-rate memory)")
    ap.add_argument("--shards", type=int, default=None,
                    help="shard count for choosing client ids with --target (default: --workers)")
    ap.add_argument("--json", metavar="FILE", help="also write all runs and medians as JSON")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ShardBroker")
    ap.add_argument("--logging", choices=("default", "quiet"), default="default",
                    help="default: each broker logs as its defaults say (ShardBroker at info, Mosquitto errors, "
                         "warnings, notices and information, both a line per connect and disconnect); "
                         "quiet: both log errors and warnings only")
    g = ap.add_argument_group("scenario sizes")
    g.add_argument("--fanin-publishers", type=int, default=8)
    g.add_argument("--pairs", type=int, default=50)
    g.add_argument("--fanout-subscribers", type=int, default=100)
    g.add_argument("--latency-rate", type=float, default=2000.0,
                   help="total msg/s in latency-qos1 (default 2000)")
    g.add_argument("--connections", type=int, default=5000, help="clients in connect-rate (default 5000)")
    g.add_argument("--tls", action="store_true",
                   help="clients connect over TLS (a listener of each broker with a certificate the bench "
                        "makes); every scenario but subscriptions (connect-rate/-auth: a full TLS handshake "
                        "per connection)")
    g.add_argument("--auth-users", type=int, default=100,
                   help="connect-auth: users in the password file, client i logs in as user i %% N (default 100)")
    g.add_argument("--auth-iterations", type=int, default=101,
                   help="connect-auth: PBKDF2 rounds of their hashes (default 101, what mosquitto_passwd "
                        "writes; ShardBroker's passwd writes 210000)")
    g.add_argument("--subscribers", type=int, default=200,
                   help="idle clients in subscriptions (default 200)")
    g.add_argument("--subscriptions-each", type=int, default=100,
                   help="filters of its own each of them subscribes to (default 100)")
    g.add_argument("--stuck-subscribers", type=int, default=4,
                   help="fairness: subscribers of bench/flood/# that never read (default 4)")
    g.add_argument("--flood-publishers", type=int, default=4,
                   help="fairness: publishers flooding bench/flood/<i> as fast as possible (default 4)")
    g.add_argument("--canary-rate", type=float, default=100.0,
                   help="fairness: the canary's QoS 1 msg/s on bench/canary (default 100)")
    g.add_argument("--canary-target-ms", type=float, default=50.0,
                   help="fairness: the canary p99 round trip aimed at, shown in the table "
                        "(default 50; not a failure)")
    g.add_argument("--stuck-keepalive", type=int, default=0,
                   help="fairness: keepalive of the never-reading subscribers (default 0 = none)")
    g.add_argument("--rate", type=float, default=0.0,
                   help="total publish rate msg/s for throughput scenarios (default 0 = max)")
    t = ap.add_argument_group("generator tuning")
    t.add_argument("--window", type=int, default=100,
                   help="QoS 1 (and fairness-qos1 flood) unacknowledged publishes per publisher "
                        "(default 100)")
    t.add_argument("--window-qos2", type=int, default=100,
                   help="QoS 2 unfinished flows (PUBREC or PUBCOMP outstanding) per publisher "
                        "(default 100)")
    t.add_argument("--e2e-window", type=int, default=0,
                   help="QoS 1/2 pairs: also keep at most this many messages sent but not yet "
                        "received, per pair (default 0 = off). It hides a broker that acknowledges "
                        "more than it delivers: for studying rates only")
    t.add_argument("--qos0-window", type=int, default=20000,
                   help="QoS 0 deliveries outstanding over all publishers (default 20000)")
    t.add_argument("--batch", type=int, default=64, help="QoS 0 messages per write (default 64)")
    t.add_argument("--connect-concurrency", type=int, default=80,
                   help="handshakes in flight over all generator processes in connect-rate "
                        "(default 80: Mosquitto listens with a backlog of 100, and an overflowing "
                        "backlog measures SYN retransmission timers instead of the broker)")
    t.add_argument("--read-coalesce-ms", type=float, default=2.0,
                   help="after a pass of the generator loop that read little, wait this long "
                        "so the next pass reads many messages per syscall (default 2; 0 = off; "
                        "always off for latency-qos1)")
    t.add_argument("--drain", type=float, default=30.0,
                   help="max seconds to wait for deliveries after publishing stops (default 30)")
    t.add_argument("--drain-idle", type=float, default=3.0,
                   help="stop draining when nothing arrived or was acknowledged for this many "
                        "seconds (default 3; QoS 0 scenarios: at most 1)")
    t.add_argument("--timeout", type=float, default=20.0, help="seconds for each wait (default 20)")
    t.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a broker to start")
    args = ap.parse_args(argv)
    if args.broker_only and args.mosquitto_only:
        ap.error("--broker-only and --mosquitto-only exclude each other")
    if args.target:
        host, _, port = args.target.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit():
            ap.error("--target must be HOST:PORT")
        if not is_loopback(host):
            ap.error("--target must be a loopback address (this tool only sends to this machine)")
        args.target_host, args.target_port = host, int(port)
    if args.duration <= 0 or args.duration > 3600:
        ap.error("--duration must be in (0, 3600]")
    if args.repeat < 1 or args.repeat > 100:
        ap.error("--repeat must be in 1..100")
    if args.payload < 0 or args.payload > 1_000_000:
        ap.error("--payload must be in 0..1000000")
    if args.connections < 1 or args.connections > 100_000:
        ap.error("--connections must be in 1..100000")
    if args.latency_rate <= 0:
        ap.error("--latency-rate must be above 0")
    if args.canary_rate <= 0:
        ap.error("--canary-rate must be above 0")
    if args.window < 1 or args.window_qos2 < 1:
        ap.error("--window and --window-qos2 must be at least 1")
    if args.stuck_subscribers < 0 or args.flood_publishers < 0:
        ap.error("--stuck-subscribers and --flood-publishers must not be negative")
    args.scenarios = args.scenario or list(SCENARIOS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _raise_nofile()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIGINT ignored)
    started: list[Broker] = []
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    have_mosq = os.path.exists(MOSQUITTO) and not args.broker_only and not args.target
    with_sb = not args.mosquitto_only and not args.target
    if args.mosquitto_only and not os.path.exists(MOSQUITTO):
        log(f"{MOSQUITTO} not found")
        return 2
    if not have_mosq and not args.target and not args.mosquitto_only and not args.broker_only:
        log(f"note: {MOSQUITTO} not found: ShardBroker alone")
    col_a = "target" if args.target else ("Mosquitto" if args.mosquitto_only else "ShardBroker")
    col_b = "Mosquitto" if (have_mosq and with_sb) else None

    tls: dict[str, str] | None = None
    if args.tls:
        tls_dir = Path(tempfile.mkdtemp(prefix="bench-tls-"))
        os.chmod(tls_dir, 0o755)  # mosquitto drops root privileges to its own user
        tls = make_certificates(tls_dir)

    def start_sb(label: str, durability: str | None, password_file: Path | None = None) -> Broker:
        log(f"starting ShardBroker ({label}, {args.workers} workers) ...")
        b = Broker.shardbroker(label, args.workers, durability, args.python, args.protocol,
                               args.start_timeout, password_file, tls, quiet=args.logging == "quiet")
        started.append(b)
        log(f"  {b} ready (pid {b.pid})")
        return b

    def start_mosq(label: str, persistence: bool, password_file: Path | None = None) -> Broker:
        log(f"starting Mosquitto ({label}) ...")
        b = Broker.mosquitto(label, persistence, args.protocol, args.start_timeout, password_file, tls,
                             quiet=args.logging == "quiet")
        started.append(b)
        log(f"  {b} ready (pid {b.pid})")
        return b

    def stop(b: Broker) -> None:
        b.stop()
        if b in started:
            started.remove(b)

    def run_series(scn: str, brokers: list[Any]) -> None:
        """``repeat`` rounds over ``brokers``, interleaved; an item is a running
        Broker or a ``(label, start)`` pair for a broker started fresh for each run."""
        for r in range(args.repeat):
            for item in brokers:
                fresh = isinstance(item, tuple)
                label = item[0] if fresh else item.label
                b = None
                try:
                    b = item[1]() if fresh else item
                    m = run_once(scn, b, args)
                except RunError as exc:
                    log(f"  [{scn}] {label} run {r + 1}/{args.repeat}: FAILED: {exc}")
                    m = {"_failed": str(exc)}
                finally:
                    if fresh and b is not None:
                        stop(b)
                m["_verdict"] = verdict(scn, m)
                log(describe(scn, label, r + 1, args.repeat, m, args.duration))
                runs.setdefault((scn, label), []).append(m)

    def add_rows(scn: str, row_label: str, a: str, b: str | None) -> None:
        for metric in SCENARIO_METRICS[scn]:
            va = median([m.get(metric.key) for m in runs.get((scn, a), [])])
            vb = median([m.get(metric.key) for m in runs.get((scn, b), [])]) if b else None
            ratio = va / vb if (va is not None and vb not in (None, 0)) else None
            rows.append({"scenario": row_label, "metric": metric.key, "a": va, "b": vb,
                         "ratio": ratio, "broker_a": a, "broker_b": b,
                         "higher_is_better": metric.higher_is_better})
        if scn in FAIRNESS:
            target = args.canary_target_ms

            def under(label: str | None) -> str | None:
                if label is None:
                    return None
                p99s = [m.get("canary p99 ms") for m in runs.get((scn, label), [])]
                ok = sum(1 for v in p99s if v is not None and v <= target)
                return f"{ok}/{len(p99s)} runs"
            rows.append({"scenario": row_label, "metric": f"canary p99 <= {target:g} ms",
                         "a": under(a), "b": under(b), "ratio": None, "broker_a": a,
                         "broker_b": b, "higher_is_better": True})
        if scn in CHECKED or any(m.get("_failed") for m in runs.get((scn, a), [])):

            def verdict_of(label: str | None) -> str | None:
                if label is None:
                    return None
                ms = runs.get((scn, label), [])
                bad = sum(1 for m in ms if m.get("_verdict"))
                return f"FAILED {bad}/{len(ms)}" if bad else "ok"
            rows.append({"scenario": row_label, "metric": "verdict", "a": verdict_of(a),
                         "b": verdict_of(b), "ratio": None, "broker_a": a, "broker_b": b,
                         "higher_is_better": True})

    try:
        if args.target:
            tb = Broker("target", "target", args.target_host, args.target_port,
                        shards=args.shards or args.workers)
            tb.pid = args.target_pid
            if not probe(tb.host, tb.port, "bench-probe-target", args.protocol):
                log(f"cannot CONNECT to {args.target}")
                return 2
            for scn in args.scenarios:
                run_series(scn, [tb])
                add_rows(scn, scn, tb.label, None)
        else:
            use_mosq = have_mosq or args.mosquitto_only
            labels = (["ShardBroker"] if with_sb else []) + (["Mosquitto"] if use_mosq else [])
            pair = (labels[0], labels[1] if len(labels) > 1 else None)
            plain = [s for s in args.scenarios if s not in (*FRESH, "persistent-qos1")]
            if plain:
                brokers: list[Broker] = []
                if with_sb:
                    brokers.append(start_sb("ShardBroker", args.durability))
                if use_mosq:
                    brokers.append(start_mosq("Mosquitto", False))
                for scn in plain:
                    run_series(scn, brokers)
                    add_rows(scn, scn, *pair)
                for b in brokers:
                    stop(b)
            for scn in FRESH:
                if scn not in args.scenarios:
                    continue
                # a fresh broker for every run, so that memory per connection or
                # subscription starts from a broker that has not yet grown its heap
                pwf: Path | None = None
                if scn == "connect-auth":
                    pw_dir = Path(tempfile.mkdtemp(prefix="bench-auth-"))
                    os.chmod(pw_dir, 0o755)  # mosquitto drops root privileges to its own user
                    pwf = pw_dir / "passwords"
                    write_password_file(pwf, args.auth_users, args.auth_iterations)
                fresh: list[Any] = []
                if with_sb:
                    fresh.append(("ShardBroker", lambda f=pwf: start_sb("ShardBroker", args.durability, f)))
                if use_mosq:
                    fresh.append(("Mosquitto", lambda f=pwf: start_mosq("Mosquitto", False, f)))
                run_series(scn, fresh)
                add_rows(scn, scn, *pair)
            if "persistent-qos1" in args.scenarios:
                scn = "persistent-qos1"
                brokers = []
                if with_sb:
                    brokers.append(start_sb("ShardBroker fsync", "fsync"))
                if use_mosq:
                    brokers.append(start_mosq("Mosquitto persistence", True))
                if with_sb:
                    brokers.append(start_sb("ShardBroker no-fsync", "no-fsync"))
                run_series(scn, brokers)  # fsync, Mosquitto, no-fsync, fsync, ...
                mosq_label = "Mosquitto persistence" if use_mosq else None
                if with_sb:
                    add_rows(scn, f"{scn} fsync", "ShardBroker fsync", mosq_label)
                    add_rows(scn, f"{scn} no-fsync", "ShardBroker no-fsync", mosq_label)
                elif mosq_label:
                    add_rows(scn, scn, mosq_label, None)
                for b in brokers:
                    stop(b)
    except KeyboardInterrupt:
        log("interrupted: stopping generators and brokers")
        return 130
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        for b in started:
            b.stop()

    print()
    print(f"medians of {args.repeat} run(s), {args.duration:g} s each, payload {args.payload} B, "
          f"MQTT {'5.0' if args.protocol == 5 else '3.1.1'}, ShardBroker workers {args.workers}, "
          f"generator processes {args.procs}")
    print_table(rows, col_a, col_b)
    if col_b:
        print("ratio = ShardBroker / Mosquitto (above 1 is better for rates, worse for ms, KB, loss)")
    troubled = [(scn, label, n + 1, m.get("_errors"))
                for (scn, label), ms in runs.items() for n, m in enumerate(ms)
                if m.get("_errors") and not m.get("_failed")]
    if troubled:
        print("runs with connection errors (their figures are suspect):")
        for scn, label, n, what in troubled:
            print(f"  {scn} / {label} run {n}: {what}")
    failed = [(scn, label, n + 1, m) for (scn, label), ms in runs.items()
              for n, m in enumerate(ms) if m.get("_verdict")]
    if failed:
        print(f"FAILED runs ({len(failed)}): a QoS 1/2 message acknowledged by the broker was "
              "not delivered, was delivered out of order or (QoS 2) twice, or the run broke:")
        for scn, label, n, m in failed:
            print(f"  {scn} / {label} run {n}: {'; '.join(m['_verdict'])}")
            for ex in m.get("_lost_examples", [])[:3]:
                print(f"      lost: {ex}")
    elif any(scn in CHECKED for scn, _ in runs):
        print("no run failed: every acknowledged QoS 1/2 message was delivered, in order"
              " (QoS 2: once)")
    if args.json:
        doc = {
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "command": " ".join([os.path.basename(sys.executable), "-m", "loadtests.bench"]
                                + (argv if argv is not None else sys.argv[1:])),
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "rows": rows,
            "runs": [{"scenario": s, "broker": b, "runs": ms} for (s, b), ms in runs.items()],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        log(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
