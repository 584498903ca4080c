"""``[cluster] redirect``: which client of another node's virtual shard the acceptor
redirects (CONNACK 0x9C with the owner's address as Server Reference) and which it relays,
decided from the grant. Real acceptors in this process on loopback, with grants made by
hand: ``a`` believes every virtual shard is served at ``target``, which is either a second
acceptor ``b`` (that believes the same of ``a``, so a client relayed to it is refused: the
refusal says the relay happened) or an address where nothing listens."""

from __future__ import annotations

import asyncio
import socket
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mqttbytes as mb
import pytest

from shardbroker.cluster.grant import Grant
from shardbroker.config import ConfigError, load_config
from shardbroker.process.acceptor import Acceptor

COUNT = 1024
USE_ANOTHER_SERVER = 0x9C
SERVER_UNAVAILABLE = 0x88
T = TypeVar("T")


def _acceptor(tmp_path: Path, name: str, redirect: bool) -> tuple[Acceptor, int]:
    config = load_config(None, {"cluster.node_id": name, "cluster.etcd_endpoints": ["http://127.0.0.1:9"],
                                "cluster.advertise": "127.0.0.1:7000", "cluster.redirect": redirect})
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(16)
    (tmp_path / name).mkdir()
    return Acceptor(config, [(listen, config.effective_listeners[0], None)], str(tmp_path / name), 1), \
        listen.getsockname()[1]


def _elsewhere(peer: str) -> dict[str, object]:
    """A grant that serves nothing here and says every virtual shard is ``peer``'s."""
    return Grant(1, 1, 1, time.monotonic() + 600, (-1,) * COUNT, (0,) * COUNT, (peer,), (0,) * COUNT).to_value()


def _run(acceptors: list[Acceptor], client: Callable[[], T]) -> T:
    async def main() -> T:
        loop = asyncio.get_running_loop()
        for acceptor in acceptors:
            acceptor.start(loop)
        try:
            return await loop.run_in_executor(None, client)
        finally:
            for acceptor in acceptors:
                acceptor.stop()

    return asyncio.run(main())


def _connack(port: int, version: int, props: bytes = b"") -> mb.ConnAck:
    c = mb.RawClient(port=port, connect_timeout=2)
    try:
        ack = c.connect_mqtt("elsewhere", version=version, clean=True, timeout=5, props=props)
        assert c.expect_closed(5)  # [MQTT-3.2.2-7]: closed after a refusing CONNACK
        return ack
    finally:
        c.close()


def _pair(tmp_path: Path, redirect: bool) -> tuple[Acceptor, int, Acceptor, int]:
    a, a_port = _acceptor(tmp_path, "a", redirect)
    b, b_port = _acceptor(tmp_path, "b", False)
    a.control({"op": "fence", "grant": _elsewhere(f"127.0.0.1:{b_port}")})
    b.control({"op": "fence", "grant": _elsewhere(f"127.0.0.1:{a_port}")})
    return a, a_port, b, b_port


def test_a_5_0_client_is_redirected_to_the_owner_and_a_3_1_1_one_relayed(tmp_path: Path) -> None:
    a, a_port, b, b_port = _pair(tmp_path, redirect=True)
    v5, v4, v3 = _run([a, b], lambda: (_connack(a_port, 5), _connack(a_port, 4), _connack(a_port, 3)))
    assert v5.rc == USE_ANOTHER_SERVER and not v5.session_present
    assert v5.props[mb.SERVER_REFERENCE] == f"127.0.0.1:{b_port}"  # the address a relay uses
    assert (v4.rc, v3.rc) == (3, 3)  # relayed to b, which refuses a relayed client it does not serve
    assert (a.redirected, a.relayed, a.relay_failed) == (1, 2, 0)
    assert b.refused_relayed == 2  # the 5.0 client never reached b
    assert a.control({"op": "stats"})["counters"]["redirected"] == 1  # type: ignore[index]
    assert a.counts.total == 0 and b.counts.total == 0


def test_without_redirect_a_5_0_client_is_relayed(tmp_path: Path) -> None:
    a, a_port, b, _b_port = _pair(tmp_path, redirect=False)
    ack = _run([a, b], lambda: _connack(a_port, 5))
    assert ack.rc == SERVER_UNAVAILABLE and mb.SERVER_REFERENCE not in ack.props  # b's answer, relayed
    assert (a.redirected, a.relayed, b.refused_relayed) == (0, 1, 1)


def test_an_owner_that_does_not_answer_gives_server_unavailable_not_a_redirect(tmp_path: Path) -> None:
    a, a_port = _acceptor(tmp_path, "a", redirect=True)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    a.control({"op": "fence", "grant": _elsewhere(f"127.0.0.1:{port}")})
    ack = _run([a], lambda: _connack(a_port, 5))
    assert ack.rc == SERVER_UNAVAILABLE and mb.SERVER_REFERENCE not in ack.props
    assert (a.redirected, a.relay_failed, a.refused_unserved) == (0, 1, 1)
    assert a.counts.total == 0


def test_a_server_reference_that_does_not_fit_the_clients_maximum_packet_size_is_left_out(
        tmp_path: Path) -> None:
    a, a_port, b, _b_port = _pair(tmp_path, redirect=True)
    small = mb.prop_u32(mb.MAXIMUM_PACKET_SIZE, 8)  # room for the bare CONNACK only
    ack = _run([a, b], lambda: _connack(a_port, 5, small))
    assert ack.rc == USE_ANOTHER_SERVER and mb.SERVER_REFERENCE not in ack.props
    assert a.redirected == 1


def test_only_5_0_clients_of_plain_listeners_are_redirected(tmp_path: Path) -> None:
    a, _port = _acceptor(tmp_path, "a", redirect=True)
    off, _ = _acceptor(tmp_path, "off", redirect=False)
    plain = types.SimpleNamespace(listener=None)
    tls = types.SimpleNamespace(listener=a.listens[0][1])  # set for TLS and WebSocket clients
    assert a.redirects(plain, 5)  # type: ignore[arg-type]
    assert not a.redirects(plain, 4) and not a.redirects(plain, 3)  # type: ignore[arg-type]
    assert not a.redirects(tls, 5)  # type: ignore[arg-type]
    assert not off.redirects(plain, 5)  # type: ignore[arg-type]


def test_the_setting_is_checked_like_the_others() -> None:
    assert load_config(None, {}).cluster.redirect is False
    with pytest.raises(ConfigError, match="cluster.redirect"):
        load_config(None, {"cluster.redirect": "sometimes"})
