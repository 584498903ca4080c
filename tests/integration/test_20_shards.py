"""Sharding: routing between worker processes, worker crashes, ordered shutdown.

Client ids are chosen with ``shard_for`` so that each client lands on a known shard.
"""

from __future__ import annotations

import os
import signal
import time

import mqttbytes as mb
import pytest
from conftest import (
    assert_disconnected,
    assert_no_publish,
    client_id_on_shard,
    pid_alive,
    shard_of,
    skip_unless_shardbroker,
    wait_until,
)


def _on(b, uniq, shard, tag="c"):
    return client_id_on_shard(uniq.prefix(tag), shard, b.workers)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cross_shard_pubsub(broker4, mqtt, uniq, qos, version):
    topic = uniq.topic()
    sub = mqtt(broker4, _on(broker4, uniq, 1, "s"), version=version)
    assert sub.subscribe(topic, qos) == [qos]
    pub = mqtt(broker4, _on(broker4, uniq, 2, "p"), version=version)
    ack = pub.publish(topic, f"cross-{qos}".encode(), qos=qos)
    if qos:
        assert ack is not None and ack.reason == 0
    msg = sub.recv_publish()
    assert (msg.topic, msg.payload, msg.qos) == (topic, f"cross-{qos}".encode(), qos)
    assert_no_publish(sub, 0.2)


def test_subscribe_is_effective_when_suback_sent(broker4, mqtt, uniq):
    """Every (subscriber shard, publisher shard) pair: publish right after SUBACK."""
    pubs = {s: mqtt(broker4, _on(broker4, uniq, s, "p"), version=4) for s in range(broker4.workers)}
    subs = {s: mqtt(broker4, _on(broker4, uniq, s, "s"), version=5) for s in range(broker4.workers)}
    for ss, sub in subs.items():
        for ps, pub in pubs.items():
            topic = uniq.topic(f"{ss}-{ps}")
            sub.subscribe(topic, 1)
            pub.publish(topic, f"{ss}<-{ps}".encode(), qos=1)  # immediately after SUBACK
            msg = sub.recv_publish(5)
            assert msg.payload == f"{ss}<-{ps}".encode(), f"sub on shard {ss}, pub on {ps}"


def test_fanout_to_every_shard_exactly_once(broker4, mqtt, uniq):
    topic = uniq.topic()
    subs = []
    for s in range(broker4.workers):
        for k in range(2):  # two subscribers per shard
            c = mqtt(broker4, _on(broker4, uniq, s, f"s{k}"), version=4 + k)
            c.subscribe(topic, 1)
            subs.append(c)
    pub = mqtt(broker4, _on(broker4, uniq, 0, "p"), version=4)
    pub.publish(topic, b"everyone", qos=1)
    for c in subs:
        assert c.recv_publish().payload == b"everyone"
    for c in subs:
        assert_no_publish(c, 0.1)


def test_wildcard_subscriber_gets_publishes_from_all_shards(broker4, mqtt, uniq):
    base = uniq.topic()
    sub = mqtt(broker4, _on(broker4, uniq, 1, "s"), version=5)
    sub.subscribe(base + "/#", 1)
    for s in range(broker4.workers):
        pub = mqtt(broker4, _on(broker4, uniq, s, "p"), version=4)
        pub.publish(f"{base}/from/{s}", str(s).encode(), qos=1)
    got = sorted(int(m.payload) for m in sub.recv_publishes(broker4.workers))
    assert got == list(range(broker4.workers))


@pytest.mark.parametrize("qos", [1, 2])
def test_ordering_across_shards(broker4, mqtt, uniq, qos):
    topic = uniq.topic()
    sub = mqtt(broker4, _on(broker4, uniq, 3, "s"), version=4)
    sub.subscribe(topic, qos)
    pub = mqtt(broker4, _on(broker4, uniq, 0, "p"), version=4)
    n = 100
    if qos == 1:
        pub.send(b"".join(mb.publish(topic, str(i).encode(), qos=1, pid=i + 1) for i in range(n)))
        for i in range(n):
            pub.expect(mb.PUBACK, 10)
    else:
        for i in range(n):
            pub.publish(topic, str(i).encode(), qos=2)
    assert [int(m.payload) for m in sub.recv_publishes(n, timeout=20)] == list(range(n))


