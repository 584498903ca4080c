"""A broker node serving under etcd (``[cluster] node_id``), against a real etcd
(tests/cluster_fixtures.py): it registers and serves the virtual shards the map gives it;
clients go to the worker the map names (and ``ctl`` finds them there); losing etcd closes its
clients before the lease can end and refuses new ones until etcd is back; a persistent
session stored before is found after the stores follow the map; a second node takes its
share, and the first closes the clients of the shards it lost and relays them to the second
when they come back. Messages between nodes are test_47_cluster_bus.py's."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import mqttbytes as mb
import pytest
from cluster_fixtures import EtcdCluster, bus_address
from conftest import Broker, Clients, Uniq, assert_disconnected, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shardbroker.cli.main import main
from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.grant import local_owners
from shardbroker.cluster.placement import Slot, place, vshard_for
from shardbroker.operations import control
from shardbroker.sharding import shard_for

TTL = 2
SERVER_UNAVAILABLE_V3 = 3
SERVER_UNAVAILABLE = 0x88
USE_ANOTHER_SERVER = 0x9C


def node_config(etcd: EtcdCluster, node_id: str, ttl: int = TTL, advertise: str = "") -> str:
    """``advertise``: the node's bus address (free ports of this host unless given)."""
    endpoints = ", ".join(f'"{url}"' for url in etcd.endpoints)
    return (f'[cluster]\nnode_id = "{node_id}"\netcd_endpoints = [{endpoints}]\n'
            f'advertise = "{advertise or bus_address()}"\nlease_ttl = {ttl}\n')


def connack(port: int, client_id: str, version: int = 4) -> int:
    return mb.RawClient(port=port, connect_timeout=2).connack_rc(client_id, version)


def ids_where(pred: Callable[[str], bool], prefix: str, n: int = 1) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        cid = f"{prefix}{i}"
        if pred(cid):
            out.append(cid)
        i += 1
    return out


def wait_serving(b: Broker, node_id: str, workers: int) -> None:
    """Every worker of the node accepts a client of its own (start() probes by shard_for)."""
    table = local_owners(node_id, workers, 1024)
    for w in range(workers):
        cid = ids_where(lambda c, w=w: table[vshard_for(c, 1024)] == w, f"ready{w}x")[0]
        wait_until(lambda cid=cid: connack(b.port, cid) == 0, timeout=10, interval=0.1,
                   message=f"worker {w} serves")


def status(capsys: pytest.CaptureFixture[str], etcd: EtcdCluster) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["cluster", "--etcd", ",".join(etcd.endpoints), "status", "--json"])
    out, _ = capsys.readouterr()
    assert exit_.value.code in (0, None)
    return json.loads(out)  # type: ignore[no-any-return]


def ctl(b: Broker, request: dict) -> dict:  # type: ignore[type-arg]
    return control.call(str(b.data_dir / "control.sock"), request)  # type: ignore[no-any-return]


def test_a_node_serves_by_the_map_and_is_up_in_status(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients, uniq: Uniq,
        capsys: pytest.CaptureFixture[str]) -> None:
    b = make_broker(workers=2, config=node_config(etcd_single, "n1"))
    wait_serving(b, "n1", 2)
    # QoS 0, 1, 2 between clients of both workers, and a retained message
    topic = uniq.topic()
    sub = mqtt(b, uniq.cid("s"), version=5)
    sub.subscribe(topic, qos=2)
    pub = mqtt(b, uniq.cid("p"), version=4)
    for qos in (0, 1, 2):
        pub.publish(topic, f"m{qos}".encode(), qos=qos)
    got = sub.recv_publishes(3)
    assert [(m.payload, m.qos) for m in got] == [(b"m0", 0), (b"m1", 1), (b"m2", 2)]
    pub.publish(topic + "/r", b"kept", qos=1, retain=True)
    late = mqtt(b, uniq.cid("l"), version=4)
    late.subscribe(topic + "/r", qos=1)
    msg = late.recv_publish()
    assert (msg.payload, msg.retain) == (b"kept", True)

    doc = status(capsys, etcd_single)
    assert doc["controller"] == "n1" and doc["virtual_shards"] == 1024
    assert doc["unassigned_vshards"] == 0 and doc["map_version"] >= 1
    assert [(n["node_id"], n["state"], n["workers"], n["vshards"]) for n in doc["nodes"]] == [
        ("n1", "up", 2, 1024)]

    # the acceptor sends a client to the map's worker, not to shard_for(id, workers), and
    # ctl finds it there
    table = local_owners("n1", 2, 1024)
    cid = ids_where(lambda c: table[vshard_for(c, 1024)] != shard_for(c, 2), "odd")[0]
    c = mqtt(b, cid, version=5)
    found = ctl(b, {"op": "client", "client_id": cid})
    assert found["shard"] == table[vshard_for(cid, 1024)] and found["client"] is not None
    kicked = ctl(b, {"op": "kick", "client_id": cid})
    assert kicked["kicked"] is True and kicked["shard"] == found["shard"]
    assert_disconnected(c, 5, {0x98})


