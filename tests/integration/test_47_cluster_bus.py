"""One broker over two nodes: publishes cross nodes over the bus between them (ZeroMQ
``tcp://`` with CURVE), against a real etcd (tests/cluster_fixtures.py), two nodes on loopback
with their own data directories (n1 with two workers, n2 with one), each client connected to
the node that serves it.

What is checked: QoS 0, 1 and 2 both ways, complete and in order, 3.1.1 and 5.0; a
persistent session on the other node keeps every QoS 1 message acknowledged to the publisher
while its worker is SIGKILLed and restarted (the durable outbox toward another node); a node
restarted under a new lease is heard again; a worker of a node that is not registered under
the lease its frames carry is not heard (a stand-in node made by the test: its own etcd
registration, CURVE keys and bus), and one that is, is. Retained messages set, replaced and
deleted on either node reach the other's store (a new subscriber there sees them), and a node
started later is caught up until the three nodes' retained digests agree.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import mqttbytes as mb
import pytest
from cluster_fixtures import EtcdCluster
from conftest import Broker, Clients, Uniq, reconnect, wait_until

from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.membership import NodeInfo
from shardbroker.cluster.numbers import claim_number
from shardbroker.cluster.placement import Slot, place, vshard_for
from shardbroker.cluster.shardmap import NODES_PREFIX
from shardbroker.operations import control
from shardbroker.peer.bus import Bus, curve_keypair, endpoint, remote_endpoint, remote_peer
from shardbroker.peer.messages import Forward, PeerMessage, RouteAdd, Routes

TTL = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(n: int) -> int:
    """A port P with P .. P+n-1 free on 127.0.0.1 (now)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def node_config(etcd: EtcdCluster, node_id: str, bus_port: int) -> str:
    endpoints = ", ".join(f'"{url}"' for url in etcd.endpoints)
    return (f'[cluster]\nnode_id = "{node_id}"\netcd_endpoints = [{endpoints}]\n'
            f'advertise = "127.0.0.1:{bus_port}"\nlease_ttl = {TTL}\n')


def ctl(b: Broker, request: dict) -> dict:  # type: ignore[type-arg]
    return control.call(str(b.data_dir / "control.sock"), request)  # type: ignore[no-any-return]


def shard_counters(b: Broker) -> list[dict]:  # type: ignore[type-arg]
    return [s["counters"] for s in ctl(b, {"op": "stats"})["shards"].values()]


SLOTS = [Slot("n1", 0), Slot("n1", 1), Slot("n2", 0)]


def id_of(node: str, prefix: str, worker: int | None = None) -> str:
    """A client ID whose virtual shard the map of ``SLOTS`` gives ``node`` (and ``worker``)."""
    placed = place(1024, SLOTS)

    def fits(slot: Slot | None) -> bool:
        return slot is not None and slot.node == node and worker in (None, slot.worker)
    return next(c for c in (f"{prefix}{i}" for i in range(10_000)) if fits(placed[vshard_for(c, 1024)]))


def settled(etcd: EtcdCluster, nodes: set[str]) -> None:
    client = Etcd(etcd.endpoints)
    try:
        def done() -> bool:
            view = read_view(client)
            return (view.map is not None and set(view.map.per_node()) == nodes
                    and all(view.applied.get(n) == view.map.version for n in nodes))
        wait_until(done, timeout=20, message=f"{sorted(nodes)} serve their share")
    finally:
        client.close()


def moved_in(b: Broker) -> None:
    """No virtual shard ``b`` serves still waits for its sessions from another node (its
    clients would be refused meanwhile: core/moves.py)."""
    wait_until(lambda: all(c["vshards_moving_in"] == 0 for c in shard_counters(b)), timeout=15,
               message="the shards moving in have their sessions")


def reaches(b: Broker, remote: int) -> None:
    """Every worker of ``b`` reaches ``remote`` workers of other nodes and knows their routes."""
    def ok() -> bool:
        counters = shard_counters(b)
        return all(c["remote_peers"] == remote for c in counters)
    wait_until(ok, timeout=15, message=f"the bus reaches {remote} workers of other nodes")


