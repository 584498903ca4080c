"""Relaying a client to the node that serves it: the grant names the owner's client address,
the PROXY header that marks a relayed connection, and two real acceptors (in this process,
on loopback, with grants made by hand) whose maps disagree, so that each sends the client to
the other: the relay stops after one hop and the client gets "server unavailable". An owner
that cannot be reached gives the same answer."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import mqttbytes as mb
import pytest

from shardbroker.cluster.fence import Fence
from shardbroker.cluster.grant import Grant, GrantError, from_fence
from shardbroker.cluster.membership import NodeInfo, parse_node
from shardbroker.cluster.placement import Slot, place, slots_of, vshard_for
from shardbroker.cluster.shardmap import NODES_PREFIX, next_map
from shardbroker.config import load_config
from shardbroker.process.acceptor import Acceptor
from shardbroker.transport import proxy

COUNT = 1024


def test_the_grant_names_the_owner_node_of_a_shard_served_elsewhere() -> None:
    placement = place(COUNT, slots_of({"n1": 1, "n2": 1, "n3": 1}))
    shard_map = next_map(None, placement, {"n1": 1, "n2": 2, "n3": 3})
    assert shard_map is not None
    fence = Fence("n1", 1)
    fence.apply(shard_map)
    fence.renewed(100.0)
    nodes = {"n1": NodeInfo("n1", "10.0.0.1:7100", 1, clients="10.0.0.1:1883"),
             "n2": NodeInfo("n2", "10.0.0.2:7100", 1, clients="10.0.0.2:1883"),
             "n3": NodeInfo("n3", "10.0.0.3:7100", 1)}  # n3 has no plain listener
    grant = from_fence(fence, 1, 1, now=0.0, nodes=nodes)
    assert grant.peers == ("10.0.0.2:1883",)  # every other node with an address
    ids = {slot.node: next(c for c in (f"c{i}" for i in range(10_000))
                           if placement[vshard_for(c, COUNT)] == slot)
           for slot in (Slot("n1", 0), Slot("n2", 0), Slot("n3", 0))}
    assert grant.relay_to(ids["n2"], 1.0) == "10.0.0.2:1883"
    assert grant.owner(ids["n2"], 1.0) == -1
    assert grant.relay_to(ids["n1"], 1.0) is None and grant.owner(ids["n1"], 1.0) == 0
    assert grant.relay_to(ids["n3"], 1.0) is None  # refused: no address to relay to
    assert grant.relay_to(ids["n2"], 100.0) is None  # nor after the lease deadline
    assert Grant.from_value(grant.to_value()) == grant
    old = {k: v for k, v in grant.to_value().items()
           if k not in ("peers", "remote", "number", "nodes", "peer_of")}
    assert Grant.from_value(old).remote == ()  # a grant without them relays nothing
    with pytest.raises(GrantError):
        Grant.from_value({**grant.to_value(), "remote": [5] * COUNT})
    assert from_fence(fence, 2, 1, now=0.0).remote == ()  # no nodes: no relays


def test_the_node_record_says_where_clients_reach_it_and_old_records_still_parse() -> None:
    info = NodeInfo("n1", "127.0.0.2:7000", 2, clients="127.0.0.2:1883")
    assert parse_node(NODES_PREFIX + "n1", info.encode()) == info
    old = b'{"advertise": "127.0.0.2:7000", "workers": 2, "state": "up"}'
    assert parse_node(NODES_PREFIX + "n1", old) == NodeInfo("n1", "127.0.0.2:7000", 2, "up", "")
    numbered = NodeInfo("n1", "127.0.0.2:7000", 2, number=9, key="K" * 40)
    assert parse_node(NODES_PREFIX + "n1", numbered.encode()) == numbered
    bogus = b'{"advertise": "127.0.0.2:7000", "workers": 2, "state": "up", "number": 300}'
    assert parse_node(NODES_PREFIX + "n1", bogus) == NodeInfo("n1", "127.0.0.2:7000", 2)


def test_the_proxy_header_a_relay_sends_is_read_back() -> None:
    assert proxy.parse(proxy.encode("192.0.2.7:40000", "127.0.0.1:1883") + b"\x10") == (28, "192.0.2.7:40000")
    assert proxy.parse(proxy.encode("[2001:db8::1]:5", "[::1]:1883")) == (52, "[2001:db8::1]:5")
    assert proxy.parse(proxy.encode("192.0.2.7:1", "[::1]:1883")) == (16, None)  # mixed: UNSPEC
    assert proxy.split_address("[::1]:1883") == ("::1", 1883)
    with pytest.raises(ValueError):
        proxy.split_address("nohost")


def _acceptor(tmp_path: Path, name: str, rate: int = 0) -> tuple[Acceptor, int]:
    config = load_config(None, {"cluster.node_id": name, "cluster.etcd_endpoints": ["http://127.0.0.1:9"],
                                "cluster.advertise": "127.0.0.1:7000", "limits.max_connection_rate": rate})
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(16)
    (tmp_path / name).mkdir()
    lst = config.effective_listeners[0]
    return Acceptor(config, [(listen, lst, None)], str(tmp_path / name), 1), listen.getsockname()[1]


def _elsewhere(seq: int, peer: str) -> Grant:
    """A grant that serves nothing here and says every virtual shard is ``peer``'s."""
    return Grant(seq, 1, 1, time.monotonic() + 600, (-1,) * COUNT, (0,) * COUNT, (peer,), (0,) * COUNT)


def _connack(port: int, version: int) -> int:
    c = mb.RawClient(port=port, connect_timeout=2)
    try:
        rc = c.connect_mqtt("looping", version=version, clean=True, timeout=5).rc
        assert c.expect_closed(5)
        return rc
    finally:
        c.close()


def test_maps_that_disagree_make_no_relay_loop(tmp_path: Path) -> None:
    a, a_port = _acceptor(tmp_path, "a")
    b, b_port = _acceptor(tmp_path, "b", rate=1)  # relays come from a node's host: not limited
    # a thinks b serves every client, and b thinks a does (as the supervisors tell them)
    assert a.control({"op": "fence", "grant": _elsewhere(1, f"127.0.0.1:{b_port}").to_value()})["seq"] == 1
    assert b.control({"op": "fence", "grant": _elsewhere(1, f"127.0.0.1:{a_port}").to_value()})["seq"] == 1

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        a.start(loop)
        b.start(loop)
        try:
            v4 = await loop.run_in_executor(None, _connack, a_port, 4)
            v5 = await loop.run_in_executor(None, _connack, a_port, 5)
            return v4, v5
        finally:
            a.stop()
            b.stop()

    assert asyncio.run(main()) == (3, 0x88)  # server unavailable, from b, through a's relay
    assert (a.relayed, a.refused_relayed, a.relay_failed) == (2, 0, 0)
    assert (b.relayed, b.refused_relayed, b.refused_unserved, b.refused) == (0, 2, 2, 0)
    assert a.counts.total == 0 and b.counts.total == 0  # the relays ended and were released


def test_an_owner_that_cannot_be_reached_gives_server_unavailable(tmp_path: Path) -> None:
    a, a_port = _acceptor(tmp_path, "a")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connection is refused
    a.control({"op": "fence", "grant": _elsewhere(1, f"127.0.0.1:{port}").to_value()})

    async def main() -> int:
        loop = asyncio.get_running_loop()
        a.start(loop)
        try:
            return await loop.run_in_executor(None, _connack, a_port, 5)
        finally:
            a.stop()

    assert asyncio.run(main()) == 0x88
    assert (a.relayed, a.relay_failed, a.refused_unserved) == (0, 1, 1)
    assert a.counts.total == 0