METRICS_RE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def cluster_metrics(port: int) -> dict[str, float]:
    """The node's ``shardbroker_cluster_*`` samples (the state label's value appended)."""
    code, text = http_get(port, "/metrics")
    assert code == 200, text
    return {s.name + "".join(f":{v}" for v in s.labels.values()): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("shardbroker_cluster_")}


@pytest.mark.parametrize("how", ["sigstop", "kill"])
def test_losing_etcd_closes_clients_before_the_lease_ends_and_serving_resumes(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq, how: str) -> None:
    b = make_broker(workers=1, config=node_config(etcd_single, "n1")
                    + "[metrics]\nenabled = true\nport = 0\n")
    port = int(METRICS_RE.search(b.wait_for_log(METRICS_RE.pattern)).group(1))  # type: ignore[union-attr]
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10, interval=0.1,
               message="ready under the cluster")
    m = cluster_metrics(port)
    assert (m["shardbroker_cluster_member"], m["shardbroker_cluster_controller"]) == (1, 1), m
    assert m["shardbroker_cluster_map_version"] >= 1, m
    assert m["shardbroker_cluster_virtual_shards:served"] == 1024, m
    assert 0 < m["shardbroker_cluster_lease_remaining_seconds"] <= TTL, m
    v5 = mqtt(b, uniq.cid("a"), version=5)
    v4 = mqtt(b, uniq.cid("b"), version=4)
    time.sleep(0.8)  # a renewal or two
    member = etcd_single.members[0]
    assert member.proc is not None
    pid = member.proc.pid
    if how == "sigstop":
        os.kill(pid, signal.SIGSTOP)  # etcd answers nothing, as behind a cut link
    else:
        etcd_single.stop(member, signal.SIGKILL)  # connections refused
    stopped = time.monotonic()
    try:
        assert_disconnected(v5, 5, {USE_ANOTHER_SERVER}, timeout=TTL + 1)
        assert_disconnected(v4, 4, timeout=1)
        closed = time.monotonic() - stopped
        assert closed < TTL, f"clients closed {closed:.2f} s after etcd stopped (lease {TTL} s)"
        assert connack(b.port, uniq.cid("n"), 4) == SERVER_UNAVAILABLE_V3
        assert connack(b.port, uniq.cid("n"), 5) == SERVER_UNAVAILABLE
        code, why = http_get(port, "/readyz")
        assert code == 503 and "cluster: node n1 " in why, why
        time.sleep(TTL)  # still refused after the lease would have ended
        assert connack(b.port, uniq.cid("n"), 4) == SERVER_UNAVAILABLE_V3
        m = cluster_metrics(port)
        assert (m["shardbroker_cluster_member"], m["shardbroker_cluster_controller"]) == (0, 0), m
        assert m["shardbroker_cluster_virtual_shards:served"] == 0, m
    finally:
        if how == "sigstop":
            os.kill(pid, signal.SIGCONT)
        else:
            etcd_single.start(member)
            etcd_single.wait_healthy()
    wait_until(lambda: connack(b.port, uniq.cid("r"), 4) == 0, timeout=15, interval=0.2,
               message="serving again after etcd came back")
    back = mqtt(b, uniq.cid("r"), version=5)
    back.ping()
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10, interval=0.1,
               message="ready again")
    assert cluster_metrics(port)["shardbroker_cluster_member"] == 1
    assert ctl(b, {"op": "stats"})["acceptor"]["refused_unserved"] >= 3
    log = b.log_text()
    assert log.count("lost its lease") == 1, log[-3000:]
    assert "refused (server unavailable): this node serves no virtual shard now" in log


