"""31: UTF-8 control characters and non-characters in the strings a client sends.

MQTT 5.0 section 1.5.4 (3.1.1 section 1.5.3): strings SHOULD NOT hold U+0001-U+001F,
U+007F-U+009F or non-characters; a receiver MAY treat a packet holding one as malformed
(3.1.1: MAY close). With ``limits.strict_utf8`` (the default) the broker does: a client ID
gets CONNACK 0x85 (3.1.1: return code 2), a user name or will topic CONNACK 0x81 (3.1.1: a
close), a topic name or filter DISCONNECT 0x81 (3.1.1: a close). With it off they pass.
The expected bytes come from ``mqttbytes``, not from the broker's codec.
"""

from __future__ import annotations

import mqttbytes as mb
import pytest
from conftest import (
    assert_disconnected,
    assert_no_publish,
    check_bystanders,
    skip_unless_shardbroker,
)

MAL = mb.RC_MALFORMED_PACKET
LENIENT = "[limits]\nstrict_utf8 = false\n"


@pytest.fixture(scope="module")
def lenient(make_module_broker):
    skip_unless_shardbroker("limits.strict_utf8 is a ShardBroker setting")
    return make_module_broker(config=LENIENT, name="lenient")


def _refused_connect(broker, mqtt, data: bytes, version: int) -> list[mb.ConnAck]:
    """Send a CONNECT that must be refused; the CONNACKs that came before the close."""
    c = mqtt.raw(broker)
    c.send(data)
    assert c.expect_closed(3), "the server kept a connection after a refused CONNECT"
    others = [mb.describe(p) for p in c.before_close if p[0] != mb.CONNACK]
    assert not others, f"unexpected packets: {others}"
    return [mb.parse_connack(p[2], version) for p in c.before_close if p[0] == mb.CONNACK]


# --------------------------------------------------------------------------- refused by default


@pytest.mark.parametrize("client_id", ["dev\x07ice", "tab\there", "del\x7f", "c1\x85", "nc\ufdd0", "nc\uffff",
                                       "nc\U0001fffe"])
@pytest.mark.parametrize("version, code", [(3, 2), (4, 2), (5, 0x85)])
def test_client_id_is_refused(broker, mqtt, uniq, client_id, version, code):
    acks = _refused_connect(broker, mqtt, mb.connect(client_id, version=version), version)
    assert [a.rc for a in acks] == [code]
    check_bystanders(broker, mqtt, uniq, version)


@pytest.mark.parametrize("version", [4, 5])
def test_user_name_is_refused(broker, mqtt, uniq, version):
    acks = _refused_connect(broker, mqtt, mb.connect(uniq.cid("u"), version=version, username="bob\x1b[0m",
                                                     password=b"pw"), version)
    assert [a.rc for a in acks] == ([MAL] if version == 5 else [])


@pytest.mark.parametrize("version", [4, 5])
def test_will_topic_is_refused(broker, mqtt, uniq, version):
    watcher = mqtt(broker, uniq.cid("w"), version=version)
    watcher.subscribe("will31/#", 0)
    acks = _refused_connect(broker, mqtt, mb.connect(uniq.cid("d"), version=version,
                                                     will=mb.Will("will31/\x0a", b"gone")), version)
    assert [a.rc for a in acks] == ([MAL] if version == 5 else [])
    assert_no_publish(watcher)


@pytest.mark.parametrize("topic", ["pub31/a\x01b", "pub31/\x9f", "pub31/\U0010ffff"])
@pytest.mark.parametrize("version", [4, 5])
def test_publish_topic_is_refused(broker, mqtt, uniq, topic, version):
    sub = mqtt(broker, uniq.cid("s"), version=version)
    sub.subscribe("pub31/#", 0)
    bad = mqtt(broker, uniq.cid("b"), version=version)
    bad.publish("pub31/clean", b"first", qos=1)  # a clean topic first: the check is not only for new clients
    assert sub.recv_publish().payload == b"first"
    bad.try_send(mb.publish(topic, b"x", qos=1, pid=9, version=version))
    assert_disconnected(bad, version, {MAL})
    assert_no_publish(sub)
    check_bystanders(broker, mqtt, uniq, version)


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_filter_is_refused(broker, mqtt, uniq, version):
    c = mqtt(broker, uniq.cid("f"), version=version)
    c.try_send(mb.subscribe(4, [("sub31/ok", 0), ("sub31/\x1b/#", 0)], version=version))
    assert_disconnected(c, version, {MAL})  # no SUBACK: the whole packet is malformed


@pytest.mark.parametrize("version", [4, 5])
def test_unsubscribe_filter_is_refused(broker, mqtt, uniq, version):
    c = mqtt(broker, uniq.cid("f"), version=version)
    c.try_send(mb.unsubscribe(5, ["uns31/\ufdef"], version=version))
    assert_disconnected(c, version, {MAL})


@pytest.mark.parametrize("props", [
    mb.prop_pair(mb.USER_PROPERTY, "k", "v\x07"),
    mb.prop_str(mb.CONTENT_TYPE, "text/\x0d"),
    mb.prop_str(mb.RESPONSE_TOPIC, "re/\x02"),
], ids=["user_property", "content_type", "response_topic"])
def test_v5_string_property_is_refused(broker, mqtt, uniq, props):
    c = mqtt(broker, uniq.cid("p"), version=5)
    c.try_send(mb.publish("prop31/t", b"x", version=5, props=props))
    assert_disconnected(c, 5, {MAL})


def test_refusals_are_logged_without_the_character(broker, mqtt, uniq):
    skip_unless_shardbroker("log text")
    since = broker.log_len()
    _refused_connect(broker, mqtt, mb.connect("log31\x1b[31mred", version=5), 5)
    line = broker.wait_for_log("U\\+001B", since=since)
    assert "\x1b" not in line


# --------------------------------------------------------------------------- strict_utf8 = false


@pytest.mark.parametrize("version", [4, 5])
def test_lenient_accepts_them(lenient, mqtt, uniq, version):
    cid = uniq.cid("lax") + "\x07\ufffe"
    c = mqtt(lenient, cid, version=version, username="bob\x1b", password=b"pw",
             will=mb.Will("lax31/will\x0a", b"w"))
    assert c.subscribe([("lax31/\x01/#", 1)]) == [1]
    c.publish("lax31/\x01/\x7f\U0010ffff", b"through", qos=1,
              props=mb.prop_pair(mb.USER_PROPERTY, "k\x02", "v") if version == 5 else b"")
    msg = c.recv_publish()
    assert (msg.topic, msg.payload) == ("lax31/\x01/\x7f\U0010ffff", b"through")
    assert c.unsubscribe(["lax31/\x01/#"]) == ([0] if version == 5 else [])


def test_lenient_logs_escape_control_characters(lenient, mqtt, uniq):
    """A client ID with a newline cannot forge a log line (a take-over logs the client ID)."""
    since = lenient.log_len()
    cid = uniq.cid("nl") + "\nFAKE forged line"
    mqtt(lenient, cid, version=4)
    mqtt(lenient, cid, version=4)
    line = lenient.wait_for_log("taken over", since=since)
    assert "\\x0aFAKE forged line" in line
    assert not any(row.startswith("FAKE") for row in lenient.tail(100000, since).splitlines())
