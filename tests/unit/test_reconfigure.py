"""``Broker.reconfigure`` (a reload): live settings reach every part that reads them, connected
clients included, and what a client agreed at CONNECT stays for its connection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.config import load_config
from shardbroker.protocol import reasons
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def _reload(h: Harness, **settings: object) -> None:
    h.broker.reconfigure(load_config(None, {"server.data_dir": str(h.data_dir), **settings}))


def test_topic_limits_apply_to_connected_clients_at_once(h: Harness) -> None:
    c = h.connect("a", MQTT_5)
    c.packets()
    topic = "x/" + "y" * 40
    c.send(Publish(topic, b"1", qos=1, packet_id=1))
    assert [p.reason_code < 0x80 for p in c.packets() if isinstance(p, PubAck)] == [True]
    _reload(h, **{"limits.max_topic_length": 20})
    c.send(Subscribe(2, (Subscription(topic, 1),)))
    [ack] = [p for p in c.packets() if isinstance(p, SubAck)]
    assert ack.reason_codes == (reasons.TOPIC_FILTER_INVALID,)
    assert not c.transport.closed
    c.send(Publish(topic, b"2", qos=1, packet_id=3))  # a topic it used before: checked again
    assert c.transport.closed


def test_acl_rules_and_the_packet_size_of_new_connections(h: Harness) -> None:
    old = h.connect("old", MQTT_5)
    [ack] = old.packets()
    assert isinstance(ack, ConnAck) and ack.properties.maximum_packet_size == 1048576
    _reload(h, **{"acl.deny_publish": ["secret/#"], "limits.max_packet_size": 4096})
    old.send(Publish("secret/a", b"x", qos=1, packet_id=1))
    assert [p.reason_code for p in old.packets() if isinstance(p, PubAck)] == [reasons.NOT_AUTHORIZED]
    new = h.connect("new", MQTT_5)
    [ack] = new.packets()
    assert ack.properties.maximum_packet_size == 4096
    assert old.client.reader.max_packet_size == 1048576  # agreed at its CONNECT


def test_the_session_limit_and_login_failures(h: Harness) -> None:
    h.connect("a", MQTT_3_1_1).packets()
    _reload(h, **{"limits.max_sessions": 1, "auth.max_failures": 3, "auth.ban_time": 7.0})
    [ack] = h.connect("b", MQTT_3_1_1).packets()
    assert isinstance(ack, ConnAck) and ack.reason_code == 3  # server unavailable: no room
    failures = h.broker.handshake.failures
    assert (failures.ban_after, failures.ban) == (3, 7.0)
