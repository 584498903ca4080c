"""How large must the QoS 1/2 in-flight window be for one subscriber to keep up?

Run from the repository root (loopback only; every run is bounded in time)::

    .venv/bin/python -m loadtests.window                          # both brokers, W = 10..500, 0 and 10 ms RTT, QoS 1 and 2
    .venv/bin/python -m loadtests.window --windows 20,100 --delays 5 --qos 1 --brokers shardbroker
    .venv/bin/python -m loadtests.window --rate 10000             # can W keep up with 10k msg/s offered?
    .venv/bin/python -m loadtests.window --rate 5000 --max-queued 1000000   # ... with no queue-overflow drops
    .venv/bin/python -m loadtests.window --json window.json

What one trial does (all on 127.0.0.1):

* A broker is started with its in-flight window set to ``W``: ShardBroker with a
  config file holding ``[limits] max_inflight = W`` (``serve --config``), or
  Mosquitto with ``max_inflight_messages W``. One broker process serves all the
  trials of one ``W``.
* One subscriber (MQTT 3.1.1, clean session, raw blocking socket) subscribes
  to one topic at QoS 1 or 2 and acknowledges every message as soon as it has
  read it (PUBACK, or PUBREC and then PUBCOMP for each PUBREL), one ``send``
  per read. It connects either directly (``--delays 0``) or through a delay
  proxy (``--delays 5``: 5 ms each way, 10 ms round trip).
* The delay proxy (its own process, two threads per direction) reads whatever
  arrives, stamps it with the time it arrived, and writes it on, in order,
  once that time plus the one-way delay has passed. It limits no bandwidth:
  everything due is written at once. Its round trip is measured before each
  trial with PINGREQ / PINGRESP through it (that figure includes the broker's
  answer time, and sleeping threads wake a little late, so it is slightly
  above 2 x delay).
* One publisher (a direct connection, on a client id that ShardBroker places
  on the other shard than the subscriber) pipelines PUBLISHes of the
  subscriber's QoS (QoS 2 to a QoS 2 subscriber, since a QoS 1 publish is
  delivered at QoS 1 whatever the subscription) with up to ``--pub-window``
  (100) unacknowledged, 64-byte payloads carrying a sequence number, as fast
  as the broker acknowledges them (or at ``--rate``), for ``--duration``
  seconds, then waits for its last acknowledgements.
* The subscriber keeps reading until nothing has arrived for ``--drain-idle``
  seconds after the publisher finished (at most ``--drain-max`` seconds).

Reported per trial:

* ``delivered/s``: messages the subscriber received per second between
  ``--warmup`` seconds after the first publish and the last publish (the
  steady state while a backlog is waiting);
* ``bound/s``: the window's limit W / RTT for QoS 1 and W / (2 RTT) for QoS 2
  (a QoS 2 message holds its slot until PUBCOMP, two round trips), with the
  RTT measured through the proxy; on loopback the bound is far above anything
  measured and is not shown;
* ``peak``: on a delayed link, the most messages received within one round trip
  (2 x delay); since every message is acknowledged on arrival, this estimates
  the most the broker had in flight at once, so it shows whether the broker
  kept to W (Mosquitto 2.0.11, as installed here, keeps to it while nothing
  is acknowledged, but once acknowledgements flow with a backlog queued it
  sends far more than W per round trip: peaks near its whole queue are seen
  even with W = 10);
* ``accepted/s``: publishes the broker acknowledged per second;
* ``lost``: acknowledged (PUBACK / PUBREC) messages never delivered after the
  drain; ``dup``: messages delivered more than once. A broker whose session
  queue overflows (``max_queued_messages``, 1000 by default in both brokers)
  drops messages, so with a publisher faster than the subscriber's window
  allows, loss is expected; ``--max-queued N`` raises the queue limit of both
  brokers for a run without overflow drops. ``cut`` marks a drain stopped by
  ``--drain-max`` while messages were still arriving (then ``lost`` counts
  undelivered, not necessarily lost, messages).

The generator processes (publisher, subscriber, proxy) share the CPUs with
the broker, so loopback figures are CPU-bound figures of this host; the
delayed ones are bounded by W / RTT until the window is large enough for the
CPU to be the limit again.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

from loadtests import mqttwire as w
from loadtests.bench import MOSQUITTO, REPO_ROOT, _child_setup, free_port, shard_for

TOPIC = "window/test"
SUB_ID = "window-sub"


def probe(port: int, client_id: str, timeout: float = 1.0) -> bool:
    """CONNECT / CONNACK 0 / DISCONNECT."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(w.connect(client_id))
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
                frames, _ = w.split_frames(data)
                if frames:
                    ok = frames[0][0] >> 4 == w.CONNACK and w.connack_result(frames[0][1], 4)[0] == 0
                    with contextlib.suppress(OSError):
                        s.sendall(w.DISCONNECT_PACKET)
                    return ok
    except (OSError, ValueError):
        return False


