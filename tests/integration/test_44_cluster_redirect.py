"""Two nodes on a real etcd (the helpers of test_43): with ``[cluster] redirect`` an MQTT 5.0
client that reaches the node which does not serve its virtual shard gets CONNACK 0x9C with the
owner's address as Server Reference, and connecting there works; a 3.1.1 client is still
relayed, and so is a 5.0 client of a node without the setting. Then the same client ID
connecting to both nodes at once, several times: both connections reach the owner (one
through the relay), so exactly one stays up, the other is taken over (5.0: DISCONNECT 0x8E),
and the owner alone has the session."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import mqttbytes as mb
from cluster_fixtures import EtcdCluster
from conftest import Broker, Clients
from test_43_cluster_relay import acceptor, ctl, id_of, two_nodes

from shardbroker.transport import proxy

USE_ANOTHER_SERVER = 0x9C
SESSION_TAKEN_OVER = 0x8E
METRICS = re.compile(r"metrics on http://[^\s:]+:(\d+)")
REPO = Path(__file__).resolve().parents[2]


def _redirected_metric(b: Broker) -> float:
    found = METRICS.search(b.wait_for_log(METRICS.pattern))
    assert found
    with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    value = re.search(r"^shardbroker_acceptor_redirected_connections_total (\S+)$", text, re.MULTILINE)
    assert value, "the redirect counter is exported"
    return float(value.group(1))


def test_a_5_0_client_is_redirected_to_the_owner_and_older_ones_relayed(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients) -> None:
    a, b = two_nodes(etcd_single, make_broker,
                     extra="redirect = true\n\n[metrics]\nenabled = true\nport = 0\n")
    cid = id_of("n2", "moved")
    raw = mb.RawClient(port=a.port, connect_timeout=2)
    ack = raw.connect_mqtt(cid, version=5, clean=True)
    assert ack.rc == USE_ANOTHER_SERVER and not ack.session_present
    reference = ack.props[mb.SERVER_REFERENCE]
    assert reference == f"127.0.0.1:{b.port}"  # n2's registered client address
    assert raw.expect_closed(3)  # [MQTT-3.2.2-7]
    raw.close()
    assert ctl(b, {"op": "client", "client_id": cid})["client"] is None  # it never reached n2
    host, port = proxy.split_address(reference)
    there = mb.RawClient(host=host, port=port, connect_timeout=2)  # the client follows it
    assert there.connect_mqtt(cid, version=5, clean=True).rc == 0
    there.ping()
    assert ctl(b, {"op": "client", "client_id": cid})["client"]["version"] == 5
    there.disconnect()
    stats = acceptor(a)
    assert (stats["redirected"], stats["relayed"]) == (1, 0)
    assert _redirected_metric(a) == 1.0

    # 3.1.1 has no redirect: relayed, the session on n2
    old = mqtt(a, id_of("n2", "old"), version=4)
    old.ping()
    assert ctl(b, {"op": "client", "client_id": id_of("n2", "old")})["client"]["version"] == 4
    assert (acceptor(a)["redirected"], acceptor(a)["relayed"]) == (1, 1)

    # n2 has no redirect: its 5.0 client of n1's shard is relayed to n1
    mine = mqtt(b, id_of("n1", "plain"), version=5)
    mine.ping()
    assert ctl(a, {"op": "client", "client_id": id_of("n1", "plain")})["client"] is not None
    assert (acceptor(b)["redirected"], acceptor(b)["relayed"]) == (0, 1)
    assert "redirected to the node at 127.0.0.1:" in a.log_text()

    # the setting is live: a reload turns it on at n2 for the CONNECTs that follow
    assert b.config_path is not None
    b.config_path.write_text(b.config_path.read_text().replace("[cluster]\n", "[cluster]\nredirect = true\n"))
    result = ctl(b, {"op": "reload"})
    assert "cluster.redirect" in json.dumps(result), result
    ack = mqtt(b, id_of("n1", "later"), version=5, expect_rc=USE_ANOTHER_SERVER).connack
    assert ack.props[mb.SERVER_REFERENCE] == f"127.0.0.1:{a.port}"  # type: ignore[attr-defined]
    assert acceptor(b)["redirected"] == 1


def _connect_both(ports: tuple[int, int], cid: str) -> list[tuple[mb.RawClient, mb.ConnAck]]:
    """Connect ``cid`` to both ports at the same moment (TCP first, then both CONNECTs
    released together), as a persistent 5.0 session."""
    clients = [mb.RawClient(port=port, connect_timeout=2) for port in ports]
    acks: list[mb.ConnAck | None] = [None, None]
    start = threading.Barrier(2)

    def go(i: int) -> None:
        start.wait()
        acks[i] = clients[i].connect_mqtt(cid, version=5, clean=False, timeout=10,
                                          props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 300))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert all(ack is not None for ack in acks), acks
    return [(c, ack) for c, ack in zip(clients, acks, strict=True) if ack is not None]


def _watch_both(clients: list[mb.RawClient]) -> list[tuple[bool, list[mb.Packet]]]:
    """For each client, whether the server closed it within 2 s (both watched at once), and
    the packets it got before."""
    outcome: list[tuple[bool, list[mb.Packet]]] = [(False, []) for _ in clients]

    def watch(j: int) -> None:
        closed = clients[j].expect_closed(2.0)
        outcome[j] = (closed, clients[j].before_close)

    watchers = [threading.Thread(target=watch, args=(j,)) for j in range(len(clients))]
    for t in watchers:
        t.start()
    for t in watchers:
        t.join(10)
    return outcome


def test_the_same_client_id_on_both_nodes_at_once_leaves_one_session(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker]) -> None:
    a, b = two_nodes(etcd_single, make_broker)
    nodes = {"n1": a, "n2": b}
    for i in range(8):
        owner_name = "n1" if i % 2 else "n2"
        owner, other = nodes[owner_name], nodes["n2" if owner_name == "n1" else "n1"]
        cid = id_of(owner_name, f"twice{i}-")
        pairs = _connect_both((a.port, b.port), cid)
        outcome = _watch_both([c for c, _ack in pairs])
        closed = [j for j, (gone, _packets) in enumerate(outcome) if gone]
        assert len(closed) == 1, (cid, [ack for _c, ack in pairs], outcome)
        loser, winner = closed[0], 1 - closed[0]
        lost_ack = pairs[loser][1]
        if lost_ack.rc == 0:  # connected, then taken over by the other
            discs = [p for p in outcome[loser][1] if p[0] == mb.DISCONNECT]
            assert discs and mb.parse_disconnect(discs[-1][2], 5).reason == SESSION_TAKEN_OVER, outcome[loser]
        else:  # or its CONNECT refused
            assert lost_ack.rc >= 0x80
        survivor = pairs[winner][0]
        assert pairs[winner][1].rc == 0
        survivor.ping()
        view = ctl(owner, {"op": "client", "client_id": cid})["client"]
        assert view is not None and view["version"] == 5 and view["state"] != "offline"
        port = survivor.sock.getsockname()[1]  # type: ignore[union-attr]
        assert view["address"] == f"127.0.0.1:{port}"  # the owner's session is the survivor's
        assert ctl(other, {"op": "client", "client_id": cid})["client"] is None  # no second one
        survivor.disconnect()
        pairs[loser][0].close()
    # `ctl client` on the owner shows the session (persistent: offline now)
    out = subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "ctl", "--data-dir", str(b.data_dir),
                          "client", id_of("n2", "twice0-"), "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=20, check=False)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["client"]
    assert shown["client_id"] == id_of("n2", "twice0-") and shown["persistent"] is True
