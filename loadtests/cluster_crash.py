"""Crash test across cluster nodes: acknowledged QoS 1/2 messages survive crashes, pauses and
joins of nodes.

    python -m loadtests.cluster_crash [--cycles 12] [--nodes 3] [--workers 1]
        [--events worker,node,pause,join,cut] [--seconds-per-cycle 1.5] [--seed N]
        [--json FILE] [--rate 100] [--keep]

The clients, the load and the checks are those of ``loadtests/crash.py`` (read its docstring:
persistent QoS 2 subscribers to ``crash/#``, QoS 1 and QoS 2 publishers with resends, the
final drain; lost, QoS 2 duplicates, out of order, sessions lost). Here the broker is a
cluster (docs/CLUSTERING.md): one etcd member and ``--nodes`` nodes ``n1``.. of ``--workers``
workers each (``lease_ttl`` 3, bus on 127.0.0.2, .3, ...), each a ``crash.CrashBroker`` on
its own data directory. Every client connects to a random running node (which relays it to
the node that serves its client ID) and, after a drop or a refusal (CONNACK "server
unavailable" while its shard moves), to a random one again.

Each cycle: wait until every running node's processes are up and every client that wants to
be online is connected, run the load for a random time, then one event (``--events``, a
comma list cycled; default random among worker, node, pause, join):

  worker  SIGKILL one worker of a random node (its supervisor restarts it);
  node    SIGKILL a random node's whole process tree, start it again at once on the same
          data directory and port (it waits for its old lease to end);
  pause   SIGSTOP a random node's process group for 1 s (below the lease TTL), then SIGCONT;
  join    start the spare node (``n<nodes+1>``, its own data directory) if it is not running
          and wait until it serves its share; else drain it (``cluster.admin.drain``), wait
          until it serves nothing and no shard waits for its sessions, and stop it (SIGTERM);
  cut     (not in the default list) SIGSTOP a random node for lease_ttl + 2 s, then SIGCONT:
          it loses its lease, its shards are served elsewhere meanwhile (its persistent
          sessions stay in its own store, as documented) and come back to it later.

The clients run during every wait. The report adds, per event kind, the violations found
near it: a lost message counts both for the first event after its acknowledgement (as in
crash.py: a crash after the ack) and for the last one before it (in a cluster an event acts
late: a killed node's shards move when its lease ends, lease_ttl after the kill); each lost
run names both events and their distance from the ack. A QoS 2 duplicate, an ordering error
or a lost session counts for the last event before it was seen. Across a shard's move the
order of one publisher's messages is not kept (docs/CLUSTERING.md): ``order`` after a join
or a lease lost is that, reported all the same.

Exit status as crash.py: 0 all good, 1 a violation, 2 the harness could not run. ``run()``
is the API used by ``tests/integration/test_50_cluster_crash.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cluster_fixtures

from loadtests import crash
from shardbroker.cluster import admin
from shardbroker.cluster.controller import ClusterView, read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import vshard_for
from shardbroker.operations import control

DEFAULT_EVENTS = ("worker", "node", "pause", "join")
EVENTS = (*DEFAULT_EVENTS, "cut")
VSHARDS = 1024
PAUSE_SECONDS = 1.0
# counters (control op stats) summed into the report: what the joins and drains moved
MOVE_COUNTERS = ("shards_moved_", "sessions_moved_", "moves_", "bus_refused_frames")
START_TIMEOUT = 60.0
# core/moves.py's lines: a virtual shard's sessions sent to the new owner, and its move done
GOES_RE = re.compile(r"virtual shard (\d+) goes to peer")
MOVED_OUT_RE = re.compile(r"virtual shard (\d+) moved out to peer")  # a restarted node waits for its old lease (lease_ttl) before it serves


@dataclass
class Options(crash.Options):
    cycles: int = 12
    workers: int = 1  # per node
    nodes: int = 3
    events: list[str] | None = None  # fixed sequence of event kinds (cycled); None: random
    lease_ttl: int = 3
    recover_timeout: float = 30.0
    settle_timeout: float = 20.0  # a join or a drain: the map applied, the outbox emptied


class NodeBroker(crash.CrashBroker):
    """A node: its MQTT listener on its own loopback address, the host of its ``advertise``,
    which is where other nodes relay its clients (the registered client address)."""

    def __init__(self, base_dir: Path, host: str, **kw: Any) -> None:
        super().__init__(base_dir, **kw)
        self.host = host

    def _command(self, port: int) -> list[str]:
        cmd = super()._command(port)
        cmd[cmd.index("--host") + 1] = self.host
        return cmd


@dataclass
class Node:
    name: str
    broker: NodeBroker
    running: bool = False
    paused: bool = False


class ClusterHarness(crash.Harness):
    """``crash.Harness`` over a cluster: etcd, ``nodes`` nodes and a spare one."""

    opts: Options
    kinds = EVENTS

    # -- the nodes --------------------------------------------------------------

    def make_brokers(self) -> None:
        o = self.opts
        self.etcd = cluster_fixtures.single_etcd(self.base_dir)
        self.etcd_client = Etcd(self.etcd.endpoints)
        self.nodes: dict[str, Node] = {}
        self.spare = f"n{o.nodes + 1}"
        endpoints = ", ".join(f'"{url}"' for url in self.etcd.endpoints)
        for i in range(o.nodes + 1):
            name = f"n{i + 1}"
            host = f"127.0.0.{i + 2}"
            advertise = cluster_fixtures.bus_address(o.workers, host=host)
            config = (crash.BROKER_CONFIG + f'\n[cluster]\nnode_id = "{name}"\n'
                      f"etcd_endpoints = [{endpoints}]\n"
                      f'advertise = "{advertise}"\nlease_ttl = {o.lease_ttl}\n')
            broker = NodeBroker(self.base_dir / name, host, workers=o.workers, config=config,
                                name=f"{name}({o.workers}w, cluster crash)")
            broker.probe = False  # serves only its share: start_nodes waits for the map
            self.nodes[name] = Node(name, broker)
        self.client_node: dict[str, str] = {}
        # the events' choices on their own generator: a seed replays them whatever the timing
        # did to the clients' draws
        self.event_rng = random.Random(self.seed)
        self.move_counters: dict[str, int] = {}  # summed over the nodes' lives that ended cleanly

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.running]

    def _set_running(self, node: Node, running: bool) -> None:
        node.running = running
        self.broker_up = bool(self.running())

    def address_for(self, client: crash.Client) -> tuple[str, int]:
        """A random running node's listener (paused ones included: a client cannot tell)."""
        nodes = self.running()
        node = self.rng.choice(nodes) if nodes else self.nodes["n1"]
        self.client_node[client.name] = node.name
        return node.broker.host, node.broker.port

    def note(self, text: str) -> None:
        for node in self.nodes.values():
            if node.broker.proc is not None:
                node.broker.note(text)

    def alive(self) -> bool:
        return any(n.broker.alive() for n in self.running())

    def tail(self, n: int) -> str:
        return "\n".join(f"--- {node.name} ---\n{node.broker.tail(n)}" for node in self.running())

    def processes_up(self) -> bool:
        for node in self.running():
            b = node.broker
            if not b.alive() or len(b.worker_pids()) != self.opts.workers or b.acceptor_pid() is None:
                return False
        return True

    def setup_client(self, c: crash.Client) -> None:
        """As crash.py, through a random node, again while refused (a shard not served yet)."""
        deadline = time.monotonic() + self.opts.settle_timeout
        while True:
            try:
                super().setup_client(c)
                return
            except (crash.HarnessError, OSError, AssertionError, crash.mb.MalformedError) as e:
                if time.monotonic() > deadline:
                    raise crash.HarnessError(f"setup of {c.name} failed: {e}") from None
            time.sleep(0.2)

    # -- waiting, with the clients running ------------------------------------

    def view(self) -> ClusterView | None:
        try:
            return read_view(self.etcd_client)
        except Exception:  # noqa: BLE001 - etcd busy or restarting: asked again
            return None

    def stats(self, node: Node) -> list[dict[str, Any]] | None:
        """Every worker's counters of ``node`` (control op ``stats``), None if it does not answer."""
        try:
            shards = control.call(str(node.broker.data_dir / "control.sock"), {"op": "stats"}, timeout=2)
        except (control.ControlError, OSError):
            return None
        return [s["counters"] for s in shards["shards"].values()]

    def settled(self, names: set[str], also: frozenset[str] = frozenset()) -> bool:
        """The map gives shards to exactly ``names`` and each of them (and ``also``) applied
        it. (Whether the sessions of a shard moved in have come is not asked: a worker asks
        the previous owner only once one of the shard's clients connects, so
        ``vshards_moving_in`` can stay up while nobody needs them; the clients' recovery
        waits for theirs.)"""
        view = self.view()
        if view is None or view.map is None or set(view.map.per_node()) != names:
            return False
        return all(view.applied.get(n) == view.map.version for n in names | also)

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float) -> bool:
        """Pump until ``pred()`` (asked every 0.2 s); an event if not within ``timeout``."""
        next_at = [0.0]

        def check() -> bool:
            now = time.monotonic()
            if now < next_at[0]:
                return False
            next_at[0] = now + 0.2
            return pred()

        if self.pump(timeout, check):
            return True
        self.event(time.monotonic(), "broker-error", f"not within {timeout}s: {what}")
        return False

    def in_background(self, what: str, fn: Callable[[], Any], timeout: float) -> None:
        """Run ``fn`` (a node's start or stop: it blocks) while the clients run."""
        failure: list[BaseException] = []

        def target() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)

        t = threading.Thread(target=target, daemon=True)
        t.start()
        self.pump(timeout, lambda: not t.is_alive())
        t.join(5)
        if t.is_alive():
            raise crash.HarnessError(f"{what}: still not done after {timeout}s")
        if failure:
            raise crash.HarnessError(f"{what}: {failure[0]}")

    def start_node(self, node: Node, port: int | None) -> None:
        self.in_background(f"start of {node.name}", lambda: node.broker.start(port=port, timeout=START_TIMEOUT),
                           START_TIMEOUT + 10)
        self._set_running(node, True)

    def start_nodes(self) -> None:
        for name in list(self.nodes)[:self.opts.nodes]:
            self.start_node(self.nodes[name], 0)
        names = {n.name for n in self.running()}
        remote = self.opts.workers * (len(names) - 1)

        def ready() -> bool:
            if not self.settled(names):
                return False
            for node in self.running():
                counters = self.stats(node)
                if counters is None or any(c["remote_peers"] != remote for c in counters):
                    return False
            return True

        if not self.wait_for("the map shared by every node, every bus link up", ready,
                             self.opts.settle_timeout):
            raise crash.HarnessError("the cluster did not settle:\n" + self.tail(30))

    def owner(self, cid: str) -> str:
        view = self.view()
        if view is None or view.map is None:
            return "?"
        slot = view.map.vshards[vshard_for(cid, VSHARDS)].slot
        return slot.node if slot is not None else "-"

    # -- the events ---------------------------------------------------------------

    def choose_event(self) -> str:
        if self.opts.events:
            return self.opts.events[(self.cycle - 1) % len(self.opts.events)]
        return self.event_rng.choice(DEFAULT_EVENTS)

    def record(self, kind: str, target: str, pid: int) -> crash.Kill:
        now = time.monotonic()
        k = crash.Kill(self.cycle, kind, target, pid, now, self.wall(now))
        self.kills.append(k)
        self.event(now, "kill", f"{kind}: {target} (pid {pid})")
        self.note(f"cycle {self.cycle}: {kind}: {target} (pid {pid})")
        return k

    def core_node(self) -> Node:
        """A random running node other than the spare."""
        return self.event_rng.choice([n for n in self.running() if n.name != self.spare])

    def do_event(self, kind: str) -> crash.Kill:
        return {"worker": self.ev_worker, "node": self.ev_node, "pause": self.ev_pause,
                "join": self.ev_join, "cut": self.ev_cut}[kind]()

    def ev_worker(self) -> crash.Kill:
        node = self.core_node()
        workers = node.broker.worker_pids()
        if not workers:
            return self.record("worker", f"{node.name}: no worker running", 0)
        w = self.event_rng.choice(sorted(workers))
        os.kill(workers[w], signal.SIGKILL)
        return self.record("worker", f"{node.name} worker {w}", workers[w])

    def ev_node(self) -> crash.Kill:
        node = self.core_node()
        b = node.broker
        run_dir = b.run_dir()
        pid = b.pid
        os.killpg(pid, signal.SIGKILL)
        k = self.record("node", f"{node.name} process tree", pid)
        self._set_running(node, False)
        b.kill9()
        if run_dir and Path(run_dir).name.startswith("shardbroker-"):
            shutil.rmtree(run_dir, ignore_errors=True)
        for c in [*self.subs, *self.pubs]:
            if c.sock is not None and self.client_node.get(c.name) == node.name:
                c.drop(time.monotonic(), f"{node.name} killed")
        self.start_node(node, b.port)
        self.event(time.monotonic(), "restart", f"{node.name} restarted on port {b.port}")
        return k

    def _stop_signal(self, seconds: float, kind: str) -> crash.Kill:
        node = self.core_node()
        pid = node.broker.pid
        os.killpg(pid, signal.SIGSTOP)
        node.paused = True
        k = self.record(kind, f"{node.name} stopped {seconds:g}s", pid)
        try:
            self.pump(seconds)
        finally:
            os.killpg(pid, signal.SIGCONT)
            node.paused = False
        self.event(time.monotonic(), "resume", f"SIGCONT {node.name}")
        return k

    def ev_pause(self) -> crash.Kill:
        return self._stop_signal(PAUSE_SECONDS, "pause")

    def ev_cut(self) -> crash.Kill:
        return self._stop_signal(self.opts.lease_ttl + 2.0, "cut")

    def ev_join(self) -> crash.Kill:
        spare = self.nodes[self.spare]
        others = {n.name for n in self.running() if n is not spare}
        if not spare.running:
            admin.undrain(self.etcd_client, spare.name)  # the mark outlives the node's stops
            k = self.record("join", f"{spare.name} joins", 0)
            self.start_node(spare, spare.broker.port)
            k.pid = spare.broker.pid
            self.wait_for(f"{spare.name} serves its share", lambda: self.settled(others | {spare.name}),
                          self.opts.settle_timeout)
            return k
        k = self.record("join", f"{spare.name} drained and stopped", spare.broker.pid)
        since = spare.broker.log_len()
        admin.drain(self.etcd_client, spare.name)
        held_since: list[float] = []

        def gone() -> bool:
            """n4 applied a map without it, every shard whose sessions it sent is acknowledged
            (its log's "moved out" line), its outbox toward other nodes is empty; for 1 s."""
            counters = self.stats(spare)
            done = (self.settled(others, also=frozenset({spare.name})) and counters is not None
                    and all(c["handover_remote"] == 0 for c in counters)
                    and self._moves_finished(spare, since))
            if not done:
                held_since.clear()
                return False
            held_since[:1] = held_since[:1] or [time.monotonic()]
            return time.monotonic() - held_since[0] >= 1.0

        if not self.wait_for(f"{spare.name} serves nothing and the other nodes acknowledged "
                             f"every durable forward it holds", gone, self.opts.settle_timeout):
            left = sum(c["handover_remote"] for c in self.stats(spare) or [])
            self.event(time.monotonic(), "broker-error",
                       f"{spare.name} stopped with {left} durable forwards to other nodes unacknowledged")
        self._set_running(spare, False)
        self.keep_counters(spare)
        self.in_background(f"stop of {spare.name}", spare.broker.stop, 40)
        return k

    @staticmethod
    def _moves_finished(node: Node, since: int) -> bool:
        """Every virtual shard whose sessions ``node``'s workers sent away since log line
        ``since`` is moved out (the new owner acknowledged, every peer answered the barrier)."""
        lines = node.broker.log_text().splitlines()[since:]
        sent = {m.group(1) for line in lines if (m := GOES_RE.search(line))}
        done = {m.group(1) for line in lines if (m := MOVED_OUT_RE.search(line))}
        return sent <= done

    # -- the cycles ---------------------------------------------------------------

    def run_cycles(self) -> None:
        o = self.opts
        for c in range(1, o.cycles + 1):
            self.cycle = c
            self.recover(self.kills[-1] if self.kills else None)
            load = self.rng.uniform(min(0.2, o.seconds_per_cycle), o.seconds_per_cycle)
            self.pump(load)
            k = self.do_event(self.choose_event())
            acked = sum(len(p.acked) for p in self.pubs)
            self.say(f"cycle {c:3d}: load {load:4.2f}s, {k.kind:6s} {k.target:28s} acked so far {acked}")
        self.cycle = o.cycles + 1
        self.recover(self.kills[-1] if self.kills else None)

    def keep_counters(self, node: Node) -> None:
        """Add ``node``'s move and bus counters to the totals (before it stops)."""
        for counters in self.stats(node) or []:
            for key, value in counters.items():
                if key.startswith(MOVE_COUNTERS) and isinstance(value, int):
                    self.move_counters[key] = self.move_counters.get(key, 0) + value

    def stop_all(self) -> None:
        for node in self.running():
            if not node.paused:
                self.keep_counters(node)
        for node in self.nodes.values():
            if node.paused and node.broker.alive():
                os.killpg(node.broker.pid, signal.SIGCONT)
        for node in self.nodes.values():
            try:
                node.broker.stop()
            finally:
                node.broker.cleanup()
        self.etcd_client.close()
        self.etcd.close()

    # -- results --------------------------------------------------------------------

    def _event_at(self, t: float, after: bool) -> crash.Kill | None:
        """The first event at or after ``t`` (``after``), or the last one before it."""
        if after:
            return next((k for k in self.kills if k.t >= t), None)
        before = [k for k in self.kills if k.t <= t]
        return before[-1] if before else None

    def _explain_loss(self, s: crash.Subscriber, p: crash.Publisher, run: tuple[int, int]) -> dict[str, Any]:
        out = super()._explain_loss(s, p, run)
        t_ack = p.acked[run[0]][0]
        for key, k in (("previous_event", self._event_at(t_ack, after=False)),
                       ("next_event", self._event_at(t_ack, after=True))):
            out[key] = None if k is None else {
                "cycle": k.cycle, "kind": k.kind, "target": k.target, "at": crash._stamp(k.wall),
                "ms_from_ack": round((k.t - t_ack) * 1000, 1)}
        return out

    def results(self, error: str | None = None) -> crash.Result:
        r = super().results(error)
        by_event: dict[str, dict[str, int]] = {
            kind: {"events": r.summary["kills"].get(kind, 0), "lost_next": 0, "lost_previous": 0,
                   "qos2_dups": 0, "out_of_order": 0, "sessions_lost": 0} for kind in (*self.kinds, "none")}

        def count(k: crash.Kill | None, what: str, n: int = 1) -> None:
            by_event["none" if k is None else k.kind][what] += n

        for item in r.violations["lost"]:
            for key in ("next", "previous"):
                k = item.get(f"{key}_event")
                by_event[k["kind"] if k else "none"][f"lost_{key}"] += item["count"]
        for s in self.subs:
            for d in s.qos2_dups:
                count(self._event_at(d["t"], after=False), "qos2_dups")
            for d in s.out_of_order:
                count(self._event_at(d["t"], after=False), "out_of_order")
        for e in self.events:
            if e["kind"] == "session-lost":
                count(self._event_at(self.t0 + e["t"], after=False), "sessions_lost")
        r.summary["by_event"] = {k: v for k, v in by_event.items() if k != "none" or any(v.values())}
        r.summary["nodes"] = self.opts.nodes
        r.summary["lease_ttl"] = self.opts.lease_ttl
        r.summary["move_counters"] = dict(sorted(self.move_counters.items()))
        r.summary["client_nodes_at_start"] = getattr(self, "owners_at_start", {})
        return r


