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


# --------------------------------------------------------------------------- client limits

LIMITS = """
[limits]
max_client_id_length = 40
max_topic_levels = 4
max_topic_length = 24
max_subscriptions = 3
max_connection_rate = 20
"""


@pytest.fixture(scope="module")
def limited(make_module_broker):
    return make_module_broker(workers=2, config=LIMITS)


@pytest.mark.parametrize("version, code", [(4, 2), (5, 0x85)])
def test_a_client_id_too_long_is_refused(limited, mqtt, version, code):
    assert mqtt(limited, "x" * 41, version=version, expect_rc=None).connack.rc == code
    assert mqtt(limited, "y" * 40, version=version).connack.rc == 0


@pytest.mark.parametrize("version", [4, 5])
def test_topics_and_filters_with_too_many_levels(limited, mqtt, uniq, version):
    import mqttbytes as mb

    c = mqtt(limited, uniq.cid("l"), version=version)
    codes = c.subscribe([("a/b/c/d", 1), ("a/b/c/d/e", 1), ("a/+/+/#", 1)])
    assert codes == [1, 0x8F if version == 5 else 0x80, 1]
    c.publish("a/b/c/d", b"ok", qos=1)
    assert c.recv_publish().payload == b"ok"
    c.send(mb.publish("a/b/c/d/e", b"deep", qos=0, version=version))
    if version == 5:
        pkt = c.recv_packet(3)
        assert pkt is not None and pkt[0] == mb.DISCONNECT and pkt[2][:1] == b"\x90"
    with pytest.raises(mb.ConnectionClosed):
        c.recv_packet(3)


@pytest.mark.parametrize("version", [4, 5])
def test_topics_and_filters_too_long(limited, mqtt, uniq, version):
    import mqttbytes as mb

    c = mqtt(limited, uniq.cid("t"), version=version)
    assert c.subscribe([("x" * 24, 1), ("y" * 25, 1), ("é" * 12, 1), ("é" * 13, 1)]) == \
        [1, 0x8F if version == 5 else 0x80, 1, 0x8F if version == 5 else 0x80]  # bytes, not characters
    c.publish("x" * 24, b"ok", qos=1)
    assert c.recv_publish().payload == b"ok"
    c.send(mb.publish("z" * 25, b"long", qos=0, version=version))
    if version == 5:
        pkt = c.recv_packet(3)
        assert pkt is not None and pkt[0] == mb.DISCONNECT and pkt[2][:1] == b"\x90"
    with pytest.raises(mb.ConnectionClosed):
        c.recv_packet(3)


@pytest.mark.parametrize("version, code", [(4, 0x80), (5, 0x97)])
def test_subscriptions_per_session_are_capped(limited, mqtt, uniq, version, code):
    c = mqtt(limited, uniq.cid("s"), version=version)
    assert c.subscribe([("s/1", 0), ("s/2", 0), ("s/3", 0), ("s/4", 0), ("s/1", 1)]) == [0, 0, 0, code, 1]
    c.unsubscribe(["s/2"])  # (3.1.1 UNSUBACK has no codes)
    assert c.subscribe("s/4", 0) == [0]  # room again


def test_a_connection_storm_from_one_address_is_cut(limited, uniq):
    import socket
    import time

    import mqttbytes as mb

    time.sleep(1.02 - time.monotonic() % 1)  # at the start of a second of the broker's clock (the same clock)
    socks = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(40)]
    answered = 0
    for i, s in enumerate(socks):
        s.settimeout(3)
        try:
            s.sendall(mb.connect(f"{uniq.prefix('r')}{i}"))
            answered += s.recv(4)[:1] == b"\x20"
        except OSError:
            pass
        s.close()
    assert 15 <= answered <= 20  # 20 a second get in
    limited.wait_for_log("more than 20 new connections in a second", timeout=5)


@pytest.mark.parametrize("version", [4, 5])
def test_a_will_too_large_is_refused(make_broker, mqtt, uniq, version):
    import mqttbytes as mb

    b = make_broker(config="[limits]\nmax_will_size = 100\n")
    ok = mqtt(b, uniq.cid("ok"), version=version, will=mb.Will(uniq.topic(), b"w" * 100))
    assert ok.connack.rc == 0
    c = mb.RawClient(port=b.port)
    c.send(mb.connect(uniq.cid("big"), version=version, will=mb.Will(uniq.topic(), b"w" * 101)))
    if version == 5:
        assert c.expect(mb.CONNACK, 5)[2][1] == 0x95
    with pytest.raises(mb.ConnectionClosed):  # 3.1.1 has no code for it: closed
        c.recv_packet(3)


def test_a_publisher_over_its_rate_is_slowed_down(make_broker, mqtt, uniq):
    import time

    b = make_broker(config="[limits]\nmax_publish_rate = 100\n")
    sub = mqtt(b, uniq.cid("s"))
    topic = uniq.topic()
    sub.subscribe(topic, 0)
    pub = mqtt(b, uniq.cid("p"))
    t0 = time.monotonic()
    for i in range(300):  # QoS 1, one at a time: the acknowledgements come at the allowed rate
        pub.publish(topic, b"%d" % i, qos=1, timeout=10)
    took = time.monotonic() - t0
    assert took > 1.0, f"300 publishes at 100/s took {took:.2f} s"  # 100 per second of the clock: 3 seconds begun
    assert len(sub.drain_publishes(quiet=0.5, first_timeout=5)) == 300  # nothing lost
