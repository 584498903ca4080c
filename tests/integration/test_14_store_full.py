"""14: a full message store: new QoS 1/2 work is refused, nothing acknowledged is lost,
and the broker accepts again once queues drain. (A full disk takes the same path: the
commit fails with ENOSPC instead of a full map.)"""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import CONFIG_STORE_1_MIB

CONFIG = CONFIG_STORE_1_MIB
PAYLOAD = 8192


@pytest.mark.slow
def test_full_store_refuses_then_recovers_and_loses_nothing(make_broker, mqtt, uniq):
    b = make_broker(workers=1, config=CONFIG)
    topic, scid = uniq.topic(), uniq.cid("s")
    sub = mqtt(b, scid, version=4, clean=False)
    sub.subscribe(topic, 1)
    sub.disconnect()

    pub = mqtt(b, uniq.cid("p"), version=5)
    acked: list[int] = []
    refused = None
    for i in range(400):
        body = i.to_bytes(4, "big") + bytes(PAYLOAD)
        ack = pub.publish(topic, body, qos=1, timeout=5)
        assert ack is not None
        if ack.reason == 0x97:
            refused = "0x97"
            break
        assert ack.reason == 0x00
        acked.append(i)
    assert refused is not None, "1 MiB store took 400 x 8 KiB messages"
    assert 20 < len(acked) < 128
    assert b.alive()
    assert "full" in b.log_text()

    # a 3.1.1 publisher cannot be refused: it is disconnected, never falsely acknowledged
    p4 = mqtt(b, uniq.cid("q"), version=4)
    p4.send(mb.publish(topic, b"x" * 100, qos=1, pid=1))
    closed = p4.expect_closed(5)
    assert closed and not any(p[0] == mb.PUBACK for p in p4.before_close)

    # every acknowledged message is there, in order, exactly once
    sub = mqtt(b, scid, version=4, clean=False)
    assert sub.connack.session_present is True
    got = [int.from_bytes(m.payload[:4], "big") for m in sub.recv_publishes(len(acked), timeout=20)]
    assert got == acked

    # drained: new QoS 1 work is accepted again
    deadline = time.monotonic() + 10
    while True:
        pub2 = mqtt(b, uniq.cid("r"), version=5)
        ack = pub2.publish(topic, b"again", qos=1)
        if ack.reason == 0x00 or time.monotonic() > deadline:
            break
        pub2.close()
        time.sleep(0.5)
    assert ack.reason == 0x00
    assert sub.recv_publish(10).payload == b"again"
