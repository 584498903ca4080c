"""QoS 1 and QoS 2 flows in both directions, byte for byte."""

from __future__ import annotations

import mqttbytes as mb
import pytest
from conftest import assert_no_publish


def _pair(broker, mqtt, uniq, sub_qos=2, version=4, sub_version=None):
    topic = uniq.topic()
    sub = mqtt(broker, uniq.cid("s"), version=sub_version or version)
    sub.subscribe(topic, sub_qos)
    pub = mqtt(broker, uniq.cid("p"), version=version)
    return topic, sub, pub


# -- client -> broker ---------------------------------------------------------------------


def test_qos1_puback_exact_v311(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.send(mb.publish(topic, b"one", qos=1, pid=42))
    assert pub.recv_packet(5) == (mb.PUBACK, 0, b"\x00\x2a")
    msg = sub.recv_publish()
    assert (msg.payload, msg.qos) == (b"one", 1)


def test_qos1_puback_v5_success(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, version=5)
    pub.send(mb.publish(topic, b"one", qos=1, pid=0x0102, version=5))
    _ptype, flags, body = pub.expect(mb.PUBACK)
    assert flags == 0
    ack = mb.parse_ack(body, 5)
    assert (ack.pid, ack.reason) == (0x0102, mb.RC_SUCCESS)
    assert sub.recv_publish().payload == b"one"


def test_qos1_puback_v5_no_subscribers(broker, mqtt, uniq):
    pub = mqtt(broker, uniq.cid("p"), version=5)
    pub.send(mb.publish(uniq.topic("nobody"), b"x", qos=1, pid=3, version=5))
    ack = mb.parse_ack(pub.expect(mb.PUBACK)[2], 5)
    assert ack.pid == 3
    assert ack.reason in (mb.RC_SUCCESS, mb.RC_NO_MATCHING_SUBSCRIBERS)


def test_qos2_flow_exact_v311(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.send(mb.publish(topic, b"two", qos=2, pid=7))
    assert pub.recv_packet(5) == (mb.PUBREC, 0, b"\x00\x07")
    pub.send(mb.pubrel(7))
    assert pub.recv_packet(5) == (mb.PUBCOMP, 0, b"\x00\x07")
    msg = sub.recv_publish()
    assert (msg.payload, msg.qos) == (b"two", 2)
    assert_no_publish(sub, 0.3)


def test_qos2_flow_v5(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, version=5)
    pub.send(mb.publish(topic, b"two", qos=2, pid=9, version=5))
    rec = mb.parse_ack(pub.expect(mb.PUBREC)[2], 5)
    assert (rec.pid, rec.reason) == (9, 0)
    pub.send(mb.pubrel(9, 5))
    _ptype, flags, body = pub.expect(mb.PUBCOMP)
    comp = mb.parse_ack(body, 5)
    assert (flags, comp.pid, comp.reason) == (0, 9, 0)
    assert sub.recv_publish().payload == b"two"


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_duplicate_publish_before_pubrel_delivered_once(broker, mqtt, uniq, version):
    topic, sub, pub = _pair(broker, mqtt, uniq, version=version)
    pub.send(mb.publish(topic, b"exactly-once", qos=2, pid=11, version=version))
    assert mb.parse_ack(pub.expect(mb.PUBREC)[2], version).pid == 11
    # Re-send with DUP=1 (as after a lost PUBREC): PUBREC again, no second delivery.
    pub.send(mb.publish(topic, b"exactly-once", qos=2, pid=11, dup=True, version=version))
    assert mb.parse_ack(pub.expect(mb.PUBREC)[2], version).pid == 11
    pub.send(mb.pubrel(11, version))
    assert mb.parse_ack(pub.expect(mb.PUBCOMP)[2], version).pid == 11
    assert sub.recv_publish().payload == b"exactly-once"
    assert_no_publish(sub, 0.4)


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_pid_reusable_after_pubcomp(broker, mqtt, uniq, version):
    topic, sub, pub = _pair(broker, mqtt, uniq, version=version)
    for payload in (b"first", b"second"):
        pub.publish(topic, payload, qos=2, pid=5)
    assert [m.payload for m in sub.recv_publishes(2)] == [b"first", b"second"]


def test_qos2_pubrel_resent_gets_pubcomp_again(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.send(mb.publish(topic, b"rel twice", qos=2, pid=21))
    pub.expect(mb.PUBREC)
    pub.send(mb.pubrel(21))
    assert pub.recv_packet(5) == (mb.PUBCOMP, 0, b"\x00\x15")
    pub.send(mb.pubrel(21))  # a PUBREL for a finished flow still gets PUBCOMP
    assert pub.recv_packet(5)[:2] == (mb.PUBCOMP, 0)
    assert sub.recv_publish().payload == b"rel twice"
    assert_no_publish(sub, 0.3)


def test_v5_pubrel_unknown_pid_gets_pubcomp_0x92(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("c"), version=5)
    c.send(mb.pubrel(4321, 5))
    comp = mb.parse_ack(c.expect(mb.PUBCOMP)[2], 5)
    assert comp.pid == 4321
    assert comp.reason == mb.RC_PACKET_IDENTIFIER_NOT_FOUND


def test_qos1_pid_reused_after_puback_is_a_new_message(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pub.publish(topic, b"a", qos=1, pid=1)
    pub.publish(topic, b"b", qos=1, pid=1)
    assert [m.payload for m in sub.recv_publishes(2)] == [b"a", b"b"]


@pytest.mark.parametrize("qos, ack_type", [(1, mb.PUBACK), (2, mb.PUBREC)])
def test_acks_in_publish_order(broker, mqtt, uniq, qos, ack_type):
    topic, sub, pub = _pair(broker, mqtt, uniq)
    pids = [50 - i for i in range(15)]  # not sorted: order must follow receipt, not value
    pub.send(b"".join(mb.publish(topic, str(p).encode(), qos=qos, pid=p) for p in pids))
    got = [mb.parse_ack(pub.expect(ack_type)[2]).pid for _ in pids]
    assert got == pids
    if qos == 2:
        pub.send(b"".join(mb.pubrel(p) for p in pids))
        assert [mb.parse_ack(pub.expect(mb.PUBCOMP)[2]).pid for _ in pids] == pids
    assert [int(m.payload) for m in sub.recv_publishes(len(pids))] == pids


# -- broker -> client ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_broker_to_client_qos1(broker, mqtt, uniq, version):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=1, version=4, sub_version=version)
    pub.publish(topic, b"deliver", qos=1)
    _ptype, flags, body = sub.expect(mb.PUBLISH)
    assert flags == 0b0010  # QoS 1, DUP 0, RETAIN 0
    msg = mb.parse_publish(flags, body, version)
    assert msg.pid and msg.pid != 0
    sub.send(mb.puback(msg.pid, version))
    sub.ping()
    assert_no_publish(sub, 0.4)  # acknowledged: never re-sent on this connection


@pytest.mark.parametrize("version", [4, 5])
def test_broker_to_client_qos2(broker, mqtt, uniq, version):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=2, version=4, sub_version=version)
    pub.publish(topic, b"deliver2", qos=2)
    _ptype, flags, body = sub.expect(mb.PUBLISH)
    assert flags == 0b0100  # QoS 2
    msg = mb.parse_publish(flags, body, version)
    sub.send(mb.pubrec(msg.pid, version))
    _ptype, flags, body = sub.expect(mb.PUBREL)
    assert flags == 0b0010, "PUBREL fixed header flags must be 0010 [MQTT-3.6.1-1]"
    rel = mb.parse_ack(body, version)
    assert (rel.pid, rel.reason) == (msg.pid, 0)
    if version == 4:
        assert body == mb.u16(msg.pid)
    sub.send(mb.pubcomp(msg.pid, version))
    sub.ping()
    assert_no_publish(sub, 0.4)


def test_broker_to_client_qos2_pubrec_error_ends_flow_v5(broker, mqtt, uniq):
    """A 5.0 PUBREC with a reason >= 0x80 ends the flow: no PUBREL follows."""
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=2, version=4, sub_version=5)
    pub.publish(topic, b"refused", qos=2)
    msg = sub.recv_publish(ack=False)
    sub.send(mb.pubrec(msg.pid, 5, reason=0x80))
    sub.ping()
    assert_no_publish(sub, 0.4)
    pub.publish(topic, b"next", qos=2)
    assert sub.recv_publish().payload == b"next"


def test_delivery_pids_unique_while_unacknowledged(broker, mqtt, uniq):
    topic, sub, pub = _pair(broker, mqtt, uniq, sub_qos=1)
    for i in range(10):
        pub.publish(topic, str(i).encode(), qos=1)
    msgs = sub.recv_publishes(10, ack=False)
    pids = [m.pid for m in msgs]
    assert 0 not in pids and len(set(pids)) == 10, pids
    assert [int(m.payload) for m in msgs] == list(range(10))
    for p in pids:
        sub.send(mb.puback(p))
    sub.ping()
    assert_no_publish(sub, 0.3)


def test_slow_consumer_does_not_block_others(broker, mqtt, uniq):
    topic = uniq.topic()
    slow = mqtt(broker, uniq.cid("slow"), version=4)
    slow.subscribe(topic, 1)
    fast = mqtt(broker, uniq.cid("fast"), version=4)
    fast.subscribe(topic, 1)
    pub = mqtt(broker, uniq.cid("p"), version=4)
    for i in range(40):
        pub.publish(topic, str(i).encode(), qos=1)
    # ``slow`` never acknowledges; ``fast`` still gets everything, in order.
    assert [int(m.payload) for m in fast.recv_publishes(40, timeout=10)] == list(range(40))