def test_retained_visible_from_every_shard(broker4, mqtt, uniq):
    topic = uniq.topic()
    pub = mqtt(broker4, _on(broker4, uniq, 0, "p"), version=4)
    pub.publish(topic, b"shared store", qos=1, retain=True)
    for s in range(broker4.workers):
        sub = mqtt(broker4, _on(broker4, uniq, s, "s"), version=4)
        sub.subscribe(topic, 1)
        msg = sub.recv_publish()
        assert (msg.payload, msg.retain) == (b"shared store", True), f"shard {s}"


def test_offline_queue_filled_from_other_shards(broker4, mqtt, uniq):
    topic, cid = uniq.topic(), _on(broker4, uniq, 2, "q")
    c = mqtt(broker4, cid, version=4, clean=False)
    c.subscribe(topic, 1)
    c.disconnect()
    for s in (0, 1, 3):
        pub = mqtt(broker4, _on(broker4, uniq, s, "p"), version=4)
        pub.publish(topic, str(s).encode(), qos=1)
    c2 = mqtt(broker4, cid, version=4, clean=False)
    assert c2.connack.session_present is True
    assert [m.payload for m in c2.recv_publishes(3)] == [b"0", b"1", b"3"]


def test_takeover_same_client_id(broker4, mqtt, uniq):
    cid = _on(broker4, uniq, 3, "t")
    a = mqtt(broker4, cid, version=5)
    b = mqtt(broker4, cid, version=5)
    assert_disconnected(a, 5, {mb.RC_SESSION_TAKEN_OVER})
    b.ping()


def test_worker_processes_visible(broker4):
    skip_unless_shardbroker()
    workers = broker4.worker_pids()
    assert sorted(workers) == list(range(broker4.workers)), (
        f"expected worker processes 0..{broker4.workers - 1} (cmdline matching "
        f"'worker[^0-9]*(\\d+)'), found {workers}; children: {broker4.descendant_pids()}")


# -- worker crash ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_worker_others_keep_working_and_shard_recovers(make_broker, mqtt, uniq):
    skip_unless_shardbroker()
    b = make_broker(workers=4)
    workers = wait_until(lambda: len(b.worker_pids()) == 4 and b.worker_pids(), 10,
                         message="4 worker processes")
    victim = 2
    live_topic, victim_topic = uniq.topic("live"), uniq.topic("victim")
    # a persistent session on the victim shard, subscribed
    vcid = _on(b, uniq, victim, "v")
    v = mqtt(b, vcid, version=4, clean=False)
    v.subscribe(victim_topic, 1)
    # clients on other shards
    sub = mqtt(b, _on(b, uniq, 1, "s"), version=5)
    sub.subscribe(live_topic, 1)
    pub = mqtt(b, _on(b, uniq, 3, "p"), version=5)
    pub.publish(live_topic, b"before", qos=1)
    assert sub.recv_publish().payload == b"before"

    os.kill(workers[victim], signal.SIGKILL)
    assert v.expect_closed(5), "client of the killed worker still connected"

    # other shards carry on, immediately
    for i in range(5):
        pub.publish(live_topic, f"during-{i}".encode(), qos=1)
    assert [m.payload for m in sub.recv_publishes(5)] == [f"during-{i}".encode() for i in range(5)]
    sub.ping()
    pub.ping()
    # a message for the victim's session, accepted while its shard is down
    ack = pub.publish(victim_topic, b"while down", qos=1, timeout=10)
    assert ack is not None and ack.reason in (0x00, 0x10)

    # the shard comes back: its client can reconnect within ~10 s
    def reconnect():
        try:
            c = mqtt.raw(b)
            ack = c.connect_mqtt(vcid, version=4, clean=False, timeout=2)
            if ack.rc == 0:
                return c, ack
            c.close()
        except (OSError, AssertionError, mb.ConnectionClosed):
            pass
        time.sleep(0.2)
        return None

    v2, ack = wait_until(reconnect, 10, interval=0, message="reconnect to the restarted shard")
    assert ack.session_present is True, "session lost with the worker"
    assert v2.recv_publish(10).payload == b"while down", "acknowledged message lost"
    new_workers = b.worker_pids()
    assert victim in new_workers and new_workers[victim] != workers[victim]
    for s in (0, 1, 3):
        assert new_workers.get(s) == workers[s], "only the dead worker should be restarted"
    assert b.alive()
    # and the restarted shard routes both ways again
    pub.publish(victim_topic, b"after", qos=1)
    assert v2.recv_publish().payload == b"after"
    v2.publish(live_topic, b"from revived shard", qos=1)
    assert sub.recv_publish().payload == b"from revived shard"


