"""``shardbroker store reshard`` against a real broker: 2 workers, stop, reshard to 3, start.

Persistent sessions on both old shards (chosen so that each moves to another shard
of 3) have queued QoS 1 messages, one has unacknowledged in-flight messages, and a
retained message is stored. After the offline reshard the broker starts with 3
workers on the same data directory; every session is present with its messages in
order (in-flight ones again, with DUP and the same packet ids), subscriptions still
route live messages, and the retained message is still there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mqttbytes as mb
import pytest
from conftest import REPO, client_id_on_shard, skip_unless_shardbroker, wait_until

from shardbroker.sharding import shard_for
from shardbroker.storage.lmdb_store import ShardStore, data_dir_shards

pytestmark = pytest.mark.slow

N_MSGS = 5


def _cid(prefix: str, old: int, new: int) -> str:
    for i in range(100_000):
        cid = f"{prefix}{i}"
        if shard_for(cid, 2) == old and shard_for(cid, 3) == new:
            return cid
    raise AssertionError("no such client id")


def _totals(data_dir: Path, shards: int) -> dict[str, int]:
    """Row counts over every shard, read-only (works while the broker runs)."""
    total: dict[str, int] = {}
    for i in range(shards):
        with ShardStore.open(data_dir, i, shards, readonly=True) as s:
            for k, v in s.counts().items():
                total[k] = total.get(k, 0) + v
    return total


def _reshard(data_dir: Path, workers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardbroker.cli.main", "store", "reshard", "--data-dir", str(data_dir),
         "--workers", str(workers), "--yes"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)


def _expiry(seconds: int) -> bytes:
    return mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, seconds)


def test_reshard_2_to_3_workers_keeps_sessions_and_retained(make_broker, mqtt, uniq):
    skip_unless_shardbroker()
    b = make_broker(workers=2)
    topic, rtopic = uniq.topic(), uniq.topic("retained")
    tag = uniq.prefix("rs")
    c4, c5, cin = _cid(tag + "a", 0, 2), _cid(tag + "b", 1, 0), _cid(tag + "c", 0, 1)
    pcid = _cid(tag + "p", 1, 1)  # publishes from shard 1: hand-overs to shard 0

    s = mqtt(b, c4, version=4, clean=False)
    s.subscribe(topic, 1)
    s.disconnect()
    s = mqtt(b, c5, version=5, clean=False, props=_expiry(3600))
    s.subscribe(topic, 2)
    s.disconnect()
    sin = mqtt(b, cin, version=4, clean=False)
    sin.subscribe(topic, 1)
    pub = mqtt(b, pcid, version=4)
    pub.publish(rtopic, b"retained survives", qos=1, retain=True)
    expected = [f"queued-{i}".encode() for i in range(N_MSGS)]
    for payload in expected:
        pub.publish(topic, payload, qos=1)  # PUBACKed: durable
    inflight = sin.recv_publishes(N_MSGS, ack=False)  # delivered, never acknowledged
    assert [m.payload for m in inflight] == expected
    sin.abort()
    pub.disconnect()

    # every hand-over acknowledged, every copy stored (2 queues + 1 inflight window)
    wait_until(lambda: (t := _totals(b.data_dir, 2))["outbox"] == 0
               and t["queued"] + t["inflight"] == 3 * N_MSGS and t["sessions"] == 3,
               timeout=10, message="stored queues and an empty outbox")

    running = _reshard(b.data_dir, 3)
    assert running.returncode == 2, running
    assert "running broker" in running.stderr and running.stderr.count("\n") == 1

    mqtt.close_all()
    assert b.stop() == 0, "SIGTERM shutdown must exit 0"

    done = _reshard(b.data_dir, 3)
    assert done.returncode == 0, done.stderr
    assert "resharded" in done.stdout and "3 sessions" in done.stdout
    assert "copied shard-001 (2/2)" in done.stderr
    assert data_dir_shards(b.data_dir) == 3
    old = sorted(b.data_dir.glob(".reshard-old-*"))
    assert len(old) == 1 and sorted(p.name for p in old[0].iterdir()) == ["shard-000", "shard-001"]
    for cid in (c4, c5, cin):
        with ShardStore.open(b.data_dir, shard_for(cid, 3), 3, readonly=True) as st:
            assert st.session(cid) is not None, cid

    b.workers = 3
    b.start()

    r4 = mqtt(b, c4, version=4, clean=False)
    assert r4.connack.session_present is True
    assert [m.payload for m in r4.recv_publishes(N_MSGS, timeout=10)] == expected
    r5 = mqtt(b, c5, version=5, clean=False, props=_expiry(3600))
    assert r5.connack.session_present is True
    assert [m.payload for m in r5.recv_publishes(N_MSGS, timeout=10)] == expected
    rin = mqtt(b, cin, version=4, clean=False)
    assert rin.connack.session_present is True
    again = rin.recv_publishes(N_MSGS, timeout=10)
    assert [m.payload for m in again] == expected
    assert [m.pid for m in again] == [m.pid for m in inflight]
    assert all(m.dup for m in again), "re-sent in-flight messages must have DUP=1"

    # the subscriptions still route live messages, from every shard
    for shard in range(3):
        p = mqtt(b, client_id_on_shard(tag + f"q{shard}x", shard, 3), version=4)
        p.publish(topic, f"live-{shard}".encode(), qos=1)
        for c in (r4, r5, rin):
            assert c.recv_publish(10).payload == f"live-{shard}".encode()

    r = mqtt(b, uniq.cid("ret"), version=4)
    r.subscribe(rtopic, 1)
    msg = r.recv_publish(10)
    assert (msg.payload, msg.retain) == (b"retained survives", True)