def run(opts: Options, base_dir: Path | None = None) -> crash.Result:
    """Run the whole cluster crash test and return its result (nodes and etcd always stopped)."""
    h = ClusterHarness(opts, base_dir)
    error = None
    h.say(f"cluster crash test: seed {h.seed}, {opts.nodes} nodes of {opts.workers} worker(s) "
          f"(spare {h.spare}), {opts.cycles} cycles, data in {h.base_dir}")
    try:
        h.start_nodes()
        h.setup()
        for c in [*h.subs, *h.pubs]:
            c.shard = vshard_for(c.cid, VSHARDS)  # the report's "shard": the virtual shard
        h.owners_at_start = {c.name: h.owner(c.cid) for c in [*h.subs, *h.pubs]}
        h.say("nodes " + ", ".join(f"{n.name} port {n.broker.port}" for n in h.running())
              + "; clients served by " + ", ".join(f"{k} {v}" for k, v in h.owners_at_start.items()))
        h.publishing = True
        h.run_cycles()
        h.finish()
    except crash.HarnessError as e:
        error = str(e)
    finally:
        for c in [*h.subs, *h.pubs]:
            if c.sock is not None:
                c.drop(time.monotonic(), "end")
        try:
            h.stop_all()
        finally:
            h.sel.close()
    result = h.results(error)
    for node in h.nodes.values():
        if node.broker.starts:
            try:
                (h.base_dir / f"{node.name}.log").write_text(node.broker.log_text() + "\n")
            except OSError:
                pass
    result.log_path = str(h.base_dir / "n*.log")
    if h.own_dir and result.ok and not opts.keep:
        shutil.rmtree(h.base_dir, ignore_errors=True)
        result.log_path = None
    return result