# -- shutdown ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_shutdown(make_broker, mqtt, uniq):
    b = make_broker(workers=4)
    children = b.descendant_pids()
    v5 = [mqtt(b, _on(b, uniq, s, "f"), version=5) for s in range(b.workers)]
    v4 = [mqtt(b, _on(b, uniq, s, "g"), version=4) for s in range(b.workers)]
    t0 = time.monotonic()
    os.kill(b.pid, signal.SIGTERM)
    for c in v5:
        assert_disconnected(c, 5, {mb.RC_SERVER_SHUTTING_DOWN}, timeout=10)
    for c in v4:
        assert c.expect_closed(10)
    code = b.proc.wait(10)
    assert code == 0, f"broker exited with {code} on SIGTERM"
    assert time.monotonic() - t0 <= 10.5
    def leftovers():
        return [p for p in children if pid_alive(p)]

    deadline = time.monotonic() + 3
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == [], f"child processes left running after shutdown: {leftovers()}"


@pytest.mark.slow
def test_acknowledged_cross_shard_messages_survive_immediate_kill9(make_broker, mqtt, uniq):
    """DESIGN guarantee 1: a PUBACKed QoS 1 message for a persistent session on another
    shard is durable (directly or through a durable outbox) before the PUBACK. kill -9
    right after the last PUBACKs, then every message must be there after restart.
    (A loss shows up as the last message(s) missing; the window is short, so each
    publisher/subscriber pair below is one more chance to catch it.)"""
    b = make_broker(workers=4)
    n, count = b.workers, 10
    pairs = []
    for s in range(n):
        topic = uniq.topic(f"k{s}")
        scid = _on(b, uniq, (s + 1) % n, "s")
        c = mqtt(b, scid, version=4, clean=False)
        c.subscribe(topic, 1)
        c.disconnect()
        pairs.append((topic, scid, mqtt(b, _on(b, uniq, s, "p"), version=4)))
    for topic, _, pub in pairs:
        pub.send(b"".join(mb.publish(topic, str(i).encode(), qos=1, pid=i + 1)
                          for i in range(count - 1)))
    for _, _, pub in pairs:
        for _ in range(count - 1):
            pub.expect(mb.PUBACK, 10)
    for topic, _, pub in pairs:  # the last message of every pair, back to back
        pub.send(mb.publish(topic, str(count - 1).encode(), qos=1, pid=count))
    for _, _, pub in pairs:
        assert mb.parse_ack(pub.expect(mb.PUBACK, 10)[2]).pid == count
    b.kill9()
    mqtt.close_all()
    b.start()
    lost = {}
    for topic, scid, _ in pairs:
        c = mqtt(b, scid, version=4, clean=False)
        assert c.connack.session_present is True
        got = [int(m.payload) for m in c.drain_publishes(0.5, first_timeout=10)]
        if got != list(range(count)):
            lost[f"{scid} (shard {shard_of(scid, n)})"] = got
    assert not lost, f"acknowledged messages lost by kill -9 (received instead): {lost}"


@pytest.mark.slow
def test_restarted_shard_without_a_peers_routes_still_delivers_durably(make_broker, mqtt, uniq):
    """A worker that restarts while a peer cannot answer serves without that peer's routes;
    QoS 1/2 it acknowledges meanwhile must still reach the peer's persistent subscribers."""
    skip_unless_shardbroker()
    b = make_broker(workers=2)
    workers = wait_until(lambda: len(b.worker_pids()) == 2 and b.worker_pids(), 10, message="2 workers")
    topic = uniq.topic()
    sub = mqtt(b, _on(b, uniq, 1, "s"), version=4, clean=False)
    sub.subscribe(topic, 1)
    os.kill(workers[1], signal.SIGSTOP)  # the peer cannot answer the route sync
    try:
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.5)

        def publish_on_restarted_shard():
            try:
                c = mqtt.raw(b)
                if c.connect_mqtt(_on(b, uniq, 0, "p"), version=4, timeout=2).rc == 0:
                    return c
                c.close()
            except (OSError, AssertionError, mb.ConnectionClosed):
                pass
            time.sleep(0.2)
            return None

        pub = wait_until(publish_on_restarted_shard, 15, interval=0, message="restarted shard 0")
        ack = pub.publish(topic, b"acked while the peer was unknown", qos=1, timeout=5)
        assert ack is not None
    finally:
        os.kill(workers[1], signal.SIGCONT)
    assert sub.recv_publish(10).payload == b"acked while the peer was unknown"
