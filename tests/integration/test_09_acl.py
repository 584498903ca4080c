"""09: the [acl] deny lists: refused subscriptions and dropped publishes, raw bytes."""

from __future__ import annotations

import pytest
from conftest import BrokerStartError, assert_no_publish

CONFIG = """
[acl]
deny_subscribe = ["test/nosubscribe", "secret/#"]
deny_publish = ["readonly/+"]
"""


@pytest.fixture(scope="module")
def acl_broker(make_module_broker):
    return make_module_broker(workers=2, config=CONFIG)


@pytest.mark.parametrize("version", [4, 5])
def test_denied_subscription_gets_0x80_or_0x87_and_others_are_granted(acl_broker, mqtt, uniq, version):
    c = mqtt(acl_broker, uniq.cid("a"), version=version)
    codes = c.subscribe([("test/nosubscribe", 1), ("secret/x/y", 2), (uniq.topic(), 2), ("$share/g/secret/z", 1)])
    no = 0x80 if version == 4 else 0x87  # 5.0: Not authorized
    assert codes == [no, no, 2, no]


@pytest.mark.parametrize("version", [4, 5])
def test_denied_subscription_receives_nothing(acl_broker, mqtt, uniq, version):
    sub = mqtt(acl_broker, uniq.cid("s"), version=version)
    assert sub.subscribe("test/nosubscribe", 1) == [0x80 if version == 4 else 0x87]
    pub = mqtt(acl_broker, uniq.cid("p"), version=4)
    pub.publish("test/nosubscribe", b"x", qos=1)
    assert_no_publish(sub, 0.5)


def test_denied_publish_is_dropped_with_0x87_in_v5(acl_broker, mqtt, uniq):
    topic = "readonly/" + uniq.topic().replace("/", "_")
    sub = mqtt(acl_broker, uniq.cid("s"), version=4)
    sub.subscribe("readonly/#", 1)
    pub5 = mqtt(acl_broker, uniq.cid("p5"), version=5)
    ack = pub5.publish(topic, b"no", qos=1)
    assert ack is not None and ack.reason == 0x87
    pub4 = mqtt(acl_broker, uniq.cid("p4"), version=4)
    assert pub4.publish(topic, b"no", qos=1) is not None  # 3.1.1: acknowledged, not delivered
    assert_no_publish(sub, 0.5)
    pub4.publish("readonly/a/b", b"yes", qos=1)  # one level deeper: not under readonly/+
    assert sub.recv_publish().payload == b"yes"


def test_bad_acl_filter_is_a_config_error(make_broker):
    b = make_broker(config='[acl]\ndeny_subscribe = ["a/#/b"]\n', start=False)
    with pytest.raises(BrokerStartError):
        b.start(timeout=10)
    assert "configuration error: acl.deny_subscribe: 'a/#/b' is not a valid topic filter" in b.log_text()
    assert "Traceback" not in b.log_text()
