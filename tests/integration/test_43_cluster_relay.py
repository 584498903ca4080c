"""A client that reaches a node that does not serve its virtual shard is relayed to the node
that does, against a real etcd (tests/cluster_fixtures.py), two nodes on loopback with their
own data directories: the session lives on the owner (ctl finds it there, with the client's
own address), QoS 1 goes both ways through the relay, a close on either side closes the
other (the will applies on the owner), and an owner that is down gives "server
unavailable" until its lease ends and its shards come to this node."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import mqttbytes as mb
from cluster_fixtures import EtcdCluster, bus_address
from conftest import Broker, Clients, Uniq, assert_disconnected, wait_until

from shardbroker.cluster.admin import status
from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.membership import NodeInfo
from shardbroker.cluster.numbers import load_identity
from shardbroker.cluster.placement import Slot, place, vshard_for
from shardbroker.operations import control

SERVER_UNAVAILABLE = 0x88
KICKED = 0x98  # administrative action


def node_config(etcd: EtcdCluster, node_id: str, ttl: int = 2, extra: str = "",
                advertise: str = "") -> str:
    """``advertise``: the node's bus address (free ports of this host unless given)."""
    endpoints = ", ".join(f'"{url}"' for url in etcd.endpoints)
    return (f'[cluster]\nnode_id = "{node_id}"\netcd_endpoints = [{endpoints}]\n'
            f'advertise = "{advertise or bus_address()}"\nlease_ttl = {ttl}\n' + extra)


def ctl(b: Broker, request: dict) -> dict:  # type: ignore[type-arg]
    return control.call(str(b.data_dir / "control.sock"), request)  # type: ignore[no-any-return]


def acceptor(b: Broker) -> dict:  # type: ignore[type-arg]
    return ctl(b, {"op": "stats"})["acceptor"]  # type: ignore[no-any-return]


def id_of(node: str, prefix: str) -> str:
    """A client ID whose virtual shard the map of n1 + n2 (one worker each) gives ``node``."""
    both = place(1024, [Slot("n1", 0), Slot("n2", 0)])
    return next(c for c in (f"{prefix}{i}" for i in range(10_000))
                if both[vshard_for(c, 1024)] == Slot(node, 0))


def two_nodes(etcd: EtcdCluster, make_broker: Callable[..., Broker], ttl: int = 2,
              extra: str = "") -> tuple[Broker, Broker]:
    """n1 (with ``extra`` in its configuration) and n2 up, both serving the map that shares
    the shards between them, each knowing the other's client address."""
    bus = bus_address()
    a = make_broker(workers=1, config=node_config(etcd, "n1", ttl, extra, bus), name="node1")
    b = make_broker(workers=1, config=node_config(etcd, "n2", ttl), name="node2", probe=False)
    client = Etcd(etcd.endpoints)
    try:
        def settled() -> bool:
            view = read_view(client)
            return (view.map is not None and set(view.map.per_node()) == {"n1", "n2"}
                    and view.applied == {"n1": view.map.version, "n2": view.map.version})

        wait_until(settled, timeout=15, message="both nodes serve their share")
        nodes = read_view(client).nodes
        shown = {n["node_id"]: n["clients"] for n in status(client)["nodes"]}  # status --json
    finally:
        client.close()
    # each node's record says where clients reach it: the advertise host, its listener's port
    identity = load_identity(a.data_dir)
    assert identity is not None
    assert nodes["n1"] == NodeInfo("n1", bus, 1, "up", f"127.0.0.1:{a.port}", 1, identity.public)
    assert nodes["n2"].clients == f"127.0.0.1:{b.port}"
    assert shown == {"n1": f"127.0.0.1:{a.port}", "n2": f"127.0.0.1:{b.port}"}
    for node, broker in (("n1", a), ("n2", b)):
        cid = id_of(node, "ready")
        wait_until(lambda cid=cid, broker=broker: _rc(broker.port, cid) == 0, timeout=10,
                   message=f"{node} serves its own")
    return a, b


def _rc(port: int, client_id: str) -> int:
    c = mb.RawClient(port=port, connect_timeout=2)
    try:
        rc = c.connect_mqtt(client_id, version=5, clean=True, timeout=5).rc
        if rc == 0:
            c.disconnect()
        return rc
    finally:
        c.close()


