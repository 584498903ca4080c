"""A virtual shard's session records are copied to its backup (``core/replicas.py``), against
a real etcd, two nodes on loopback (one worker each): when the owner's node is killed for
good, the backup serves the shard with its sessions, and when that node comes back, the
messages it held come back with it.

What is checked: a persistent subscriber whose shard n2 owns (so n1 is its backup) has one
message queued on n2; n2 is killed (SIGKILL, not started again). Once n1 serves the shard,
the subscriber reconnects there: session present, its subscription kept (it does not
subscribe again), and a message published after the failover arrives. n2 starts again on its
data directory: the shard moves back, and the subscriber, reconnected to n2, gets the message
n2 held before it was killed.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster_fixtures import EtcdCluster
from conftest import Broker, Clients, Uniq, wait_until
from test_47_cluster_bus import free_range, node_config, settled, shard_counters
from test_49_cluster_move import moving, reconnect, staying

from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.placement import vshard_for


def owner(etcd: EtcdCluster, cid: str) -> str | None:
    client = Etcd(etcd.endpoints)
    try:
        view = read_view(client)
    finally:
        client.close()
    if view.map is None:
        return None
    slot = view.map.vshards[vshard_for(cid, 1024)].slot
    return slot.node if slot is not None else None


def test_a_killed_nodes_sessions_are_served_by_the_backup_and_its_messages_come_back_with_it(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    n1 = make_broker(workers=1, config=node_config(etcd_single, "n1", free_range(1)), name="node1")
    n2 = make_broker(workers=1, config=node_config(etcd_single, "n2", free_range(1)), name="node2",
                     probe=False)
    settled(etcd_single, {"n1", "n2"})
    topic = uniq.topic()
    cid = moving(uniq.cid("sub-"))  # n2's
    sub = reconnect(n2, cid, 4)
    assert sub.subscribe(f"{topic}/#", qos=1) == [1]
    sub.disconnect()
    pub = mqtt(n1, staying(uniq.cid("pub-")), version=4)
    ack = pub.publish(f"{topic}/a", b"held-by-n2", qos=1)
    assert ack is not None and ack.reason == 0
    wait_until(lambda: sum(c["replicas_held"] for c in shard_counters(n1)) >= 1, timeout=10,
               message="n1 holds a copy of the subscriber's session")

    n2.kill9()  # for good, for now: its lease ends, and its shards go to their backup
    wait_until(lambda: owner(etcd_single, cid) == "n1", timeout=15, message="n1 owns the shard")
    back = reconnect(n1, cid, 4)
    assert back.connack.session_present  # type: ignore[attr-defined]
    assert sum(c["sessions_restored"] for c in shard_counters(n1)) >= 1
    ack = pub.publish(f"{topic}/b", b"after-failover", qos=1)
    assert ack is not None and ack.reason == 0
    assert [m.payload for m in back.recv_publishes(1)] == [b"after-failover"]
    back.disconnect()
    ack = pub.publish(f"{topic}/c", b"while-offline", qos=1)
    assert ack is not None and ack.reason == 0

    n2.start()  # the shard moves back to n2, and with it what n1 queued meanwhile
    settled(etcd_single, {"n1", "n2"})
    wait_until(lambda: owner(etcd_single, cid) == "n2", timeout=15, message="n2 owns the shard again")
    again = reconnect(n2, cid, 4)
    assert again.connack.session_present  # type: ignore[attr-defined]
    got = {m.payload for m in again.drain_publishes(quiet=1.5, first_timeout=10)}
    assert got == {b"held-by-n2", b"while-offline"}
