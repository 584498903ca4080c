"""A node's identity file (``cluster/numbers.py``): made once with a real CURVE keypair,
readable by its owner alone, refused for another node ID or when damaged; and the bus port
range that ``serve`` checks before a cluster node starts (real sockets on loopback)."""

from __future__ import annotations

import json
import socket
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from shardbroker.cluster.numbers import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    bus_ports_problem,
    ensure_identity,
    load_identity,
    save_identity,
)
from shardbroker.peer.bus import curve_keypair
from shardbroker.process import supervisor


def test_curve_keypairs_are_z85_text_and_new_each_time() -> None:
    public, secret = curve_keypair()
    assert len(public) == len(secret) == 40 and public != secret
    assert curve_keypair() != (public, secret)


def test_identity_file_made_at_first_then_read_back(tmp_path: Path) -> None:
    assert load_identity(tmp_path) is None
    made = ensure_identity(tmp_path, "n1", curve_keypair)
    path = tmp_path / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"node_id": "n1", "public": made.public,
                                            "secret": made.secret, "number": 0}
    assert [p.name for p in tmp_path.iterdir()] == [IDENTITY_FILE]  # no temporary file left
    # a second start reads it: the same keys
    assert ensure_identity(tmp_path, "n1", curve_keypair) == made == load_identity(tmp_path)
    numbered = replace(made, number=4)
    save_identity(tmp_path, numbered)  # the number claimed
    assert load_identity(tmp_path) == Identity("n1", made.public, made.secret, 4)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [IDENTITY_FILE]


def test_another_nodes_or_a_damaged_identity_is_refused(tmp_path: Path) -> None:
    ensure_identity(tmp_path, "n1", curve_keypair)
    before = (tmp_path / IDENTITY_FILE).read_bytes()
    with pytest.raises(IdentityError, match="belongs to node 'n1', not 'n2'"):
        ensure_identity(tmp_path, "n2", curve_keypair)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before
    for damaged in (b"{", b"[]", b'{"node_id": "n1"}',
                    json.dumps({"node_id": "n1", "public": "x", "secret": "y", "number": 0}).encode(),
                    json.dumps({"node_id": "n1", "public": "a" * 40, "secret": "b" * 40,
                                "number": 256}).encode()):
        (tmp_path / IDENTITY_FILE).write_bytes(damaged)
        with pytest.raises(IdentityError, match="is not a cluster identity"):
            load_identity(tmp_path)


def test_the_supervisor_names_the_identity_file_alike() -> None:
    assert supervisor.IDENTITY_FILE == IDENTITY_FILE


def _listener_after_a_free_port() -> socket.socket:
    """A listening socket on loopback whose port less one is free (now)."""
    while True:
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        with socket.socket() as below:
            try:
                below.bind(("127.0.0.1", held.getsockname()[1] - 1))
            except OSError:
                held.close()
                continue
        held.listen()
        return held


def test_the_bus_ports_must_be_free_and_of_this_host() -> None:
    with _listener_after_a_free_port() as held:
        port = held.getsockname()[1]
        assert bus_ports_problem(f"127.0.0.1:{port}", 1) == (
            f"cluster.advertise 127.0.0.1:{port}: port {port} is in use (the bus binds port"
            f" {port}, one per worker)")
        # the second worker's port is the taken one
        assert bus_ports_problem(f"127.0.0.1:{port - 1}", 2) == (
            f"cluster.advertise 127.0.0.1:{port - 1}: port {port} is in use (the bus binds ports"
            f" {port - 1}..{port}, one per worker)")
    assert bus_ports_problem(f"127.0.0.1:{port}", 1) is None  # free again
    # nor may the bus have a port of the node's own MQTT listeners (on that host or on all)
    for listener in (("127.0.0.1", port), ("0.0.0.0", port + 1)):
        assert "is an MQTT listener's" in (bus_ports_problem(f"127.0.0.1:{port}", 2, [listener]) or "")
    assert bus_ports_problem(f"127.0.0.1:{port}", 1, [("127.0.0.2", port), ("0.0.0.0", 0)]) is None
    assert bus_ports_problem("192.0.2.1:7100", 1) == (
        "cluster.advertise 192.0.2.1:7100: 192.0.2.1 is not an address of this host (advertise"
        " is this node's bus address, bound here)")
    assert "needs ports 65535..65536" in (bus_ports_problem("127.0.0.1:65535", 2) or "")
    assert "does not resolve" in (bus_ports_problem("no-such-host.invalid:7100", 1) or "")
