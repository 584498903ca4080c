"""CONNECT / CONNACK, keepalive, PINGREQ and connection-level protocol rules."""

from __future__ import annotations

import time

import mqttbytes as mb
import pytest
from conftest import (
    CONFIG_CONNECT_TIMEOUT_1,
    TARGET,
    assert_disconnected,
    skip_unless_shardbroker,
)

# -- CONNACK per protocol version ------------------------------------------------


def test_connect_v31_mqisdp(broker, mqtt, uniq):
    c = mqtt.raw(broker)
    c.send(mb.connect(uniq.cid("v31"), version=3))
    _ptype, flags, body = c.expect(mb.CONNACK)
    assert flags == 0
    assert body == b"\x00\x00"  # accepted; 3.1 has no session present flag in use
    c.ping()


def test_connect_v311_exact_connack(broker, mqtt, uniq):
    c = mqtt.raw(broker)
    c.send(mb.connect(uniq.cid("v311"), version=4))
    assert c.recv_packet(5) == (mb.CONNACK, 0, b"\x00\x00")
    c.ping()


def test_connect_v5_connack(broker, mqtt, uniq):
    c = mqtt.raw(broker)
    ack = c.connect_mqtt(uniq.cid("v5"), version=5)
    assert ack.rc == 0
    assert ack.session_present is False
    # DESIGN: every MQTT 5 feature. Absent means "available" / QoS 2.
    assert mb.MAXIMUM_QOS not in ack.props, "Maximum QoS present means QoS 2 is not supported"
    assert ack.props.get(mb.RETAIN_AVAILABLE, 1) == 1
    assert ack.props.get(mb.WILDCARD_SUBSCRIPTION_AVAILABLE, 1) == 1
    assert ack.props.get(mb.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 1) == 1
    assert ack.props.get(mb.SHARED_SUBSCRIPTION_AVAILABLE, 1) == 1
    assert mb.ASSIGNED_CLIENT_IDENTIFIER not in ack.props  # we sent an id
    c.ping()


def test_connect_v5_advertises_its_receive_maximum(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("rm"), version=5)
    expected = 100 if TARGET == "shardbroker" else 20  # the defaults: ShardBroker's, Mosquitto's
    assert c.connack.props.get(mb.RECEIVE_MAXIMUM) == expected


@pytest.mark.parametrize("version", [4, 5])
def test_connect_with_username_password(broker, mqtt, uniq, version):
    c = mqtt(broker, uniq.cid("up"), version=version, username="alice", password=b"secret")
    c.ping()


# -- client identifiers ------------------------------------------------------------


def test_v311_empty_client_id_clean_session_accepted(broker, mqtt):
    c = mqtt.raw(broker)
    c.send(mb.connect("", version=4, clean=True))
    assert c.recv_packet(5) == (mb.CONNACK, 0, b"\x00\x00")
    c.ping()


def test_v311_empty_client_id_persistent_rejected(broker, mqtt):
    c = mqtt.raw(broker)
    c.send(mb.connect("", version=4, clean=False))
    assert c.recv_packet(5) == (mb.CONNACK, 0, b"\x00\x02")  # identifier rejected
    assert c.expect_closed(3), "server must close after a refused CONNACK [MQTT-3.2.2-5]"


def test_v5_empty_client_id_gets_assigned_identifier(broker, mqtt):
    ids = []
    for _ in range(2):
        c = mqtt(broker, "", version=5)
        assigned = c.connack.props.get(mb.ASSIGNED_CLIENT_IDENTIFIER)
        assert isinstance(assigned, str) and assigned, f"no Assigned Client Identifier: {c.connack}"
        ids.append(assigned)
        c.ping()
    assert ids[0] != ids[1]


def test_v5_assigned_identifier_is_usable(broker, mqtt, uniq):
    c = mqtt(broker, "", version=5)
    topic = uniq.topic()
    assert c.subscribe(topic, 1) == [1]
    c.publish(topic, b"self", qos=1)
    assert c.recv_publish().payload == b"self"


# -- unsupported protocol -----------------------------------------------------------


@pytest.mark.parametrize("level", [2, 6, 0x7F])
def test_unsupported_protocol_level(broker, mqtt, uniq, level):
    c = mqtt.raw(broker)
    c.send(mb.connect(uniq.cid("lvl"), version=level, protocol_name="MQTT"))
    pkt = c.recv_packet(5)
    if pkt is not None:  # a CONNACK is expected; either 3.1.1 or 5.0 form
        ptype, _flags, body = pkt
        assert ptype == mb.CONNACK, mb.describe(pkt)
        assert body == b"\x00\x01" or (len(body) >= 2 and body[1] == 0x84), (
            f"expected CONNACK rc 1 (3.1.1) or 0x84 (5.0), got {body!r}")
    else:
        pytest.fail("no CONNACK for an unsupported protocol level")
    assert c.expect_closed(3)


@pytest.mark.parametrize("level, expected", [(5, b"\x00\x84\x00"), (4, b"\x00\x01")])
def test_unknown_protocol_name_answered_in_the_form_the_client_reads(broker, mqtt, uniq, level, expected):
    """A bad protocol name with level 5 gets a 5.0 CONNACK 0x84; with level 4 the 3.1.1 rc 1."""
    c = mqtt.raw(broker)
    c.send(mb.connect(uniq.cid("hj"), version=level, protocol_name="hj"))
    pkt = c.recv_packet(5)
    assert pkt is not None and pkt[0] == mb.CONNACK
    assert pkt[2] == expected
    assert c.expect_closed(3)