def digests_agree(etcd: EtcdCluster, nodes: dict[str, Broker]) -> None:
    """Every worker's digest of every other worker's routes (of this node or another) equals
    that worker's own digest: the route tables agree everywhere."""
    client = Etcd(etcd.endpoints)
    try:
        numbers = {name: info.number for name, info in read_view(client).nodes.items()}
    finally:
        client.close()

    def agree() -> bool:
        own: dict[tuple[str, int], int] = {}
        held: list[tuple[str, str, int]] = []  # (holder node, peer as the holder names it, digest)
        for name, b in nodes.items():
            answer = ctl(b, {"op": "route_digests"})
            if answer["missing"]:
                return False
            for shard, result in answer["shards"].items():
                own[(name, int(shard))] = result["own"]
                held += [(name, peer, digest) for peer, digest in result["peers"].items()]
        by_peer_id = {(numbers[name], w): d for (name, w), d in own.items()}
        for holder, peer, digest in held:
            p = int(peer)
            want = own.get((holder, p)) if p < 256 else by_peer_id.get((p // 256, p % 256))
            if want != digest:
                return False
        return len(held) == sum(len(own) - 1 for _ in own)  # every worker holds every other
    wait_until(agree, timeout=15, message="every worker's routes agree with what its peers hold")
    repairs = sum(c["route_repairs"] for b in nodes.values() for c in shard_counters(b))
    assert repairs == 0, f"{repairs} route tables were found astray and asked for again"


@pytest.fixture
def two(etcd_single: EtcdCluster, make_broker: Callable[..., Broker]) -> tuple[Broker, Broker]:
    a = make_broker(workers=2, config=node_config(etcd_single, "n1", free_range(2)), name="node1")
    b = make_broker(workers=1, config=node_config(etcd_single, "n2", free_range(1)), name="node2",
                    probe=False)
    settled(etcd_single, {"n1", "n2"})
    reaches(a, 1)
    reaches(b, 2)
    moved_in(a)
    moved_in(b)
    for node, broker in (("n1", a), ("n2", b)):
        cid = id_of(node, "ready")
        wait_until(lambda cid=cid, broker=broker: mb.RawClient(port=broker.port, connect_timeout=2)
                   .connack_rc(cid) == 0, timeout=10, message=f"{node} serves its own")
    return a, b


@pytest.mark.parametrize("version", [4, 5])
def test_publishes_cross_nodes_both_ways_in_order(two: tuple[Broker, Broker], mqtt: Clients, uniq: Uniq,
                                                   version: int) -> None:
    a, b = two
    topic = uniq.topic()
    on_b = mqtt(b, id_of("n2", uniq.cid("sub")), version=version)
    on_a = mqtt(a, id_of("n1", uniq.cid("pub")), version=version)
    on_b.subscribe(topic + "/+", qos=2)
    on_a.subscribe(topic + "/back", qos=2)
    for qos in (0, 1, 2):
        for i in range(30):
            on_a.publish(f"{topic}/{qos}", f"{qos}-{i}".encode(), qos=qos)
        got = on_b.recv_publishes(30, timeout=10)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            (f"{topic}/{qos}", f"{qos}-{i}".encode(), qos) for i in range(30)]
    ack = on_b.publish(topic + "/back", b"from-n2", qos=2)
    assert ack is not None and ack.reason == 0
    back = on_a.recv_publish()
    assert (back.payload, back.qos) == (b"from-n2", 2)
    sent = sum(c["bus_sent"] for c in shard_counters(a))
    assert sent > 0 and all(c["bus_refused_frames"] == 0 for c in shard_counters(b))
    assert ctl(a, {"op": "route_digests"})["agree"]


def test_a_persistent_session_on_the_other_node_keeps_what_was_acknowledged_through_a_worker_kill(
        two: tuple[Broker, Broker], mqtt: Clients, uniq: Uniq) -> None:
    a, b = two
    topic = uniq.topic()
    sub_id = id_of("n2", uniq.cid("keep"))
    sub = mqtt(b, sub_id, version=4, clean=False)
    sub.subscribe(topic, qos=1)
    sub.disconnect()
    pub = mqtt(a, id_of("n1", uniq.cid("pub")), version=4)
    worker = b.worker_pids()[0]
    acked = []
    for i in range(300):
        if i == 100:
            os.kill(worker, signal.SIGKILL)  # n2's only worker: the session's store and its bus
        ack = pub.publish(topic, str(i).encode(), qos=1)
        assert ack is not None and ack.reason == 0
        acked.append(str(i).encode())
    wait_until(lambda: b.worker_pids().get(0) not in (None, worker), timeout=15,
               message="n2's worker restarted")
    wait_until(lambda: all(c["handover_remote"] == 0 for c in shard_counters(a)), timeout=20,
               message="n1's outbox toward n2 drained")
    back = reconnect(b, sub_id, 4, timeout=15, clean=False)  # "server unavailable" until served
    try:
        got = [m.payload for m in back.drain_publishes(quiet=1.0, first_timeout=10)]
    finally:
        back.close()
    assert set(got) == set(acked), f"missing: {sorted(set(acked) - set(got), key=int)[:10]}"
    assert got[0] == b"0"


def test_a_node_restarted_under_a_new_lease_is_heard_again(two: tuple[Broker, Broker], mqtt: Clients,
                                                           uniq: Uniq, etcd_single: EtcdCluster) -> None:
    a, b = two
    b.kill9()
    time.sleep(TTL + 0.5)  # its lease ends: n1 forgets its workers and their routes
    wait_until(lambda: all(c["remote_peers"] == 0 for c in shard_counters(a)), timeout=15,
               message="n1 forgot n2's workers")
    b.restart()
    settled(etcd_single, {"n1", "n2"})
    reaches(a, 1)
    reaches(b, 2)
    digests_agree(etcd_single, {"n1": a, "n2": b})
    topic = uniq.topic()
    sub_id = id_of("n2", uniq.cid("sub"))
    # its virtual shard came back from n1: refused until n1's worker has said what it holds
    wait_until(lambda: mb.RawClient(port=b.port, connect_timeout=2).connack_rc(sub_id, version=5) == 0,
               timeout=40, message="n2 serves its shards again")
    on_b = mqtt(b, sub_id, version=5)
    on_b.subscribe(topic, qos=1)
    on_a = mqtt(a, id_of("n1", uniq.cid("pub")), version=5)
    on_a.publish(topic, b"again", qos=1)
    assert on_b.recv_publish(timeout=10).payload == b"again"


def retained_digest(b: Broker) -> tuple[int, str]:
    answer = ctl(b, {"op": "retained_digest"})
    return answer["count"], answer["digest"]


def retained_on(b: Broker, topic: str) -> list[bytes]:
    """The payloads of ``topic``'s retained message in ``b``'s store (none or one)."""
    return [b"" if r["size"] == 0 else r["preview"].encode()
            for r in ctl(b, {"op": "retained", "filter": topic})["retained"]]


def test_retained_messages_reach_every_node_and_a_node_started_later(
        two: tuple[Broker, Broker], mqtt: Clients, uniq: Uniq, etcd_single: EtcdCluster,
        make_broker: Callable[..., Broker]) -> None:
    a, b = two
    topic, gone = uniq.topic("kept"), uniq.topic("gone")
    pub = mqtt(a, id_of("n1", uniq.cid("rpub")), version=5)
    pub.publish(topic, b"set-on-n1", qos=1, retain=True)
    pub.publish(gone, b"soon-gone", qos=1, retain=True)
    wait_until(lambda: retained_on(b, topic) == [b"set-on-n1"] and retained_on(b, gone) == [b"soon-gone"],
               timeout=10, message="n1's retained messages in n2's store")
    sub = mqtt(b, id_of("n2", uniq.cid("rsub")), version=5)
    sub.subscribe(topic, qos=1)
    got = sub.recv_publish(timeout=10)
    assert (got.topic, got.payload, got.retain) == (topic, b"set-on-n1", True)

    pub.publish(gone, b"", qos=1, retain=True)  # a delete on n1 ...
    wait_until(lambda: retained_on(b, gone) == [], timeout=10, message="the delete in n2's store")
    late = mqtt(b, id_of("n2", uniq.cid("late")), version=4)
    late.subscribe(gone, qos=1)
    assert late.drain_publishes(0.5, first_timeout=1.0) == []  # ... seen by a new subscriber on n2
    other = mqtt(b, id_of("n2", uniq.cid("rpub2")), version=4)
    other.publish(topic, b"set-on-n2", qos=1, retain=True)  # and n2's later write wins on n1
    wait_until(lambda: retained_on(a, topic) == [b"set-on-n2"], timeout=10, message="n2's write on n1")
    wait_until(lambda: retained_digest(a) == retained_digest(b), timeout=10, message="n1 and n2 agree")

    c = make_broker(workers=1, config=node_config(etcd_single, "n3", free_range(1)), name="node3",
                    probe=False)  # a node started after all of it: caught up by n1 and n2
    wait_until(lambda: retained_digest(c) == retained_digest(a) == retained_digest(b), timeout=30,
               message="n3 caught up: the three digests agree")
    assert retained_on(c, topic) == [b"set-on-n2"] and retained_on(c, gone) == []
    assert retained_digest(c)[0] >= 1


def test_a_worker_of_another_node_is_heard_only_under_the_lease_its_node_holds(
        two: tuple[Broker, Broker], mqtt: Clients, uniq: Uniq, etcd_single: EtcdCluster,
        tmp_path: object) -> None:
    """A stand-in node made here: its own number, CURVE keys and registration (state
    ``leaving``, so the map gives it no shard), and a bus of its own. n1 hears it under the
    lease it is registered with (its routes count: n1 forwards to it) and refuses what it
    sends under another lease."""
    a, b = two
    digests_agree(etcd_single, {"n1": a, "n2": b})
    client = Etcd(etcd_single.endpoints)
    import asyncio
    loop = asyncio.new_event_loop()
    fake: Bus | None = None
    try:
        number = claim_number(client, "stand-in")
        public, secret = curve_keypair()
        advertise = f"127.0.0.1:{free_port()}"
        got: list[tuple[int, int, int, list[PeerMessage]]] = []
        fake = Bus(0, [endpoint(str(a.data_dir.parent), 0).replace("shard-0", "stand-in-0")],
                   lambda items: None)
        fake.listen_remote(remote_endpoint(advertise, 0), public, secret,
                           lambda n, w, lease, items: got.append((n, w, lease, items)))
        view = read_view(client)
        fake.allow(frozenset(info.key for info in view.nodes.values() if info.key))
        fake.start(loop)
        lease = client.grant(30)
        client.put(NODES_PREFIX + "stand-in",
                   NodeInfo("stand-in", advertise, 1, "leaving", number=number, key=public).encode(), lease)
        reaches(a, 2)  # n2's worker and the stand-in's
        n1 = view.nodes["n1"].number
        to_n1 = remote_peer(n1, 0)
        fake.connect(to_n1, remote_endpoint(view.nodes["n1"].advertise, 0), view.nodes["n1"].key)
        topic = uniq.topic()

        def pump(seconds: float) -> None:
            loop.run_until_complete(asyncio.sleep(seconds))

        # under another lease: refused, and its route is not taken
        refused = sum(c["bus_refused_frames"] for c in shard_counters(a))
        fake.identify(number, lease + 1)
        fake.send(to_n1, RouteAdd(0, topic + "/stale", 0, False))
        fake.flush()
        wait_until(lambda: (pump(0.02), sum(c["bus_refused_frames"] for c in shard_counters(a)))[1] > refused,
                   timeout=10, message="n1 refuses the batch of a lease that is not the stand-in's")
        # under its lease: heard
        fake.identify(number, lease)
        fake.send(to_n1, Routes(0, ((topic + "/live", False),)))
        fake.flush()
        pub = mqtt(a, id_of("n1", uniq.cid("pub"), worker=0), version=5)  # the worker told

        def forwarded(suffix: str) -> bool:
            pub.publish(topic + suffix, b"x", qos=0)
            pump(0.05)
            return any(isinstance(m, Forward) and m.topic == topic + suffix
                       for *_, items in got for m in items)

        wait_until(lambda: forwarded("/live"), timeout=10, message="n1 forwards to the stand-in")
        assert {(n, w) for n, w, _, items in got
                if any(isinstance(m, Forward) for m in items)} == {(n1, 0)}  # the publisher's worker
        # every worker of n1 and n2 asks the stand-in for its routes, under its own lease (n2
        # once its own grant names the stand-in: it reads etcd on its own rounds)
        n2 = view.nodes["n2"].number
        senders = {(n1, 0, view.leases["n1"]), (n1, 1, view.leases["n1"]), (n2, 0, view.leases["n2"])}
        wait_until(lambda: (pump(0.05), {(n, w, le) for n, w, le, _ in got})[1] == senders, timeout=10,
                   message="every worker of n1 and n2 heard from under its lease")
        assert not forwarded("/stale")
        client.revoke(lease)  # its registration ends: n1 forgets it
        reaches(a, 1)
    finally:
        if fake is not None:
            fake.close()
        loop.close()
        client.close()
