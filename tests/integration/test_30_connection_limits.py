"""29: open connections in total and per address (limits.max_connections,
max_connections_per_address), counted from accept to close wherever the connection is, and
the client's address behind trusted proxies (trusted_proxies: X-Forwarded-For, Forwarded)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time

import mqttbytes as mb
import pytest
from conftest import client_id_on_shard, wait_until

pytestmark = pytest.mark.usefixtures("_only_shardbroker")


def _from(broker_or_port, source: str, port: int | None = None) -> socket.socket:
    """A TCP connection to the broker from the loopback address ``source``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port or broker_or_port.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _client(b, cid: str, source: str = "127.0.0.1") -> mb.RawClient:
    c = mb.RawClient(port=b.port, sock=_from(b, source))
    assert c.connect_mqtt(cid, version=4).rc == 0
    return c


def _refused(b, cid: str, source: str = "127.0.0.1") -> bool:
    """A new connection is closed without a CONNACK (it was closed as soon as it was accepted)."""
    s = _from(b, source)
    try:
        s.sendall(mb.connect(cid))
        return s.recv(4) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def _admitted(b, cid: str, source: str = "127.0.0.1") -> mb.RawClient | None:
    try:
        c = mb.RawClient(port=b.port, sock=_from(b, source))
        ack = c.connect_mqtt(cid, version=4, timeout=3)
    except (OSError, mb.ConnectionClosed):
        return None
    return c if ack.rc == 0 else None


def _eventually_admitted(b, cid: str, source: str = "127.0.0.1", timeout: float = 5.0) -> mb.RawClient:
    return wait_until(lambda: _admitted(b, cid, source), timeout, interval=0.1, message=f"{cid} admitted")


def _round_trip(c: mb.RawClient, topic: str) -> None:
    c.subscribe(topic, 1)
    c.publish(topic, b"still here", qos=1)
    assert c.recv_publish(5).payload == b"still here"


# --------------------------------------------------------------------------- in total


def test_over_the_total_a_new_connection_is_closed(make_broker, uniq):
    b = make_broker(workers=2, config="[limits]\nmax_connections = 3\n")
    time.sleep(0.3)  # the start-up probes have left
    first = _eventually_admitted(b, uniq.cid("a"))
    second = _client(b, uniq.cid("b"))
    half = _from(b, "127.0.0.1")  # still in the acceptor: half a CONNECT counts too
    half.sendall(mb.connect(uniq.cid("h"))[:3])
    time.sleep(0.2)
    assert _refused(b, uniq.cid("c"))
    b.wait_for_log(r"3 connections open \(limits\.max_connections\): closing new ones", timeout=5)
    _round_trip(first, uniq.topic())  # those in are not affected
    half.close()  # one that leaves before its CONNECT frees its slot ...
    third = _eventually_admitted(b, uniq.cid("d"))
    assert _refused(b, uniq.cid("e"))
    second.disconnect()  # ... and so does one that a worker served
    _eventually_admitted(b, uniq.cid("f")).close()
    for c in (first, third):
        c.close()
    b.stop()
    b.wait_for_log(r"acceptor stopped .* by limits\.max_connections [1-9]")


def test_a_client_that_sent_disconnect_frees_its_slot_before_it_closes(make_broker, uniq):
    # The broker closes a client that said DISCONNECT at once, without the second of
    # draining its input (CLOSE_LINGER) that other closes get; so its slot is free while
    # the client still holds its end of the connection.
    b = make_broker(workers=1, config="[limits]\nmax_connections = 1\n")
    time.sleep(0.3)  # the start-up probe has left
    first = _eventually_admitted(b, uniq.cid("a"))
    first.send(mb.disconnect())
    assert first.expect_closed(3)  # the FIN; its own end stays open
    said = time.monotonic()
    second = _eventually_admitted(b, uniq.cid("b"), timeout=5)
    assert time.monotonic() - said < 0.9  # not after the linger (1 s)
    second.close()
    first.sock.close()


# --------------------------------------------------------------------------- per address

PER_ADDRESS = "[limits]\nmax_connections_per_address = 2\n"


@pytest.fixture(scope="module")
def per_address(make_module_broker):
    return make_module_broker(workers=2, config=PER_ADDRESS)


def test_per_address_counts_the_connections_workers_hold(per_address, uniq):
    b = per_address
    a1 = _client(b, uniq.cid("a"), "127.0.0.2")
    a2 = _client(b, uniq.cid("a"), "127.0.0.2")
    assert _refused(b, uniq.cid("a"), "127.0.0.2")
    b.wait_for_log(r"127\.0\.0\.2: 2 connections open from this address \(limits\.max_connections_per_address\)")
    others = [_client(b, uniq.cid("o"), "127.0.0.3") for _ in range(2)]  # another address has its own
    _round_trip(a1, uniq.topic())
    # a plain TCP close (no DISCONNECT) of a connection its worker owns frees the slot
    a2.sock.close()
    again = _eventually_admitted(b, uniq.cid("a"), "127.0.0.2")
    assert _refused(b, uniq.cid("a"), "127.0.0.2")
    for c in (a1, again, *others):
        c.close()


def test_a_worker_killed_frees_its_connections(per_address, uniq):
    b = per_address
    clients = [_client(b, client_id_on_shard(uniq.prefix(f"k{i}"), 1, 2), "127.0.0.4") for i in range(2)]
    assert _refused(b, uniq.cid("k"), "127.0.0.4")
    os.kill(b.worker_pids()[1], signal.SIGKILL)
    for c in clients:
        assert c.expect_closed(5)
    b.wait_for_log(r"hand-off link to shard 1 closed: its 2 connections are no longer counted", timeout=10)
    back = [_eventually_admitted(b, client_id_on_shard(uniq.prefix(f"n{i}"), 1, 2), "127.0.0.4", timeout=20)
            for i in range(2)]
    assert _refused(b, uniq.cid("k"), "127.0.0.4")
    for c in back:
        c.close()