def one_id_per_shard(prefix: str, shards: int) -> list[str]:
    found: dict[int, str] = {}
    k = 0
    while len(found) < shards:
        cid = f"{prefix}{k}"
        found.setdefault(shard_for(cid, shards), cid)
        k += 1
    return [found[s] for s in sorted(found)]


class Broker:
    def __init__(self, kind: str, window: int, workers: int, max_queued: int | None,
                 python: str) -> None:
        self.kind = kind
        self.window = window
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix=f"window-{kind}-")
        self.errlog = Path(self.tmp) / "stderr.log"
        self.shards = workers if kind == "shardbroker" else 1
        if kind == "shardbroker":
            cfg = Path(self.tmp) / "broker.toml"
            lines = ["[limits]", f"max_inflight = {window}"]
            if max_queued is not None:
                lines.append(f"max_queued_messages = {max_queued}")
            cfg.write_text("\n".join(lines) + "\n")
            argv = [python, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", str(workers),
                    "--data-dir", str(Path(self.tmp) / "data"), "--log-level", "warning",
                    "--config", str(cfg)]
        else:
            os.chmod(self.tmp, 0o777)  # mosquitto drops root privileges to its own user
            lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                     f"max_inflight_messages {window}", "persistence false",
                     "log_dest stderr", "log_type error", "log_type warning",
                     "connection_messages false"]
            if max_queued is not None:
                lines.append(f"max_queued_messages {max_queued}")
            cfg = Path(self.tmp) / "mosquitto.conf"
            cfg.write_text("\n".join(lines) + "\n")
            os.chmod(cfg, 0o644)
            argv = [MOSQUITTO, "-c", str(cfg)]
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=REPO_ROOT, preexec_fn=_child_setup,  # noqa: PLW1509
                                         close_fds=True)
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = one_id_per_shard("window-probe-", self.shards)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({self.proc.returncode}): "
                                   f"{self.errlog.read_text(errors='replace')[-1500:]}")
            pending = [cid for cid in pending if not probe(self.port, cid)]
            if not pending:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # anything left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ===================================================================================== delay proxy


