"""17: $SYS statistics: each shard publishes its counters; '#' does not see them."""

from __future__ import annotations

import time

from conftest import assert_no_publish


def test_shards_publish_their_counters(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config="[server]\nsys_interval = 0.5\n")
    sys_sub = mqtt(b, uniq.cid("s"), version=4)
    sys_sub.subscribe("$SYS/shardbroker/shard/+/received", 0)
    everything = mqtt(b, uniq.cid("e"), version=4)
    everything.subscribe("#", 0)
    pub = mqtt(b, uniq.cid("p"), version=4)
    for i in range(3):
        pub.publish(uniq.topic(), b"x", qos=1)
    assert len(everything.drain_publishes(1.0)) == 3  # the three messages, no $SYS
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        m = sys_sub.recv_publish(3)
        seen[m.topic] = int(m.payload)
    assert set(seen) == {"$SYS/shardbroker/shard/0/received", "$SYS/shardbroker/shard/1/received"}
    # every publish was received by exactly one shard: the counters add up (later ones only grow)
    while sum(seen.values()) < 3 and time.monotonic() < deadline:
        m = sys_sub.recv_publish(3)
        seen[m.topic] = int(m.payload)
    assert sum(seen.values()) == 3
    assert_no_publish(everything, 0.8)