# --------------------------------------------------------------------------- behind proxies

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_header(ip: str, port: int) -> bytes:
    body = socket.inet_aton(ip) + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big") + (1883).to_bytes(2, "big")
    return SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body


@pytest.fixture(scope="module")
def proxied(make_module_broker):
    config = """
[limits]
max_connections_per_address = 1

[[listener]]
port = 0

[[listener]]
port = 0
proxy_protocol = true

[[listener]]
type = "ws"
port = 0
trusted_proxies = ["127.0.0.2", "10.0.0.0/8"]
"""
    b = make_module_broker(workers=2, config=config)
    ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", b.log_text())]
    b.proxy_port, b.ws_port = ports[1], ports[2]
    return b


def test_behind_the_proxy_protocol_the_limit_is_the_clients(proxied, uniq):
    def via(ip: str, sport: int) -> socket.socket:
        s = _from(proxied, "127.0.0.5", proxied.proxy_port)
        s.sendall(_proxy_header(ip, sport))
        return s

    one = mb.RawClient(port=proxied.proxy_port, sock=via("192.0.2.50", 1000))
    assert one.connect_mqtt(uniq.cid("p"), version=4).rc == 0
    two = mb.RawClient(port=proxied.proxy_port, sock=via("192.0.2.51", 1001))  # same proxy, another client
    assert two.connect_mqtt(uniq.cid("p"), version=4).rc == 0
    over = via("192.0.2.50", 1002)
    over.sendall(mb.connect(uniq.cid("p")))
    with contextlib.suppress(ConnectionResetError):  # closed with the CONNECT unread: a reset
        assert over.recv(4) == b""
    proxied.wait_for_log(r"192\.0\.2\.50: 1 connections open from this address")
    for c in (one, two):
        c.close()
    over.close()


@pytest.fixture
def held():
    """Where the WebSocket clients of a test are entered, and closed at its end."""
    with contextlib.ExitStack() as stack:
        yield stack


def _ws(port: int, source: str, headers: dict[str, str]):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], additional_headers=headers,
                      sock=_from(None, source, port), open_timeout=5)


def _ws_mqtt(held, port: int, source: str, headers: dict[str, str], cid: str):
    """A WebSocket client that sent CONNECT and got CONNACK 0, or None if it was closed."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    try:
        ws = held.enter_context(_ws(port, source, headers))
    except (OSError, InvalidHandshake):
        return None
    try:
        ws.send(mb.connect(cid, version=4))
        if ws.recv(timeout=5)[:4] == b"\x20\x02\x00\x00":
            return ws
    except (ConnectionClosed, TimeoutError, OSError):
        pass
    ws.close()
    return None


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(proxied, uniq, held):
    port = proxied.ws_port
    cid = uniq.cid("x")
    ws = _ws_mqtt(held, port, "127.0.0.2", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}, cid)
    assert ws is not None
    proxied.wait_for_log(rf"client {cid} connected from 203\.0\.113\.7:0 ")
    # the proxy's own address is not limited: another client behind it gets in
    other = _ws_mqtt(held, port, "127.0.0.2", {"X-Forwarded-For": "203.0.113.8"}, uniq.cid("y"))
    assert other is not None
    # the same client again is over its limit of 1
    assert _ws_mqtt(held, port, "127.0.0.2", {"X-Forwarded-For": "203.0.113.7"}, uniq.cid("z")) is None
    proxied.wait_for_log(r"203\.0\.113\.7: 1 connections open from this address")
    # the standard Forwarded header, and a chain through a second trusted proxy
    cid = uniq.cid("f")
    fwd = _ws_mqtt(held, port, "127.0.0.2", {"Forwarded": 'for="[2001:db8::9]:4711", for=10.1.2.3'}, cid)
    assert fwd is not None
    proxied.wait_for_log(rf"client {cid} connected from \[2001:db8::9\]:4711 ")


def test_x_forwarded_for_from_anyone_else_is_ignored(proxied, uniq, held):
    port = proxied.ws_port
    cid = uniq.cid("u")
    ws = _ws_mqtt(held, port, "127.0.0.6", {"X-Forwarded-For": "203.0.113.99"}, cid)
    assert ws is not None
    line = proxied.wait_for_log(rf"client {cid} connected from ")
    assert "127.0.0.6:" in line and "203.0.113.99" not in line
    # counted under its own address: a second one with another header is over the limit
    assert _ws_mqtt(held, port, "127.0.0.6", {"X-Forwarded-For": "203.0.113.98"}, uniq.cid("v")) is None
    ws.close()  # a relayed connection frees its slot when its relay closes
    wait_until(lambda: _ws_mqtt(held, port, "127.0.0.6", {}, uniq.cid("w")), 5, interval=0.1,
               message="a WebSocket client admitted again")


def test_a_malformed_header_leaves_the_proxys_address(proxied, uniq, held):
    cid = uniq.cid("m")
    ws = _ws_mqtt(held, proxied.ws_port, "127.0.0.2", {"X-Forwarded-For": "203.0.113.7, not-an-address"}, cid)
    assert ws is not None
    proxied.wait_for_log(r"127\.0\.0\.2:\d+: forwarding header of a trusted proxy ignored: bad address 'not-an-address'")
    proxied.wait_for_log(rf"client {cid} connected from 127\.0\.0\.2:")
