"""A virtual shard's persistent sessions move with it between live nodes (``core/moves.py``),
against a real etcd, two nodes on loopback (one worker each).

What is checked: a persistent 3.1.1 subscriber and a persistent 5.0 one (Session Expiry set)
on n1, with QoS 1 and QoS 2 messages queued while they were offline; n2 joins and their
virtual shards (chosen by the placement over n1 + n2) move to it; each reconnects to n2 with
session present, gets every queued message (QoS 2 exactly once, QoS 1 at least once) and a
new publish on n1 without subscribing again; then n2 is drained and the same holds back on
n1, with messages queued on n2 meanwhile. The shard counters say what moved.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import mqttbytes as mb
from cluster_fixtures import EtcdCluster
from conftest import Broker, Clients, Uniq, wait_until
from conftest import reconnect as connect_until_accepted
from test_47_cluster_bus import free_range, node_config, settled, shard_counters

from shardbroker.cluster import admin
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import Slot, place, vshard_for

BOTH = place(1024, [Slot("n1", 0), Slot("n2", 0)])
EXPIRY = mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 3600)


def moving(prefix: str) -> str:
    """A client ID whose virtual shard goes to n2 once it joins n1."""
    return next(c for c in (f"{prefix}{i}" for i in range(10_000))
                if (slot := BOTH[vshard_for(c, 1024)]) is not None and slot.node == "n2")


def staying(prefix: str) -> str:
    return next(c for c in (f"{prefix}{i}" for i in range(10_000))
                if (slot := BOTH[vshard_for(c, 1024)]) is not None and slot.node == "n1")


def reconnect(b: Broker, cid: str, version: int, timeout: float = 20.0) -> mb.RawClient:
    """Connect ``cid`` (persistent) to ``b`` until it is accepted (refused, "server
    unavailable", while its virtual shard is still moving); the client, CONNACK in ``.connack``."""
    return connect_until_accepted(b, cid, version, timeout, clean=False,
                                  props=EXPIRY if version == 5 else b"")


def check_delivered(c: mb.RawClient, sent: dict[bytes, int]) -> None:
    """Every message of ``sent`` (payload -> QoS) arrived: QoS 2 exactly once, QoS 1 at
    least once, nothing else."""
    got = Counter(m.payload for m in c.drain_publishes(quiet=1.5, first_timeout=10))
    missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
    assert not missing and not extra, (f"{len(got)} of {len(sent)} arrived; {len(missing)} missing"
                                       f" ({missing[:10]} ...), {len(extra)} extra ({extra[:10]} ...)")
    twice = [p for p, n in got.items() if sent[p] == 2 and n != 1]
    assert not twice, f"QoS 2 delivered more than once: {twice}"


def drain(etcd: EtcdCluster, node: str) -> None:
    """``shardbroker cluster drain NODE``, through the admin API."""
    client = Etcd(etcd.endpoints)
    try:
        admin.drain(client, node)
    finally:
        client.close()


def moved(b: Broker, direction: str) -> tuple[int, int]:
    counters = shard_counters(b)
    return (sum(c[f"shards_moved_{direction}"] for c in counters),
            sum(c[f"sessions_moved_{direction}"] for c in counters))


def test_persistent_sessions_follow_their_shard_to_a_joining_node_and_back_on_drain(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    n1 = make_broker(workers=1, config=node_config(etcd_single, "n1", free_range(1)), name="node1")
    settled(etcd_single, {"n1"})
    topic = uniq.topic()
    subs = {4: moving(uniq.cid("s4-")), 5: moving(uniq.cid("s5-"))}
    for version, cid in subs.items():
        wait_until(lambda cid=cid, version=version: mb.RawClient(port=n1.port, connect_timeout=2)
                   .connack_rc(cid, version=version) == 0, timeout=15, message="n1 serves")
        c = mqtt(n1, cid, version=version, clean=False, props=EXPIRY if version == 5 else b"")
        assert c.subscribe(f"{topic}/#", qos=2) == [2]
        c.disconnect()
    pub = mqtt(n1, staying(uniq.cid("pub-")), version=4)
    queued = {f"q{qos}-{i}".encode(): qos for qos in (1, 2) for i in range(5)}
    for payload, qos in queued.items():
        ack = pub.publish(f"{topic}/{qos}", payload, qos=qos)
        assert ack is not None and ack.reason == 0
    pub.disconnect()

    started = time.monotonic()
    n2 = make_broker(workers=1, config=node_config(etcd_single, "n2", free_range(1)), name="node2",
                     probe=False)
    settled(etcd_single, {"n1", "n2"})
    on_n2 = {version: reconnect(n2, cid, version) for version, cid in subs.items()}
    print(f"\nmoved to n2 and served there {time.monotonic() - started:.2f} s after n2 started")
    for version, c in on_n2.items():
        assert c.connack.session_present, f"v{version}: no session on n2"  # type: ignore[attr-defined]
        check_delivered(c, queued)
    assert moved(n1, "out")[1] >= 2 and moved(n2, "in")[1] >= 2

    pub = mqtt(n1, staying(uniq.cid("pub2-")), version=5)
    ack = pub.publish(f"{topic}/new", b"after-the-move", qos=1)
    assert ack is not None and ack.reason == 0
    for c in on_n2.values():
        assert c.recv_publish(timeout=10).payload == b"after-the-move"
        c.disconnect()
    # queued on n2 while offline, through n1's outbox toward n2
    back_queued = {f"b{qos}-{i}".encode(): qos for qos in (1, 2) for i in range(5)}
    for payload, qos in back_queued.items():
        ack = pub.publish(f"{topic}/{qos}", payload, qos=qos)
        assert ack is not None and ack.reason == 0
    wait_until(lambda: all(c["handover_remote"] == 0 for c in shard_counters(n1)), timeout=15,
               message="n1's outbox toward n2 drained")
    pub.disconnect()

    drain(etcd_single, "n2")
    settled(etcd_single, {"n1"})
    on_n1 = {version: reconnect(n1, cid, version) for version, cid in subs.items()}
    for version, c in on_n1.items():
        assert c.connack.session_present, f"v{version}: no session back on n1"  # type: ignore[attr-defined]
        check_delivered(c, back_queued)
    pub = mqtt(n1, staying(uniq.cid("pub3-")), version=4)
    pub.publish(f"{topic}/again", b"after-the-drain", qos=2)
    for c in on_n1.values():
        assert c.recv_publish(timeout=10).payload == b"after-the-drain"
    assert moved(n2, "out")[1] >= 2 and moved(n1, "in")[1] >= 2


class Publisher(threading.Thread):
    """Publishes QoS 1 and QoS 2 in turn to ``topic`` on ``b`` without a pause until
    stopped; ``acked`` holds every payload the broker acknowledged (payload -> QoS)."""

    def __init__(self, b: Broker, cid: str, topic: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = connect_until_accepted(b, cid, 4, 15)
        self.topic, self.prefix = topic, prefix
        self.acked: dict[bytes, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                qos = 1 + i % 2
                payload = f"{self.prefix}{qos}-{i}".encode()
                ack = self.client.publish(f"{self.topic}/{qos}", payload, qos=qos, timeout=10)
                if ack is not None and ack.reason == 0:
                    self.acked[payload] = qos
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self) -> dict[bytes, int]:
        self.stop.set()
        self.join(20)
        assert self.error is None, f"publisher: {self.error!r}"
        self.client.disconnect()
        return self.acked


def test_publishes_while_shards_move_reach_the_moving_sessions_once(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], uniq: Uniq) -> None:
    """A publisher on n1 publishes without a pause while n2 joins (the subscribers' shards go
    to it) and again while n2 is drained (they come back; n2 is stopped as soon as they
    have, while the stream goes on): every acknowledged message reaches
    the persistent subscribers, QoS 2 exactly once, although a shard's routes were on both
    nodes, or on neither yet, while they moved."""
    roomy = "\n[limits]\nmax_queued_messages = 100000\n"  # none of it dropped while offline
    n1 = make_broker(workers=1, config=node_config(etcd_single, "n1", free_range(1)) + roomy, name="node1")
    settled(etcd_single, {"n1"})
    topic = uniq.topic()
    subs = {4: moving(uniq.cid("w4-")), 5: moving(uniq.cid("w5-"))}
    for version, cid in subs.items():
        c = connect_until_accepted(n1, cid, version, 15, clean=False,
                                   props=EXPIRY if version == 5 else b"")
        assert c.subscribe(f"{topic}/#", qos=2) == [2]
        c.disconnect()

    pub = Publisher(n1, staying(uniq.cid("wp-")), topic, "join")
    pub.start()
    time.sleep(1.0)
    n2 = make_broker(workers=1, config=node_config(etcd_single, "n2", free_range(1)) + roomy,
                     name="node2", probe=False)
    settled(etcd_single, {"n1", "n2"})
    wait_until(lambda: moved(n2, "in")[1] >= 2, timeout=30, message="the sessions moved to n2")
    time.sleep(1.5)
    sent = pub.finish()
    assert len(sent) > 100, f"only {len(sent)} publishes acknowledged"
    on_n2 = {version: reconnect(n2, cid, version) for version, cid in subs.items()}
    for version, c in on_n2.items():
        assert c.connack.session_present, f"v{version}: no session on n2"  # type: ignore[attr-defined]
        check_delivered(c, sent)
        c.disconnect()
    relayed = sum(c["moves_relayed"] for c in shard_counters(n1))
    print(f"\njoin: {len(sent)} acknowledged, {relayed} relayed by n1")

    pub = Publisher(n1, staying(uniq.cid("wq-")), topic, "drain")
    pub.start()
    time.sleep(1.0)
    drain(etcd_single, "n2")
    settled(etcd_single, {"n1"})
    wait_until(lambda: moved(n1, "in")[1] >= 2, timeout=30, message="the sessions came back to n1")
    relayed = sum(c["moves_relayed"] for c in shard_counters(n2))
    n2.stop()  # drained: stopped at once, while the publisher goes on (what it owes goes first)
    time.sleep(1.5)
    sent = pub.finish()
    on_n1 = {version: reconnect(n1, cid, version) for version, cid in subs.items()}
    for version, c in on_n1.items():
        assert c.connack.session_present, f"v{version}: no session back on n1"  # type: ignore[attr-defined]
        check_delivered(c, sent)
    print(f"drain: {len(sent)} acknowledged, {relayed} relayed by n2 before it was stopped")