class _Direction:
    """src -> dst: a reader stamps each chunk, a writer sends it once ``delay`` has passed."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data: bytes | None = self.src.recv(1 << 18)
            except OSError:
                data = b""
            due = time.monotonic() + self.delay
            with self.cond:
                self.queue.append((due, data or None))
                self.cond.notify()
            if not data:
                return

    def _write(self) -> None:
        queue, cond = self.queue, self.cond
        while True:
            with cond:
                while not queue:
                    cond.wait()
                due = queue[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            chunks: list[bytes] = []
            eof = False
            with cond:
                now = time.monotonic()
                while queue and queue[0][0] <= now:
                    data = queue.popleft()[1]
                    if data is None:
                        eof = True
                        break
                    chunks.append(data)
            try:
                if chunks:
                    self.dst.sendall(b"".join(chunks))
                if eof:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
            except OSError:
                with contextlib.suppress(OSError):
                    self.src.shutdown(socket.SHUT_RDWR)
                return


def proxy_main(listener: socket.socket, upstream_port: int, one_way: float) -> None:
    """Accept connections forever; each one gets its own upstream connection and two directions."""
    sys.setswitchinterval(0.0002)  # a writer that wakes up must not wait 5 ms for the GIL
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Direction(client, upstream, one_way)
        _Direction(upstream, client, one_way)


# ===================================================================================== MQTT clients


def _recv_packets(s: socket.socket, buf: bytearray, want: int, timeout: float) -> bytes:
    """The body of the next packet of type ``want`` (others before it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frames, used = w.split_frames(buf)
        for first, body in frames:
            if first >> 4 == want:
                del buf[:used]  # frames after it, if any, are dropped: only used during setup
                return body
        del buf[:used]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no packet of type {want}")
        s.settimeout(left)
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk


def _connect(port: int, client_id: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(w.connect(client_id, keepalive=600))
    body = _recv_packets(s, bytearray(), w.CONNACK, 10)
    if body[1] != 0:
        raise ConnectionError(f"{client_id}: CONNACK {body[1]}")
    return s


def subscriber_main(port: int, qos: int, ready: Any, pub_done: Any, drain_idle: float,
                    drain_max: float, out: Any) -> None:
    try:
        s = _connect(port, SUB_ID)
        buf = bytearray()
        rtts = []
        for _ in range(10):
            t = time.monotonic()
            s.sendall(w.PINGREQ_PACKET)
            _recv_packets(s, buf, w.PINGRESP, 10)
            rtts.append(time.monotonic() - t)
        s.sendall(w.subscribe(1, [(TOPIC, qos)]))
        granted = _recv_packets(s, buf, w.SUBACK, 10)[2]
        if granted != qos:
            raise RuntimeError(f"SUBACK granted {granted}, asked {qos}")
        ready.set()
        seqs = array("Q")
        times = array("d")
        data = bytes(buf)
        last = time.monotonic()
        done_at: float | None = None
        cut = False
        s.settimeout(0.05)
        recv = s.recv
        send = s.sendall
        while True:
            try:
                chunk = recv(1 << 18)
                if not chunk:
                    raise ConnectionError("broker closed the subscriber")
            except TimeoutError:
                chunk = b""
            now = time.monotonic()
            if chunk:
                data = data + chunk if data else chunk
                n = len(data)
                i = 0
                acks = []
                got = 0
                while i + 2 <= n:
                    first = data[i]
                    rl = data[i + 1]
                    j = i + 2
                    if rl & 0x80:  # a longer remaining length
                        rl, shift, j, complete = 0, 0, i + 1, False
                        while j < n:
                            b = data[j]
                            j += 1
                            rl |= (b & 0x7F) << shift
                            if not b & 0x80:
                                complete = True
                                break
                            shift += 7
                        if not complete:
                            break
                    end = j + rl
                    if end > n:
                        break
                    t = first >> 4
                    if t == 3:  # PUBLISH: topic, packet id, payload (8-byte sequence number first)
                        p = j + 2 + ((data[j] << 8) | data[j + 1])
                        q = (first >> 1) & 3
                        if q:
                            acks.append((b"\x40\x02" if q == 1 else b"\x50\x02") + data[p:p + 2])
                            p += 2
                        seqs.append(int.from_bytes(data[p:p + 8], "big"))
                        got += 1
                    elif t == 6:  # PUBREL
                        acks.append(b"\x70\x02" + data[j:j + 2])
                    i = end
                data = data[i:]
                if acks:
                    send(b"".join(acks))
                if got:
                    times.extend([now] * got)
                    last = now
            if done_at is None:
                if pub_done.is_set():
                    done_at = now
            elif now - last >= drain_idle:
                break
            elif now - done_at >= drain_max:
                cut = True
                break
        with contextlib.suppress(OSError):
            s.sendall(w.DISCONNECT_PACKET)
        s.close()
        out.send({"rtts": rtts, "seqs": seqs.tobytes(), "times": times.tobytes(), "cut": cut})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        ready.set()
        out.send({"error": f"subscriber: {exc!r}"})


def publisher_main(port: int, client_id: str, qos: int, window: int, payload_size: int,
                   rate: float, duration: float, go: Any, pub_done: Any, out: Any) -> None:
    try:
        s = _connect(port, client_id)
        prefix, mid = w.publish_parts(TOPIC, payload_size, qos=qos)
        pad = b"\x00" * (payload_size - 8)
        pids = w.PID_BYTES
        inflight: dict[int, int] = {}  # packet id -> sequence number, until PUBACK / PUBCOMP
        acked = array("Q")
        ack_times = array("d")
        seq = 0
        go.wait()
        s.setblocking(False)
        t0 = time.monotonic()
        stop_at = t0 + duration
        t_last = t0
        data = b""
        sending = True
        deadline = stop_at + 15.0  # for the last acknowledgements
        while True:
            now = time.monotonic()
            if sending and now >= stop_at:
                sending = False
                t_last = now
            if not sending and (not inflight or now >= deadline):
                break
            room = window - len(inflight) if sending else 0
            if room > 0 and rate:
                room = min(room, int(rate * (now - t0)) + 1 - seq)
            if room > 0:
                batch = []
                for _ in range(room):
                    pid = seq % 65535 + 1
                    inflight[pid] = seq
                    batch.append(prefix + pids[pid] + mid + seq.to_bytes(8, "big") + pad)
                    seq += 1
                s.setblocking(True)
                s.sendall(b"".join(batch))
                s.setblocking(False)
            timeout = 0.01 if (rate and sending and len(inflight) < window) else 0.1
            if not select.select([s], [], [], timeout)[0]:
                continue
            chunk = s.recv(1 << 18)
            if not chunk:
                raise ConnectionError("broker closed the publisher")
            now = time.monotonic()
            data = data + chunk if data else chunk
            frames, used = w.split_frames(data)
            data = data[used:]
            rels = []
            for first, body in frames:
                t = first >> 4
                pid = (body[0] << 8) | body[1] if len(body) >= 2 else 0
                if t == 4:  # PUBACK
                    sq = inflight.pop(pid, None)
                    if sq is not None:
                        acked.append(sq)
                        ack_times.append(now)
                elif t == 5:  # PUBREC: the broker has the message; PUBREL, then wait for PUBCOMP
                    if pid in inflight:
                        acked.append(inflight[pid])
                        ack_times.append(now)
                        rels.append(b"\x62\x02" + pids[pid])
                elif t == 7:  # PUBCOMP
                    inflight.pop(pid, None)
            if rels:
                s.setblocking(True)
                s.sendall(b"".join(rels))
                s.setblocking(False)
        pub_done.set()
        with contextlib.suppress(OSError):
            s.setblocking(True)
            s.sendall(w.DISCONNECT_PACKET)
        s.close()
        out.send({"t0": t0, "t_last": t_last, "sent": seq, "acked": acked.tobytes(),
                  "ack_times": ack_times.tobytes(), "unfinished": len(inflight)})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        pub_done.set()
        out.send({"error": f"publisher: {exc!r}"})


# ===================================================================================== one trial


def run_trial(broker: Broker, qos: int, one_way_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    load = os.getloadavg()[0]
    procs = []
    sub_port = broker.port
    if one_way_ms > 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sub_port = listener.getsockname()[1]
        proxy = ctx.Process(target=proxy_main, args=(listener, broker.port, one_way_ms / 1000), daemon=True)
        proxy.start()
        listener.close()
        procs.append(proxy)
    sub_shard = shard_for(SUB_ID, broker.shards)
    pub_id = next(c for c in one_id_per_shard("window-pub-", max(broker.shards, 2))
                  if broker.shards < 2 or shard_for(c, broker.shards) != sub_shard)
    ready, go, pub_done = ctx.Event(), ctx.Event(), ctx.Event()
    sub_r, sub_w = ctx.Pipe(duplex=False)
    pub_r, pub_w = ctx.Pipe(duplex=False)
    sub = ctx.Process(target=subscriber_main, daemon=True,
                      args=(sub_port, qos, ready, pub_done, args.drain_idle, args.drain_max, sub_w))
    pub = ctx.Process(target=publisher_main, daemon=True,
                      args=(broker.port, pub_id, qos, args.pub_window, args.payload, args.rate,
                            args.duration, go, pub_done, pub_w))
    procs += [sub, pub]
    try:
        sub.start()
        pub.start()
        limit = args.duration + args.drain_max + 60
        if not ready.wait(30):
            raise RuntimeError("subscriber not ready")
        go.set()
        if not pub_r.poll(limit):
            raise RuntimeError("publisher did not finish")
        pres = pub_r.recv()
        if not sub_r.poll(limit):
            raise RuntimeError("subscriber did not finish")
        sres = sub_r.recv()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    for res in (pres, sres):
        if "error" in res:
            raise RuntimeError(res["error"])
    seqs = array("Q")
    seqs.frombytes(sres["seqs"])
    times = array("d")
    times.frombytes(sres["times"])
    acked = array("Q")
    acked.frombytes(pres["acked"])
    t_from, t_to = pres["t0"] + args.warmup, pres["t_last"]
    in_window = sum(1 for t in times if t_from <= t <= t_to)
    delivered_rate = in_window / (t_to - t_from)
    unique = set(seqs)
    rtt = statistics.median(sres["rtts"])
    # With the subscriber acknowledging on receipt, what the broker has in flight at one moment
    # is about what the subscriber receives within one round trip (messages sent before it and
    # not yet acknowledged), so the most received within 2 x delay estimates the broker's peak.
    peak = None
    if one_way_ms > 0 and times:
        span = 2 * one_way_ms / 1000 - 0.0001
        peak = max(bisect.bisect_right(times, t + span) - i for i, t in enumerate(times))
    bound = broker.window / (rtt * qos) if one_way_ms > 0 else None
    return {
        "broker": broker.kind, "qos": qos, "one_way_ms": one_way_ms, "window": broker.window,
        "rtt_ms": rtt * 1000, "delivered_per_s": delivered_rate, "bound_per_s": bound,
        "peak_inflight": peak,
        "accepted_per_s": len(acked) / (pres["t_last"] - pres["t0"]),
        "published": pres["sent"], "acked": len(acked), "delivered": len(seqs),
        "lost": len(set(acked) - unique), "dup": len(seqs) - len(unique),
        "drain_s": (times[-1] - pres["t_last"]) if times else 0.0, "cut": sres["cut"],
        "pub_unfinished": pres["unfinished"], "load_1min_before": load,
    }


# ===================================================================================== main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.window",
                                 description="Subscriber throughput against the QoS 1/2 in-flight window.")
    ap.add_argument("--windows", type=_ints, default=[10, 20, 50, 100, 200, 500],
                    help="in-flight windows W to try (default 10,20,50,100,200,500)")
    ap.add_argument("--delays", type=_floats, default=[0.0, 5.0],
                    help="one-way delays in ms for the subscriber's link; 0 = direct (default 0,5)")
    ap.add_argument("--qos", type=_ints, default=[1, 2], help="subscriber QoS levels (default 1,2)")
    ap.add_argument("--brokers", default=None,
                    help="shardbroker,mosquitto (default: both, mosquitto if installed)")
    ap.add_argument("--duration", type=float, default=3.0, help="publishing seconds per trial (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds not counted at the start (default 0.5)")
    ap.add_argument("--workers", type=int, default=2, help="ShardBroker worker processes (default 2)")
    ap.add_argument("--pub-window", type=int, default=100, help="publisher's unacknowledged limit (default 100)")
    ap.add_argument("--payload", type=int, default=64, help="payload bytes, at least 8 (default 64)")
    ap.add_argument("--rate", type=float, default=0.0, help="publish rate, msg/s; 0 = as fast as acknowledged")
    ap.add_argument("--max-queued", type=int, default=None,
                    help="both brokers' per-session queue limit (default: theirs, 1000)")
    ap.add_argument("--drain-idle", type=float, default=1.0, help="drain ends after this many idle seconds")
    ap.add_argument("--drain-max", type=float, default=20.0, help="longest drain, seconds (default 20)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole matrix this many times; the summary shows medians (default 1)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ShardBroker")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.payload < 8:
        ap.error("--payload must be at least 8")
    if args.duration <= args.warmup:
        ap.error("--duration must be longer than --warmup")
    kinds = args.brokers.split(",") if args.brokers else (
        ["shardbroker", "mosquitto"] if os.path.exists(MOSQUITTO) else ["shardbroker"])
    for k in kinds:
        if k not in ("shardbroker", "mosquitto"):
            ap.error(f"unknown broker {k!r}")
    results: list[dict[str, Any]] = []
    header = (f"{'broker':<12}{'qos':>4}{'rtt ms':>8}{'W':>6}{'delivered/s':>13}{'bound/s':>10}"
              f"{'peak':>6}{'accepted/s':>12}{'acked':>8}{'lost':>7}{'dup':>5}{'drain s':>9}")
    print(header, flush=True)
    # Repeats of the whole matrix, and brokers interleaved per window, so that drifting host
    # load hits every cell alike.
    matrix = [(window, kind) for _ in range(args.repeat) for window in args.windows for kind in kinds]
    for window, kind in matrix:
        broker = Broker(kind, window, args.workers, args.max_queued, args.python)
        try:
            for qos in args.qos:
                for one_way in args.delays:
                    r = run_trial(broker, qos, one_way, args)
                    results.append(r)
                    bound = f"{r['bound_per_s']:.0f}" if r["bound_per_s"] else "-"
                    peak = "-" if r["peak_inflight"] is None else str(r["peak_inflight"])
                    print(f"{kind:<12}{qos:>4}{r['rtt_ms']:>8.2f}{window:>6}{r['delivered_per_s']:>13.0f}"
                          f"{bound:>10}{peak:>6}{r['accepted_per_s']:>12.0f}{r['acked']:>8}{r['lost']:>7}"
                          f"{r['dup']:>5}{r['drain_s']:>9.2f}{' cut' if r['cut'] else ''}", flush=True)
        finally:
            broker.stop()
    print()
    print("delivered msg/s by window W (bound W/RTT, W/2RTT for QoS 2, in parentheses where delayed)"
          + (f"; medians of {args.repeat} runs" if args.repeat > 1 else ""))
    print(f"{'broker':<12}{'qos':>4}{'link':>10}" + "".join(f"{w_:>14}" for w_ in args.windows))
    for kind in kinds:
        for qos in args.qos:
            for one_way in args.delays:
                row: dict[int, dict[str, Any]] = {}
                for w_ in args.windows:
                    runs = [r for r in results if r["broker"] == kind and r["qos"] == qos
                            and r["one_way_ms"] == one_way and r["window"] == w_]
                    if runs:
                        row[w_] = {"delivered_per_s": statistics.median(r["delivered_per_s"] for r in runs),
                                   "bound_per_s": runs[0]["bound_per_s"] and statistics.median(
                                       r["bound_per_s"] for r in runs)}
                link = "loopback" if one_way == 0 else f"{2 * one_way:g}ms RTT"
                cells = []
                for w_ in args.windows:
                    cell = row.get(w_)
                    if cell is None:
                        cells.append(f"{'':>14}")
                    elif cell["bound_per_s"]:
                        cells.append(f"{cell['delivered_per_s']:>6.0f} ({cell['bound_per_s']:>5.0f})")
                    else:
                        cells.append(f"{cell['delivered_per_s']:>14.0f}")
                print(f"{kind:<12}{qos:>4}{link:>10}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "load_at_end": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