def test_a_persistent_session_survives_moving_into_and_out_of_the_cluster_layout(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    b = make_broker(workers=2)
    table = local_owners("n1", 2, 1024)
    cid = ids_where(lambda c: table[vshard_for(c, 1024)] != shard_for(c, 2), "keep")[0]
    topic = uniq.topic()
    c = mqtt(b, cid, version=4, clean=False)
    c.subscribe(topic, qos=1)
    c.disconnect()
    pub = mqtt(b, uniq.cid("p"), version=4)
    for i in range(3):
        pub.publish(topic, f"q{i}".encode(), qos=1)
    pub.disconnect()
    b.stop()

    config = Path(b.base_dir / "broker.toml")
    config.write_text(node_config(etcd_single, "n1"))
    b.config_path = config
    b.start()
    assert "stores arranged for the rendezvous:n1 layout: 1 sessions moved" in b.log_text()
    wait_serving(b, "n1", 2)
    c = mqtt(b, cid, version=4, clean=False)
    assert c.connack.session_present  # type: ignore[attr-defined]
    assert [m.payload for m in c.recv_publishes(3)] == [b"q0", b"q1", b"q2"]
    assert ctl(b, {"op": "client", "client_id": cid})["shard"] == table[vshard_for(cid, 1024)]
    c.disconnect()
    pub = mqtt(b, uniq.cid("p"), version=4)
    pub.publish(topic, b"q3", qos=1)
    pub.disconnect()
    b.stop()

    config.write_text("")  # back to one host: the stores follow shard_for again
    b.start()
    assert "stores arranged for the hash layout: 1 sessions moved" in b.log_text()
    c = mqtt(b, cid, version=4, clean=False)
    assert c.connack.session_present  # type: ignore[attr-defined]
    assert [m.payload for m in c.recv_publishes(1)] == [b"q3"]


def test_a_second_node_takes_its_share_and_the_first_relays_it(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_broker(workers=1, config=node_config(etcd_single, "n1"), name="node1")
    both = place(1024, [Slot("n1", 0), Slot("n2", 0)])
    moving, = ids_where(lambda c: both[vshard_for(c, 1024)] == Slot("n2", 0), "mv")
    staying, = ids_where(lambda c: both[vshard_for(c, 1024)] == Slot("n1", 0), "st")
    gone = mqtt(a, moving, version=5)
    kept = mqtt(a, staying, version=4)

    b = make_broker(workers=1, config=node_config(etcd_single, "n2"), name="node2",
                    probe=False)
    etcd = Etcd(etcd_single.endpoints)
    try:
        def shares() -> dict[str, int]:
            view = read_view(etcd)
            return dict(view.map.per_node()) if view.map is not None else {}

        wait_until(lambda: shares().get("n2", 0) > 0, timeout=10, message="n2 in the map")
        assert shares() == {"n1": both.count(Slot("n1", 0)), "n2": both.count(Slot("n2", 0))}
        # each node says it applied the map (n2 serves the shards it took only after n1 has)
        version = read_view(etcd).map.version  # type: ignore[union-attr]
        wait_until(lambda: read_view(etcd).applied == {"n1": version, "n2": version}, timeout=10,
                   message="both nodes applied the map")
    finally:
        etcd.close()
    # the first node closes the client whose shard moved, keeps the other
    assert_disconnected(gone, 5, {USE_ANOTHER_SERVER}, timeout=5)
    kept.ping()
    wait_until(lambda: connack(b.port, moving, 5) == 0, timeout=10, message="n2 serves it")
    # each node relays the other's clients there (tests/integration/test_43_cluster_relay.py)
    relayed = ctl(a, {"op": "stats"})["acceptor"]["relayed"]
    assert connack(a.port, moving, 5) == 0
    assert connack(a.port, moving, 4) == 0
    assert ctl(a, {"op": "stats"})["acceptor"]["relayed"] == relayed + 2
    assert connack(b.port, staying, 4) == 0
    assert connack(a.port, staying, 4) == 0

    doc = status(capsys, etcd_single)
    assert doc["controller"] == "n1"  # one controller: the node that was there first
    assert {n["node_id"]: (n["state"], n["vshards"]) for n in doc["nodes"]} == {
        "n1": ("up", both.count(Slot("n1", 0))), "n2": ("up", both.count(Slot("n2", 0)))}

    # n2 leaves (SIGTERM revokes its lease): its shards come back to n1 at once
    b.stop()
    wait_until(lambda: connack(a.port, moving, 5) == 0, timeout=10, message="n1 serves it again")


def test_a_node_killed_and_started_again_takes_over_its_registration_with_its_sessions(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    b = make_broker(workers=2, config=node_config(etcd_single, "n1"))
    wait_serving(b, "n1", 2)
    cid, topic = uniq.cid("k"), uniq.topic()
    c = mqtt(b, cid, version=4, clean=False)
    c.subscribe(topic, qos=1)
    c.disconnect()
    pub = mqtt(b, uniq.cid("p"), version=4)
    for i in range(2):
        pub.publish(topic, f"k{i}".encode(), qos=1)
    b.kill9()  # its lease lives on in etcd for up to lease_ttl
    killed = time.monotonic()
    b.start()
    wait_serving(b, "n1", 2)
    assert time.monotonic() - killed < TTL + 10
    # the same data directory (its bus key): the registration is taken over, not waited for
    assert "took over the registration its previous run left" in b.log_text()
    assert "is registered already" not in b.log_text()
    c = mqtt(b, cid, version=4, clean=False)
    assert c.connack.session_present  # type: ignore[attr-defined]
    assert [m.payload for m in c.recv_publishes(2)] == [b"k0", b"k1"]


def test_one_etcd_member_lost_of_three_goes_unnoticed_by_clients(
        etcd_three: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    b = make_broker(workers=1, config=node_config(etcd_three, "n1", ttl=3))
    c = mqtt(b, uniq.cid("c"), version=5)
    first = etcd_three.members[0]  # the member the node asks first
    etcd_three.stop(first, signal.SIGKILL)
    deadline = time.monotonic() + 2 * 3
    while time.monotonic() < deadline:
        c.ping()
        time.sleep(0.3)
    assert connack(b.port, uniq.cid("n"), 4) == 0
    assert "lost its lease" not in b.log_text()


def test_workers_stop_serving_at_the_deadline_when_the_supervisor_stops(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    """The grant's deadline holds without the supervisor: stopped (SIGSTOP), it renews nothing
    and tells nobody; the worker closes its clients and the acceptor refuses new ones by
    themselves, before the lease can end."""
    b = make_broker(workers=1, config=node_config(etcd_single, "n1"))
    c = mqtt(b, uniq.cid("c"), version=5)
    os.kill(b.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert_disconnected(c, 5, {USE_ANOTHER_SERVER}, timeout=TTL + 1)
        assert time.monotonic() - stopped < TTL
        assert connack(b.port, uniq.cid("n"), 4) == SERVER_UNAVAILABLE_V3
    finally:
        os.kill(b.pid, signal.SIGCONT)
    wait_until(lambda: connack(b.port, uniq.cid("r"), 4) == 0, timeout=15, interval=0.2,
               message="serving again once the supervisor runs")
    assert "no renewed grant from the supervisor before the lease deadline" in b.log_text()