def print_report(r: crash.Result, out: Any = sys.stdout) -> None:
    s = r.summary
    out.write(f"\nCluster: {s['nodes']} nodes (and a spare) of {s['workers']} worker(s), "
              f"lease_ttl {s['lease_ttl']}\n")
    crash.print_report(r, out)
    out.write("\nper event kind (a lost message counts for the event after its acknowledgement and "
              "for the one before it; the others for the last event before they were seen):\n")
    out.write(crash._table([{"kind": k, **v} for k, v in s["by_event"].items()],
                           [("event", "kind", 6), ("count", "events", 5), ("lost, next", "lost_next", 10),
                            ("lost, previous", "lost_previous", 14),
                            ("qos2 dup", "qos2_dups", 8), ("order", "out_of_order", 5),
                            ("sessions lost", "sessions_lost", 13)]))
    for e in r.events:
        if e["kind"] == "broker-error":
            out.write(f"  cycle {e['cycle']} at {e['at']}: {e['detail']}\n")
    if s.get("move_counters"):
        out.write("moves (nodes' counters, summed at their clean stops): "
                  + ", ".join(f"{k} {v}" for k, v in s["move_counters"].items()) + "\n")


def event_list(text: str) -> list[str]:
    events = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in events if e not in EVENTS]
    if not events or bad:
        raise argparse.ArgumentTypeError(f"unknown events {bad or text!r}; choose from {', '.join(EVENTS)}")
    return events


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.cluster_crash",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=3, help="nodes besides the spare (default 3)")
    ap.add_argument("--workers", type=int, default=1, help="workers per node (default 1)")
    ap.add_argument("--events", type=event_list, default=None,
                    help=f"comma-separated events to cycle through ({', '.join(EVENTS)}); "
                         f"default random among {', '.join(DEFAULT_EVENTS)}")
    ap.add_argument("--seconds-per-cycle", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the full result as JSON")
    ap.add_argument("--rate", type=float, default=100.0, help="messages/s per publisher (default 100)")
    ap.add_argument("--window", type=int, default=10, help="unacknowledged publishes per publisher (10)")
    ap.add_argument("--subscribers", type=int, default=4)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--drain-idle", type=float, default=12.0)
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--keep", action="store_true", help="keep the data directories and node logs")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.cycles < 0 or not 1 <= a.nodes <= 8 or a.workers < 1 or a.seconds_per_cycle <= 0:
        ap.error("--cycles >= 0, --nodes 1 to 8, --workers >= 1, --seconds-per-cycle > 0")
    if not os.access(cluster_fixtures.ETCD_BIN, os.X_OK) and shutil.which("etcd") is None:
        print(f"error: etcd not installed ({cluster_fixtures.ETCD_BIN}; apt-get install etcd-server)",
              file=sys.stderr)
        return 2
    opts = Options(cycles=a.cycles, nodes=a.nodes, workers=a.workers, events=a.events,
                   seconds_per_cycle=a.seconds_per_cycle, seed=a.seed, rate=a.rate, window=a.window,
                   subscribers=a.subscribers, publishers=a.publishers, drain_idle=a.drain_idle,
                   drain_timeout=a.drain_timeout, keep=a.keep, verbose=not a.quiet)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        r = run(opts)
    except RuntimeError as e:  # etcd would not start: no cluster to test
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return crash.report(r, a.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
