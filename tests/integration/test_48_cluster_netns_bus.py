"""Messages crossing nodes through failures: the three namespace nodes of test_45
(tests/netns_fixtures.py, one cluster for the module), a publisher on one node, persistent
subscribers on the two others, each client connected to the node that serves its client ID.

* a node killed mid-stream: the surviving subscriber gets every message acknowledged to the
  publisher, the publisher's PUBACKs do not stop for longer than the lease TTL + 2 s, and the
  killed node's subscriber, back on it after its restart, gets every message acknowledged
  while its node was registered;
* a node cut off, then healed: QoS 1 and QoS 2 published meanwhile reach the other
  subscriber; after the heal the cut-off node's subscriber gets every QoS 1 message
  acknowledged while its node was registered, and QoS 2 exactly once (as a receiver that
  keeps packet ids counts), and the publisher's node's outboxes drain; the other way, what
  the cut-off node acknowledged right after the cut reaches the publisher's node after the
  heal, the frames it sent under its old lease refused there (``bus_refused_frames``);
* a node drained, then undrained, while a publisher streams to persistent subscribers of its
  shards: every acknowledged message reaches them, QoS 2 exactly once;
* after each, every worker reaches exactly the workers of the other live nodes, and no node
  logged an exception.

``pytest -s`` prints the figures measured (``[figure]`` lines)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import mqttbytes as mb
import pytest
from netns_fixtures import (
    NODES,
    NetnsCluster,
    bounded,
    inside,
    netns_cluster_module,  # noqa: F401  (the fixture)
)
from test_45_cluster_netns import COUNT, TTL, WORKERS, Net, cid_of, figure, non_controller

from shardbroker.cluster.etcd import EtcdError
from shardbroker.cluster.placement import vshard_for

PACE = 0.01  # seconds between two publishes of a stream (about 60 a second with the round trip)


@pytest.fixture(scope="module")
def net(netns_cluster_module: NetnsCluster) -> Iterator[Net]:  # noqa: F811
    """The three nodes, started once for the module, serving."""
    n = Net(netns_cluster_module, None)  # type: ignore[arg-type]  # no status(): no capsys
    try:
        netns_cluster_module.start_nodes(workers=WORKERS, ttl=TTL)
        n.wait_all_serving()
        yield n
    finally:
        n.close()


# -- helpers -------------------------------------------------------------------------------


def counters(net: Net, role: str) -> list[dict[str, Any]]:
    """Each worker's counters on node ``role`` (control op ``stats``)."""
    return [s["counters"] for s in net.ctl(role, {"op": "stats"})["shards"].values()]


def total(net: Net, role: str, name: str) -> int:
    return sum(c[name] for c in counters(net, role))


def peers_settle(net: Net, live: list[str], timeout: float = 15.0) -> float:
    """Wait until every worker of each live node reaches exactly the workers of the other
    live nodes (``remote_peers``); the seconds it took."""
    want = {n: sum(WORKERS[m] for m in live if m != n) for n in live}

    def ok() -> bool:
        return all(c["remote_peers"] == want[n] for n in live for c in counters(net, n))

    return bounded(ok, timeout, f"remote_peers of {live} == {want}")


def settle(net: Net) -> None:
    net.wait_all_serving()
    peers_settle(net, list(NODES))


class Reader:
    """A subscriber read (and acknowledged) by a thread of its own until it is stopped or its
    connection closes: the messages in the order they came."""

    def __init__(self, client: mb.RawClient) -> None:
        self.client = client
        self.got: list[mb.Publish] = []
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c = self.client
        while not self._stop.is_set():
            try:
                pkt = c.recv_packet(0.2)
                if pkt is None:
                    continue
                assert pkt[0] == mb.PUBLISH, mb.describe(pkt)
                c._pending.appendleft(pkt)
                self.got.append(c.recv_publish(timeout=5))
            except (mb.ConnectionClosed, OSError):
                self.closed = True
                return

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.got]

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the reader did not stop"
        self.client.close()
        return self.payloads()


class LeaseWatch:
    """When etcd was last seen holding ``node``'s current registration (the time the read
    that saw it was sent) and first seen without it: read from the clients' namespace by a
    thread, from now on."""

    def __init__(self, net: Net, node: str) -> None:
        self.net, self.node = net, node
        self.lease = net.view().leases[node]
        self.last_seen = time.monotonic()
        self.gone: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 6 * TTL + 10
        while self.gone is None and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                view = self.net._view()
            except (EtcdError, OSError):
                time.sleep(0.02)
                continue
            if view.leases.get(self.node) != self.lease:
                self.gone = time.monotonic()
                return
            self.last_seen = sent
            time.sleep(0.02)


