"""19: per-session queue limits and their policies, counted in $SYS."""

from __future__ import annotations

import pytest


def _fill_offline_queue(b, mqtt, uniq, n, payload=lambda i: f"m{i}".encode()):
    topic, scid = uniq.topic(), uniq.cid("s")
    sub = mqtt(b, scid, version=4, clean=False)
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = mqtt(b, uniq.cid("p"), version=4)
    for i in range(n):
        pub.publish(topic, payload(i), qos=1)
    return mqtt(b, scid, version=4, clean=False)


@pytest.mark.parametrize("policy, kept", [("drop_oldest", range(3, 8)), ("reject_new", range(5))])
def test_queue_length_limit_policy(make_broker, mqtt, uniq, policy, kept):
    b = make_broker(config=f'[limits]\nmax_queued_messages = 5\nqueue_full_policy = "{policy}"\n'
                           "[server]\nsys_interval = 0.3\n")
    sub = _fill_offline_queue(b, mqtt, uniq, 8)
    assert sub.connack.session_present is True
    got = [m.payload for m in sub.drain_publishes(0.5, first_timeout=5)]
    assert got == [f"m{i}".encode() for i in kept]
    watcher = mqtt(b, uniq.cid("w"), version=4)
    watcher.subscribe("$SYS/shardbroker/shard/0/dropped_queue_full", 0)
    assert int(watcher.recv_publish(3).payload) == 3


def test_queue_bytes_limit(make_broker, mqtt, uniq):
    b = make_broker(config="[limits]\nmax_queued_bytes = 100\n")
    sub = _fill_offline_queue(b, mqtt, uniq, 6, payload=lambda i: bytes([48 + i]) * 30)
    got = [m.payload[:1] for m in sub.drain_publishes(0.5, first_timeout=5)]
    assert got == [b"3", b"4", b"5"]  # 3 x 30 bytes fit in 100; the oldest were dropped