def test_a_client_of_the_other_node_gets_its_session_there_through_the_relay(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    a, b = two_nodes(etcd_single, make_broker)
    cid, topic = id_of("n2", "far"), uniq.topic()
    relayed_before = acceptor(a)["relayed"]
    c = mqtt(a, cid, version=5)  # to n1, which does not serve it
    assert acceptor(a)["relayed"] == relayed_before + 1
    found = ctl(b, {"op": "client", "client_id": cid})  # the session is n2's
    assert found["client"] is not None and found["client"]["version"] == 5
    # n2 sees the client's own address (from the PROXY header), not n1's connection to it
    client_port = c.sock.getsockname()[1]  # type: ignore[union-attr]
    assert found["client"]["address"] == f"127.0.0.1:{client_port}"
    assert ctl(a, {"op": "client", "client_id": cid})["client"] is None

    # QoS 1 both ways, with clients connected to n2 directly
    c.subscribe(topic, qos=1)
    direct = mqtt(b, id_of("n2", uniq.cid("d")), version=4)  # one n2 serves itself
    direct.subscribe(topic + "/back", qos=1)
    assert direct.publish(topic, b"to-relayed", qos=1) is not None
    got = c.recv_publish()
    assert (got.payload, got.qos) == (b"to-relayed", 1)
    ack = c.publish(topic + "/back", b"from-relayed", qos=1)
    assert ack is not None and ack.reason == 0
    back = direct.recv_publish()
    assert (back.payload, back.qos) == (b"from-relayed", 1)
    c.ping()
    assert acceptor(a)["relays"] == 1  # n1 carries it ...
    assert acceptor(a)["open"] >= 1  # ... and counts it toward its own limits

    # a client that sends no identifier gets one of n1's own shards: not relayed
    relayed = acceptor(a)["relayed"]
    for _ in range(6):
        anonymous = mqtt(a, "", version=5)
        assigned = anonymous.connack.props[mb.ASSIGNED_CLIENT_IDENTIFIER]  # type: ignore[attr-defined]
        assert ctl(a, {"op": "client", "client_id": assigned})["client"] is not None
        anonymous.disconnect()
    assert acceptor(a)["relayed"] == relayed


def test_a_close_on_either_side_ends_the_relay(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    a, b = two_nodes(etcd_single, make_broker)
    wills = mqtt(b, id_of("n2", uniq.cid("w")), version=4)
    topic = uniq.topic()
    wills.subscribe(topic, qos=1)

    # the client drops its connection to n1: n2's session sees it go, and sends the will
    gone = mqtt(a, id_of("n2", "drop"), version=4, will=mb.Will(topic, b"will", qos=1))
    gone.ping()
    gone.abort()
    msg = wills.recv_publish(timeout=5)
    assert msg.payload == b"will"
    wait_until(lambda: acceptor(a)["relays"] == 0, timeout=5, message="the relay ended")

    # n2 closes the client (a kick): the DISCONNECT comes through, then the close
    cid = id_of("n2", "kick")
    kicked = mqtt(a, cid, version=5)
    assert ctl(b, {"op": "kick", "client_id": cid})["kicked"] is True
    assert_disconnected(kicked, 5, {KICKED}, timeout=5)
    wait_until(lambda: acceptor(a)["relays"] == 0 and acceptor(a)["open"] == 0, timeout=5,
               message="the relay ended and n1 no longer counts the connection")
    assert "relayed to the node at 127.0.0.1:" in a.log_text()


def test_an_owner_that_is_down_gives_server_unavailable_until_its_shards_move(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq) -> None:
    ttl = 4
    a, b = two_nodes(etcd_single, make_broker, ttl=ttl)
    cid = id_of("n2", "down")
    b.kill9()  # its lease lives on for up to the TTL, and the map still names it
    killed = time.monotonic()
    refused = mqtt(a, cid, version=5, expect_rc=SERVER_UNAVAILABLE)
    assert refused.expect_closed(3)
    refused4 = mqtt(a, cid, version=4, expect_rc=3)
    assert refused4.expect_closed(3)
    assert time.monotonic() - killed < ttl  # answered while the map still gave it to n2
    stats = acceptor(a)
    assert stats["relay_failed"] >= 2 and stats["open"] == 0
    # once n2's lease has ended the map gives its shards to n1, which serves them itself
    wait_until(lambda: _rc(a.port, cid) == 0, timeout=ttl + 10, interval=0.2,
               message="n1 serves the shards of the node that died")
    assert "cannot be reached" in a.log_text()


def test_a_paho_client_over_websocket_and_tls_is_relayed_as_plain_mqtt(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], mqtt: Clients,
        uniq: Uniq, pki: dict[str, Path]) -> None:
    import paho.mqtt.client as pm
    from paho.mqtt.enums import CallbackAPIVersion

    wss = (f'\n[[listener]]\nport = 0\n\n[[listener]]\ntype = "wss"\nport = 0\n'
           f'certfile = "{pki["crt"]}"\nkeyfile = "{pki["key"]}"\n')
    a, b = two_nodes(etcd_single, make_broker, extra=wss)
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(wss\)", a.log_text())
    assert found, a.tail(30)
    topic = uniq.topic()
    direct = mqtt(b, id_of("n2", uniq.cid("d")), version=4)
    direct.subscribe(topic + "/up", qos=1)
    cid = id_of("n2", "paho")
    c = pm.Client(CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets",
                  protocol=pm.MQTTv5)
    c.ws_set_options(path="/mqtt")
    c.tls_set(ca_certs=str(pki["ca"]))
    got: list[bytes] = []
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.connect("localhost", int(found.group(1)))
    c.loop_start()
    try:
        wait_until(lambda: c.is_connected(), timeout=5, message="paho connected through n1")
        assert ctl(b, {"op": "client", "client_id": cid})["client"] is not None  # on n2
        c.subscribe(topic + "/down", 1)
        time.sleep(0.4)
        c.publish(topic + "/up", b"over-wss", qos=1).wait_for_publish(5)
        assert direct.recv_publish().payload == b"over-wss"
        direct.publish(topic + "/down", b"back", qos=1)
        wait_until(lambda: got == [b"back"], timeout=5, message="the message back over wss")
    finally:
        c.loop_stop()
        c.disconnect()
    assert acceptor(a)["relayed"] >= 1