def subscribe(net: Net, role: str, cid: str, topic: str, qos: int) -> Reader:
    c = net.client(role, cid, version=4, clean=False)
    assert c.subscribe(topic, qos=qos) == [qos]
    return Reader(c)


def routes_reach(pub: mb.RawClient, topic: str, readers: list[Reader]) -> None:
    """Publish probes until each reader got one (routes between nodes are announced
    asynchronously), then wait until the last probe reached every reader."""
    def probe() -> bool:
        payload = f"probe-{time.monotonic_ns()}".encode()
        pub.publish(topic, payload, qos=1)
        time.sleep(0.2)
        return all(any(p.startswith(b"probe-") for p in r.payloads()) for r in readers)

    bounded(probe, 15, "the subscribers on the other nodes are reached", interval=0.1)
    payload = b"probe-last"
    pub.publish(topic, payload, qos=1)
    bounded(lambda: all(payload in r.payloads() for r in readers), 10, "the last probe arrives")


def stream_until_lease_gone(pub: mb.RawClient, topics: dict[int, str], watch: LeaseWatch,
                            started: float, then: float = 2.0,
                            before: float = 0.0, at_start: Any = None
                            ) -> list[tuple[int, int, float]]:
    """Publish ``i`` (payload ``"qos-i"``) alternately at each QoS of ``topics``, each waited
    for (PUBACK / PUBCOMP), every ``PACE`` s: for ``before`` seconds, then ``at_start()``,
    then until ``then`` seconds after the watched lease ended. (i, qos, acknowledged at)."""
    acked: list[tuple[int, int, float]] = []
    qoses = sorted(topics)
    begun = time.monotonic()
    called = at_start is None
    i = 0
    while True:
        now = time.monotonic()
        if not called and now - begun >= before:
            at_start()
            called = True
        if called and watch.gone is not None and now - watch.gone >= then:
            return acked
        assert now - started < 6 * TTL + 10, "the node's lease did not end"
        qos = qoses[i % len(qoses)]
        ack = pub.publish(topics[qos], f"{qos}-{i}".encode(), qos=qos, timeout=TTL + 3)
        assert ack is not None and ack.reason == 0, (i, ack)
        acked.append((i, qos, time.monotonic()))
        i += 1
        time.sleep(PACE)


def numbers(payloads: list[bytes]) -> Counter[int]:
    """How many times each stream message (``qos-i``) was received; probes left out."""
    return Counter(int(p.split(b"-")[1]) for p in payloads if not p.startswith(b"probe-"))


def reconnected(net: Net, role: str, cid: str, count: int = COUNT) -> mb.RawClient:
    """``cid`` connected again to ``role`` once ``role`` serves its virtual shard itself."""
    v = vshard_for(cid, count)
    twin = next(f"{cid}-twin{i}" for i in range(100000)
                if vshard_for(f"{cid}-twin{i}", count) == v)
    bounded(lambda: net.served_here(role, twin), 20, f"{role} serves {cid}'s virtual shard again")
    c = net.client(role, cid, version=4, clean=False)
    assert c.connack.session_present  # type: ignore[attr-defined]
    return c


