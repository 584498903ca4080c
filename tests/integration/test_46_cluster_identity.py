"""A node's identity on the bus between nodes, against a real etcd (tests/cluster_fixtures.py):
node numbers claimed under ``/shardbroker/numbers/`` (the smallest free one, a lost race
takes the next, all 255 taken is one clear error), kept by a restart and new for a new data
directory; the identity file ``cluster-identity.json`` (mode 0600, the registration's key),
refused for another node ID; and ``serve`` refusing a bus port range that is taken or not of
this host, in one line."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cluster_fixtures import EtcdCluster, bus_address
from conftest import Broker, wait_until
from test_42_cluster_node import node_config, wait_serving

from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Compare, Delete, Etcd, Put
from shardbroker.cluster.node import ClusterNode
from shardbroker.cluster.numbers import (
    IDENTITY_FILE,
    MAX_NUMBER,
    Identity,
    IdentityError,
    NumbersExhausted,
    claim_number,
    load_identity,
    number_key,
)
from shardbroker.cluster.shardmap import NUMBERS_PREFIX
from shardbroker.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def numbers(etcd: Etcd) -> dict[int, str]:
    return {int(e.key.removeprefix(NUMBERS_PREFIX)): e.value.decode()
            for e in etcd.get_prefix(NUMBERS_PREFIX)}


class Racing(Etcd):
    """A client whose first claim finds the number taken by a rival just before its
    transaction: the race a claim can lose."""

    rival = "rival"

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints)
        self.raced = False

    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> bool:
        if not self.raced:
            self.raced = True
            self.put(compares[0].key, self.rival.encode())
        return super().txn(compares, success, failure)


def test_numbers_are_claimed_for_good_smallest_free_first(etcd_single: EtcdCluster) -> None:
    etcd = Etcd(etcd_single.endpoints)
    try:
        assert claim_number(etcd, "a") == 1
        assert claim_number(etcd, "b") == 2
        assert claim_number(etcd, "a", remembered=1) == 1  # a restart: still a's
        assert claim_number(etcd, "a") == 3  # a new data directory under the old ID
        assert claim_number(etcd, "b", remembered=1) == 4  # 1 is a's: b gets a new one
        entry = etcd.get(number_key(1))
        assert entry is not None and entry.lease == 0  # no lease: it outlives the node
        # a lost race: the rival took 5 between the read and the transaction
        racing = Racing(etcd_single.endpoints)
        try:
            assert claim_number(racing, "c") == 6
        finally:
            racing.close()
        assert numbers(etcd) == {1: "a", 2: "b", 3: "a", 4: "b", 5: "rival", 6: "c"}
        # many at once: each gets its own
        got: dict[str, int] = {}

        def claim(node: str) -> None:
            client = Etcd(etcd_single.endpoints)
            try:
                got[node] = claim_number(client, node)
            finally:
                client.close()

        threads = [threading.Thread(target=claim, args=(f"t{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got.values()) == list(range(7, 13))
        assert all(numbers(etcd)[n] == node for node, n in got.items())
        # all taken: one clear error, nothing claimed
        for n in range(13, MAX_NUMBER + 1):
            etcd.put(number_key(n), b"filler")
        with pytest.raises(NumbersExhausted, match=r"every node number \(1\.\.255\) is taken"):
            claim_number(etcd, "late")
        assert "late" not in numbers(etcd).values()
        assert claim_number(etcd, "c", remembered=6) == 6  # a remembered one is still good
    finally:
        etcd.close()


def registered_numbers(etcd_single: EtcdCluster) -> dict[str, tuple[int, str]]:
    etcd = Etcd(etcd_single.endpoints)
    try:
        return {node: (info.number, info.key) for node, info in read_view(etcd).nodes.items()}
    finally:
        etcd.close()


def test_nodes_get_distinct_numbers_kept_by_a_restart_and_new_for_a_new_data_dir(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker],
        capsys: pytest.CaptureFixture[str]) -> None:
    from test_42_cluster_node import status

    a = make_broker(workers=2, config=node_config(etcd_single, "n1"), name="node1")
    wait_serving(a, "n1", 2)
    b = make_broker(workers=1, config=node_config(etcd_single, "n2"), name="node2", probe=False)
    wait_until(lambda: registered_numbers(etcd_single).get("n2", (0, ""))[0] > 0, timeout=10,
               message="n2 registered with a number")
    ida, idb = load_identity(a.data_dir), load_identity(b.data_dir)
    assert ida is not None and idb is not None
    assert (ida.node_id, ida.number, idb.node_id, idb.number) == ("n1", 1, "n2", 2)
    assert ida.public != idb.public
    path = a.data_dir / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the registration carries the number and the public key (never the secret)
    assert registered_numbers(etcd_single) == {"n1": (1, ida.public), "n2": (2, idb.public)}
    doc = status(capsys, etcd_single)
    assert {n["node_id"]: n["number"] for n in doc["nodes"]} == {"n1": 1, "n2": 2}
    assert "claimed node number 1" in a.log_text()

    # a restart keeps its number (etcd still gives 1 to n1) and its keys
    a.restart()
    wait_serving(a, "n1", 2)
    wait_until(lambda: registered_numbers(etcd_single).get("n1") == (1, ida.public), timeout=10,
               message="n1 registered again")
    assert load_identity(a.data_dir) == ida
    assert a.log_text().count("claimed node number") == 1

    # n1 started on a new (empty) data directory: its sequence numbers start again, so it
    # is a new peer for the others: a new number and new keys
    a.stop()
    fresh = make_broker(workers=2, config=node_config(etcd_single, "n1"), name="node1fresh")
    wait_serving(fresh, "n1", 2)
    idf = load_identity(fresh.data_dir)
    assert idf is not None and idf.number == 3 and idf.public != ida.public
    wait_until(lambda: registered_numbers(etcd_single).get("n1") == (3, idf.public), timeout=10,
               message="n1 registered with its new number")
    etcd = Etcd(etcd_single.endpoints)
    try:
        assert numbers(etcd) == {1: "n1", 2: "n2", 3: "n1"}
    finally:
        etcd.close()


def serve(config: Path, data_dir: Path, workers: int, port: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardbroker.cli.main", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--data-dir", str(data_dir), "--log-level", "warning"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_a_data_directory_of_another_node_is_refused(
        etcd_single: EtcdCluster, make_broker: Callable[..., Broker], tmp_path: Path) -> None:
    a = make_broker(workers=1, config=node_config(etcd_single, "n1"), name="node1")
    a.stop()
    before = (a.data_dir / IDENTITY_FILE).read_bytes()
    config = tmp_path / "n2.toml"
    config.write_text(node_config(etcd_single, "n2"))
    res = serve(config, a.data_dir, 1)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        (f"shardbroker: error: data directory {a.data_dir} belongs to node 'n1', not 'n2' (its"
        f" {IDENTITY_FILE}): start that node on it, or give this one a data directory of its own")]
    assert (a.data_dir / IDENTITY_FILE).read_bytes() == before
    assert "n2" not in registered_numbers(etcd_single)
    a.start()  # n1 itself still starts on it
    wait_serving(a, "n1", 1)


def test_serve_refuses_bus_ports_that_are_taken_or_not_of_this_host(tmp_path: Path) -> None:
    # the check comes before etcd is asked anything: no etcd is needed, nothing is left behind
    def config(advertise: str) -> Path:
        path = tmp_path / "node.toml"
        path.write_text(f'[cluster]\nnode_id = "n1"\netcd_endpoints = ["http://127.0.0.1:9"]\n'
                        f'advertise = "{advertise}"\n')
        return path

    bus = bus_address(2)
    host, port = bus.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port) + 1))
        taken.listen()
        res = serve(config(bus), tmp_path / "d", 2)
    assert (res.returncode, res.stderr.splitlines()) == (2, [
        (f"shardbroker: error: cluster.advertise {bus}: port {int(port) + 1} is in use (the bus"
        f" binds ports {port}..{int(port) + 1}, one per worker)")])
    assert not (tmp_path / "d").exists()  # refused before the data directory was made

    # the MQTT listener's port is no bus port
    listener = int(bus_address(1).rsplit(":", 1)[1])
    res = serve(config(f"127.0.0.1:{listener}"), tmp_path / "d", 1, port=listener)
    assert (res.returncode, res.stderr.splitlines()) == (2, [(
        f"shardbroker: error: cluster.advertise 127.0.0.1:{listener}: port {listener} is an MQTT"
        f" listener's (the bus binds port {listener}, one per worker)")])
    assert not (tmp_path / "d").exists()

    res = serve(config("192.0.2.1:7100"), tmp_path / "d", 1)
    assert (res.returncode, res.stderr.splitlines()) == (2, [
        ("shardbroker: error: cluster.advertise 192.0.2.1:7100: 192.0.2.1 is not an address of"
        " this host (advertise is this node's bus address, bound here)")])
    assert "Traceback" not in res.stderr


def test_the_bus_fields_reach_the_status_of_a_node_without_a_number(
        etcd_single: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """A registration written before numbers existed still parses: number 0, no key."""
    from test_42_cluster_node import status

    etcd = Etcd(etcd_single.endpoints)
    try:
        lease = etcd.grant(10)
        etcd.put("/shardbroker/nodes/old", json.dumps(
            {"advertise": "10.0.0.9:7100", "workers": 1, "state": "up"}).encode(), lease)
        doc = status(capsys, etcd_single)
        assert [(n["node_id"], n["number"]) for n in doc["nodes"]] == [("old", 0)]
        assert read_view(etcd).nodes["old"].key == ""
        etcd.revoke(lease)
    finally:
        etcd.close()


def test_a_number_whose_write_failed_is_confirmed_not_claimed_again(
        etcd_single: EtcdCluster, tmp_path: Path) -> None:
    """The node claims before it writes the file: a write that fails (here: no directory)
    must not make every next round claim another number."""
    config = load_config(None, {"cluster.node_id": "n1", "cluster.etcd_endpoints": etcd_single.endpoints,
                                "cluster.advertise": bus_address(1)}).cluster
    data = tmp_path / "gone"
    node = ClusterNode(config, 1, lambda grant: True, data, Identity("n1", "P" * 40, "S" * 40),
                       clients="")
    try:
        for _ in range(3):  # three rounds that cannot write
            with pytest.raises(IdentityError, match="cannot write"):
                node._claim_number()
        data.mkdir()
        node._claim_number()
        assert node.number == 1 and node.member.info.number == 1
        assert load_identity(data) == Identity("n1", "P" * 40, "S" * 40, 1)
        assert numbers(node.etcd) == {1: "n1"}
    finally:
        node.etcd.close()
        node._lease_etcd.close()