# -- packet order rules ---------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_second_connect_is_protocol_error(broker, mqtt, uniq, version):
    cid = uniq.cid("two")
    c = mqtt(broker, cid, version=version)
    c.send(mb.connect(cid, version=version))
    assert_disconnected(c, version, {mb.RC_PROTOCOL_ERROR})


@pytest.mark.parametrize("first", ["pingreq", "publish", "subscribe", "disconnect"])
def test_first_packet_not_connect_closes(broker, mqtt, first):
    c = mqtt.raw(broker)
    data = {
        "pingreq": mb.pingreq(),
        "publish": mb.publish("a/b", b"x"),
        "subscribe": mb.subscribe(1, [("a/b", 0)]),
        "disconnect": mb.disconnect(4),
    }[first]
    c.send(data)
    assert c.expect_closed(3), "server kept a connection whose first packet is not CONNECT"
    assert c.before_close == [], f"server answered: {[mb.describe(p) for p in c.before_close]}"


def test_garbage_instead_of_connect_closes(broker, mqtt):
    c = mqtt.raw(broker)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.expect_closed(3)


# -- connect deadline -------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_connect_broker(make_module_broker):
    if TARGET != "shardbroker":
        pytest.skip("connect_timeout is a ShardBroker setting")
    return make_module_broker(workers=1, config=CONFIG_CONNECT_TIMEOUT_1, name="broker-ct1")


def test_connect_timeout_silent_socket(short_connect_broker, mqtt):
    c = mqtt.raw(short_connect_broker)
    t0 = time.monotonic()
    assert c.expect_closed(4), "no CONNECT within connect_timeout=1 must close the socket"
    assert 0.5 <= time.monotonic() - t0 <= 3.5


def test_connect_timeout_partial_connect(short_connect_broker, mqtt):
    c = mqtt.raw(short_connect_broker)
    c.send(mb.connect("partial", version=4)[:6])  # header and part of the protocol name
    t0 = time.monotonic()
    assert c.expect_closed(4), "a half-sent CONNECT must not hold the connection open"
    assert time.monotonic() - t0 <= 3.5


def test_connect_timeout_does_not_affect_connected_clients(short_connect_broker, mqtt, uniq):
    c = mqtt(short_connect_broker, uniq.cid("ok"), version=4, keepalive=0)
    time.sleep(1.6)
    c.ping()


# -- PINGREQ and keepalive ----------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4, 5])
def test_pingreq_pingresp(broker, mqtt, uniq, version):
    c = mqtt(broker, uniq.cid("ping"), version=version)
    for _ in range(3):
        c.send(mb.pingreq())
        assert c.recv_packet(5) == (mb.PINGRESP, 0, b"")


@pytest.mark.slow
@pytest.mark.parametrize("version", [4, 5])
def test_keepalive_timeout_closes_and_publishes_will(broker, mqtt, uniq, version):
    will_topic = uniq.topic("will")
    sub = mqtt(broker, uniq.cid("sub"), version=version)
    sub.subscribe(will_topic, 1)
    c = mqtt(broker, uniq.cid("ka"), version=version, keepalive=1,
             will=mb.Will(will_topic, b"gone silent", qos=1))
    t0 = time.monotonic()
    assert c.expect_closed(4), "client silent for > 1.5 x keepalive was not disconnected"
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed <= 3.5, f"closed after {elapsed:.2f}s; keepalive 1 allows 1.5 s"
    if version == 5:
        discs = [p for p in c.before_close if p[0] == mb.DISCONNECT]
        if discs:
            assert mb.parse_disconnect(discs[0][2]).reason == mb.RC_KEEP_ALIVE_TIMEOUT
    msg = sub.recv_publish(3)
    assert (msg.topic, msg.payload) == (will_topic, b"gone silent")


@pytest.mark.slow
def test_keepalive_kept_by_pings(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("kp"), version=4, keepalive=1)
    t_end = time.monotonic() + 2.6
    while time.monotonic() < t_end:
        c.ping()
        time.sleep(0.4)
    c.ping()


@pytest.mark.slow
def test_keepalive_kept_by_other_traffic(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("kt"), version=4, keepalive=1)
    topic = uniq.topic()
    t_end = time.monotonic() + 2.6
    while time.monotonic() < t_end:
        c.publish(topic, b"x", qos=0)
        time.sleep(0.4)
    c.ping()


def test_disconnect_closes_connection(broker, mqtt, uniq):
    c = mqtt(broker, uniq.cid("dc"), version=4)
    c.send(mb.disconnect(4))
    assert c.expect_closed(3), "server must close the connection after DISCONNECT"
    assert c.before_close == []


def test_many_clients_connect(broker, mqtt, uniq):
    clients = [mqtt(broker, uniq.cid("many"), version=4 + (i % 2)) for i in range(30)]
    for c in clients:
        c.ping()


def test_broker_logs_listening_line(broker):
    skip_unless_shardbroker()
    assert f"listening on 127.0.0.1:{broker.port}" in broker.log_text()