class Receiver:
    """A persistent subscriber's client side across connections, as MQTT 4.3.3 has a QoS 2
    receiver do it: a QoS 2 message is taken when its PUBLISH first comes, and its packet id
    kept until its PUBREL, so that a PUBLISH sent again meanwhile (a connection lost before
    the PUBREC arrived) is not taken twice. ``got``: the payloads taken, in order."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.awaiting_rel: set[int] = set()
        self.connections = 0

    def collect(self, net: Net, role: str, cid: str, quiet: float = 2.0,
                timeout: float = 60.0) -> list[bytes]:
        """Connect ``cid`` to ``role`` (again, as often as its node closes it: a node can
        lose its lease again while etcd elects a leader after a heal) and take what comes
        until nothing does for ``quiet`` seconds (10 on the first connection)."""
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"{cid} not drained within {timeout}s"
            try:
                c = reconnected(net, role, cid)
            except (AssertionError, OSError):
                continue  # refused or closed at once: the node lost its lease again
            self.connections += 1
            try:
                self._take(c, first=10.0 if self.connections == 1 else quiet, quiet=quiet)
                c.disconnect()
                return self.got
            except (mb.ConnectionClosed, OSError):
                c.close()

    def _take(self, c: mb.RawClient, first: float, quiet: float) -> None:
        wait = first
        while True:
            pkt = c.recv_packet(wait)
            if pkt is None:
                return
            wait = quiet
            kind, flags, body = pkt
            if kind == mb.PUBREL:
                pid = mb.parse_ack(body, 4).pid
                self.awaiting_rel.discard(pid)
                c.send(mb.pubcomp(pid, 4))
                continue
            assert kind == mb.PUBLISH, mb.describe(pkt)
            msg = mb.parse_publish(flags, body, 4)
            assert msg.pid is not None
            if msg.qos == 1:
                self.got.append(msg.payload)
                c.send(mb.puback(msg.pid, 4))
            else:
                assert msg.qos == 2, msg
                if msg.pid not in self.awaiting_rel:
                    self.got.append(msg.payload)
                    self.awaiting_rel.add(msg.pid)
                c.send(mb.pubrec(msg.pid, 4))


def no_tracebacks(net: Net) -> None:
    """No process of any node logged an exception (a failed callback loses what it was doing)."""
    for role, b in net.c.nodes.items():
        bad = [line for line in b.lines if "Traceback" in line or " ERROR " in line]
        assert not bad, f"{role}: {bad[:3]}"


def outboxes_drain(net: Net, role: str, timeout: float) -> float:
    return bounded(lambda: all(c["handover_remote"] == 0 for c in counters(net, role)), timeout,
                   f"{role}'s outboxes toward other nodes drained")


# -- a node killed --------------------------------------------------------------------------


def test_a_node_killed_mid_stream_gets_what_was_acknowledged_while_it_was_registered(
        net: Net) -> None:
    """What is guaranteed to the killed node's persistent subscriber: a message acknowledged
    to the publisher while the killed node was still registered was committed to the
    publisher's worker's outbox (durable forward) before its PUBACK, stays there, and is
    delivered once the node is back (QoS 1: duplicates allowed, none missing). A message
    published after its lease ended is not forwarded to it: its routes were dropped with its
    registration, and nothing else kept them. The first part is asserted; the second is
    measured (printed)."""
    settle(net)
    victim = non_controller(net)
    pub_node, keep = (n for n in NODES if n != victim)
    owners = net.owners()
    shares = {n: owners.count(n) for n in NODES}
    topic = "k48/stream"
    keep_sub = subscribe(net, keep, cid_of(owners, keep, "k48-keep-"), topic, 1)
    gone_id = cid_of(owners, victim, "k48-gone-")
    gone_sub = subscribe(net, victim, gone_id, topic, 1)
    pub = net.client(pub_node, cid_of(owners, pub_node, "k48-pub-"), version=4)
    routes_reach(pub, topic, [keep_sub, gone_sub])

    watch = LeaseWatch(net, victim)
    killed = 0.0

    def kill() -> None:
        nonlocal killed
        net.c.nodes[victim].kill9()
        killed = time.monotonic()

    started = time.monotonic()
    # on until the outbox has resent to the forgotten workers (every 5 s) at least once
    acked = stream_until_lease_gone(pub, {1: topic}, watch, started, then=8.0, before=2.0,
                                    at_start=kill)
    assert watch.gone is not None
    times = [started] + [t for *_, t in acked]
    gap = max(b - a for a, b in itertools.pairwise(times))
    before_kill = [i for i, _, t in acked if t < killed]
    registered = [i for i, _, t in acked if killed <= t < watch.last_seen]
    after_lease = [i for i, _, t in acked if t >= watch.gone]
    figure(f"kill: {len(acked)} QoS 1 acknowledged ({len(before_kill)} before the kill,"
           f" {len(registered)} after it while the node was registered, {len(after_lease)}"
           f" after its lease ended {watch.gone - killed:.2f} s after the kill); longest wait"
           f" for a PUBACK {gap:.2f} s")
    assert gap <= TTL + 2, f"the publisher waited {gap:.2f} s for a PUBACK"
    assert before_kill and after_lease

    # the surviving subscriber: everything acknowledged
    want = {i for i, *_ in acked}
    bounded(lambda: want <= set(numbers(keep_sub.payloads())), 20,
            "the surviving subscriber got every acknowledged message")
    keep_got = numbers(keep_sub.stop())
    figure(f"kill: the surviving subscriber got {len(want)} of {len(want)} acknowledged,"
           f" {sum(keep_got.values()) - len(keep_got)} duplicates")

    # the survivors forgot the killed node's workers; its forwards wait in the outbox
    took = peers_settle(net, [pub_node, keep])
    pending = total(net, pub_node, "handover_remote")
    # the outbox does not resend them while the node is gone (the sweep skips peers the bus
    # does not reach); what was on its way when the node was forgotten the bus dropped
    unreached = total(net, pub_node, "bus_unreached")
    figure(f"kill: survivors' remote_peers settled {took:.2f} s after the check began;"
           f" {pending} durable forwards wait in {pub_node}'s outbox for the killed node,"
           f" {unreached} messages for its forgotten workers dropped by the bus")
    assert pending > 0

    first = numbers(gone_sub.stop())  # closed by the kill
    net.c.nodes[victim].start(port=1883)
    restarted = time.monotonic()
    bounded(lambda: net.view().map.per_node() == shares,  # type: ignore[union-attr]
            30, "the restarted node has its shares again")
    receiver = Receiver()
    later = numbers(receiver.collect(net, victim, gone_id))
    drained = outboxes_drain(net, pub_node, 30)
    figure(f"kill: subscriber drained {time.monotonic() - restarted:.2f} s after the restart"
           f" ({receiver.connections} connections), {pub_node}'s outbox empty"
           f" {drained:.2f} s later")
    got = first + later
    kept = set(before_kill) | set(registered)
    missing = sorted(kept - set(got))
    assert not missing, f"{len(missing)} acknowledged while registered, lost: {missing[:10]}"
    late = [i for i in after_lease if i in got]
    figure(f"kill: the restarted node's subscriber got all {len(kept)} acknowledged while its"
           f" node was registered ({len(first)} before the kill, {len(later)} after the restart,"
           f" {sum(got.values()) - len(got)} duplicates) and {len(late)} of the"
           f" {len(after_lease)} published after its lease ended")
    peers_settle(net, list(NODES), timeout=20)
    no_tracebacks(net)


# -- a partition and the heal ------------------------------------------------------------


def test_a_partition_and_the_heal_keep_qos1_and_deliver_qos2_exactly_once(net: Net) -> None:
    """The node cut off is neither the controller nor the one whose etcd member leads (so
    that the others keep their leases). While it is cut, the publisher's QoS 1 and QoS 2 to
    its persistent subscriber wait in the publisher's worker's outbox; after the heal it
    registers under a new lease, is a new peer, and gets them: QoS 1 at least once, QoS 2
    exactly once (the receiving worker drops a forward whose sequence number it has taken)."""
    settle(net)
    leader, controller = net.c.leader(), net.view().controller
    victim = next(n for n in reversed(NODES) if n not in (leader, controller))
    pub_node, keep = (n for n in NODES if n != victim)
    owners = net.owners()
    shares = {n: owners.count(n) for n in NODES}
    topics = {1: "c48/q1", 2: "c48/q2"}
    keep_sub = subscribe(net, keep, cid_of(owners, keep, "c48-keep-"), "c48/#", 2)
    cut_id = cid_of(owners, victim, "c48-cut-")
    cut_sub = subscribe(net, victim, cut_id, "c48/#", 2)
    pub = net.client(pub_node, cid_of(owners, pub_node, "c48-pub-"), version=4)
    routes_reach(pub, topics[1], [keep_sub, cut_sub])
    # the other way: a publisher inside the node to be cut off (its own namespace still
    # reaches it), a persistent subscriber on the publishing node
    back_id = cid_of(owners, pub_node, "c48-back-")
    back_sub = subscribe(net, pub_node, back_id, "b48/back", 1)
    with inside(net.c.ns(victim)):
        inner = mb.RawClient(host=net.c.address(victim), port=1883, connect_timeout=2)
    assert inner.connect_mqtt(cid_of(owners, victim, "c48-inner-"), version=4).rc == 0
    routes_reach(inner, "b48/back", [back_sub])
    refused_before = {n: total(net, n, "bus_refused_frames") for n in NODES}

    watch = LeaseWatch(net, victim)
    net.c.partition(victim)
    cut = time.monotonic()
    # acknowledged by the cut-off node while it still serves (it stops 1 to 2 s after the
    # cut): committed to its outbox toward the publishing node, sent under its old lease
    back = [f"back-{i}".encode() for i in range(5)]
    for payload in back:
        ack = inner.publish("b48/back", payload, qos=1, timeout=1)
        assert ack is not None and ack.reason == 0
    inner_acked = time.monotonic() - cut
    inner.close()
    acked = stream_until_lease_gone(pub, topics, watch, cut)
    assert watch.gone is not None
    registered = [(i, q) for i, q, t in acked if t < watch.last_seen]
    after_lease = [(i, q) for i, q, t in acked if t >= watch.gone]
    figure(f"cut: {len(acked)} acknowledged during the cut (QoS 1 and 2 alternately),"
           f" {len(registered)} while the node was registered, {len(after_lease)} after its"
           f" lease ended ({watch.gone - cut:.2f} s after the cut)")
    assert registered and after_lease

    qos_of = {i: q for i, q, _ in acked}
    want = set(qos_of)
    bounded(lambda: want <= set(numbers(keep_sub.payloads())), 20,
            "the other subscriber got every acknowledged message")
    keep_got = numbers(keep_sub.stop())
    twice = [i for i, n in keep_got.items() if n > 1 and qos_of.get(i) == 2]
    assert not twice, f"QoS 2 received more than once by the other subscriber: {twice[:10]}"
    pending = total(net, pub_node, "handover_remote")
    figure(f"cut: the other subscriber got all {len(want)}; {pending} durable forwards wait in"
           f" {pub_node}'s outbox for the cut-off node")
    assert pending > 0

    assert not set(back) & set(back_sub.stop()), "the cut-off node reached the others"
    net.c.heal(victim)
    healed = time.monotonic()
    # its old connection was closed by its node during the cut; nothing more comes on it
    first = numbers(cut_sub.stop())
    assert not first, f"the cut-off subscriber got {len(first)} messages through the cut"
    bounded(lambda: net.view().map.per_node() == shares,  # type: ignore[union-attr]
            30, "the healed node has its shares again")
    receiver = Receiver()
    got = numbers(receiver.collect(net, victim, cut_id))
    drained = outboxes_drain(net, pub_node, 30)
    figure(f"heal: the subscriber drained {time.monotonic() - healed:.2f} s after the heal"
           f" ({receiver.connections} connections), {pub_node}'s outbox empty"
           f" {drained:.2f} s later")

    missing = [(i, q) for i, q in registered if got[i] == 0]
    assert not missing, f"{len(missing)} acknowledged while registered, lost: {missing[:10]}"
    twice = [i for i, n in got.items() if n > 1 and qos_of[i] == 2]
    assert not twice, f"QoS 2 delivered more than once after the heal: {twice[:10]}"
    dup1 = sum(n - 1 for i, n in got.items() if qos_of[i] == 1)
    late = [i for i, _ in after_lease if got[i]]
    refused = {n: total(net, n, "bus_refused_frames") - refused_before[n] for n in NODES}
    figure(f"heal: the cut-off subscriber got all {len(registered)} acknowledged while its node"
           f" was registered (QoS 2 exactly once, {dup1} QoS 1 duplicates) and {len(late)} of"
           f" the {len(after_lease)} published after its lease ended")

    # the other way: what the cut-off node acknowledged during the cut reaches the publishing
    # node's subscriber, once the cut-off node's outbox is resent under its new lease; what it
    # sent under its old lease arrives after the heal and is refused
    back_got = Receiver()
    bounded(lambda: set(back) <= set(back_got.collect(net, pub_node, back_id, quiet=0.5)), 30,
            "what the cut-off node acknowledged during the cut arrives", interval=0.5)
    arrived = time.monotonic() - healed
    outboxes_drain(net, victim, 10)
    refused = {n: total(net, n, "bus_refused_frames") - refused_before[n] for n in NODES}
    new_lease = net.view().leases[victim]
    figure(f"heal: the {len(back)} QoS 1 the cut-off node acknowledged {inner_acked:.2f} s into"
           f" the cut arrived {arrived:.2f} s after the heal; bus_refused_frames during the cut"
           f" and heal: {refused} (its lease {watch.lease:x} then {new_lease:x})")
    for n in NODES:
        for line in net.c.nodes[n].lines:
            if "batches refused so far" in line or "lost its lease" in line:
                figure(f"heal: {n}: {line.strip()}")
    assert refused[pub_node] > 0
    for n in NODES:
        outboxes_drain(net, n, 10)
    peers_settle(net, list(NODES), timeout=20)
    no_tracebacks(net)


# -- a node drained and undrained under a stream -------------------------------------------


def stream_while(pub: mb.RawClient, topics: dict[int, str], start: int, until: Any,
                 timeout: float = 40.0) -> list[tuple[int, int]]:
    """Publish ``i`` (payload ``"qos-i"``, from ``start``) alternately at each QoS of
    ``topics``, each waited for, every ``PACE`` s, until ``until()`` (asked every 0.2 s).
    The (i, qos) acknowledged."""
    acked: list[tuple[int, int]] = []
    qoses = sorted(topics)
    deadline = time.monotonic() + timeout
    check_at = 0.0
    i = start
    while True:
        now = time.monotonic()
        if now >= check_at:
            if until():
                return acked
            check_at = now + 0.2
        assert now < deadline, "the condition did not come true while streaming"
        qos = qoses[i % len(qoses)]
        ack = pub.publish(topics[qos], f"{qos}-{i}".encode(), qos=qos, timeout=TTL + 3)
        assert ack is not None and ack.reason == 0, (i, ack)
        acked.append((i, qos))
        i += 1
        time.sleep(PACE)


def test_a_drain_and_an_undrain_under_a_stream_lose_nothing(net: Net) -> None:
    """A node is drained while a publisher on another node streams QoS 1 and QoS 2 to
    persistent subscribers of the drained node's shards (offline meanwhile), then undrained:
    their sessions move out and back with their shards, what was published in between is
    relayed while they move, and each subscriber gets every acknowledged message, QoS 2
    exactly once."""
    from shardbroker.cluster import admin
    from shardbroker.cluster.etcd import Etcd

    settle(net)
    controller = net.view().controller
    victim = next(n for n in reversed(NODES) if n != controller)
    pub_node = next(n for n in NODES if n != victim)
    owners = net.owners()
    shares = {n: owners.count(n) for n in NODES}
    topics = {1: "d48/q1", 2: "d48/q2"}
    ids = [cid_of(owners, victim, f"d48-sub{k}-") for k in range(2)]
    for cid in ids:
        c = net.client(victim, cid, version=4, clean=False)
        assert c.subscribe("d48/#", qos=2) == [2]
        c.disconnect()
    pub = net.client(pub_node, cid_of(owners, pub_node, "d48-pub-"), version=4)

    def etcd_call(fn: Any) -> None:
        with inside(net.c.clients_ns):
            etcd = Etcd(net.c.endpoints, timeout=2)
            try:
                fn(etcd)
            finally:
                etcd.close()

    def moved(out: bool) -> Any:
        def check() -> bool:
            per_node = net.view().map.per_node()  # type: ignore[union-attr]
            return victim not in per_node if out else per_node == shares
        return check

    started = time.monotonic()
    settle_at: list[float] = []

    def after(cond: Any, extra: float) -> Any:
        """``cond``, then ``extra`` seconds more of streaming."""
        def check() -> bool:
            if not settle_at and cond():
                settle_at.append(time.monotonic())
            return bool(settle_at) and time.monotonic() - settle_at[0] >= extra
        return check

    acked = stream_while(pub, topics, 0, lambda: time.monotonic() - started >= 1.0)
    etcd_call(lambda etcd: admin.drain(etcd, victim))
    drained_at = time.monotonic()
    acked += stream_while(pub, topics, len(acked), after(moved(True), 1.5))
    figure(f"drain: {victim}'s shards gone {settle_at[0] - drained_at:.2f} s after the drain")
    settle_at.clear()
    etcd_call(lambda etcd: admin.undrain(etcd, victim))
    undrained_at = time.monotonic()
    acked += stream_while(pub, topics, len(acked), after(moved(False), 1.5))
    figure(f"undrain: {victim}'s shares back {settle_at[0] - undrained_at:.2f} s after the undrain")
    pub.disconnect()

    qos_of = dict(acked)
    relayed = {n: total(net, n, "moves_relayed") for n in NODES}
    for cid in ids:
        got = numbers(Receiver().collect(net, victim, cid))
        missing = [i for i in qos_of if got[i] == 0]
        assert not missing, f"{cid}: {len(missing)} of {len(qos_of)} lost: {missing[:10]}"
        twice = [i for i, n in got.items() if n > 1 and qos_of.get(i) == 2]
        assert not twice, f"{cid}: QoS 2 delivered more than once: {twice[:10]}"
    figure(f"drain and undrain: {len(qos_of)} acknowledged, every one delivered to both"
           f" subscribers; copies relayed while sessions moved: {relayed}")
    settle(net)
    no_tracebacks(net)
