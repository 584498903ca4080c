"""What a shard answers on its control socket (``operations.shard.ShardOps``), driven without a
loop or sockets (``core_harness``), and the pure pieces of ``shardbroker ctl``: selections,
previews, the escaping of what clients sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import START, Harness

from shardbroker.cli.ctl import printable, when
from shardbroker.core.routing import RouteTable
from shardbroker.operations.select import checked_filter, preview, subscription_selector
from shardbroker.operations.shard import ShardOps
from shardbroker.protocol import reasons
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Properties,
    Publish,
    Subscribe,
    Subscription,
    Will,
)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def _ops(h: Harness) -> ShardOps:
    return ShardOps(h.broker, lambda: h.now)


def _subscribe(c: object, *filters: tuple[str, int]) -> None:
    c.send(Subscribe(1, tuple(Subscription(f, q) for f, q in filters)))  # type: ignore[attr-defined]


def test_clients_and_client_describe_the_connection(h: Harness) -> None:
    a = h.connect("alpha", MQTT_5, keepalive=37)
    _subscribe(a, ("a/+", 1), ("b", 0))
    h.connect("beta")
    h.advance(5)
    ops = _ops(h)
    listed = ops({"op": "clients"})["clients"]
    assert sorted(c["client_id"] for c in listed) == ["alpha", "beta"]
    assert [c["client_id"] for c in ops({"op": "clients", "pattern": "al*"})["clients"]] == ["alpha"]
    view = ops({"op": "client", "client_id": "alpha"})["client"]
    assert (view["state"], view["version"], view["keepalive"], view["subscriptions"]) == ("online", MQTT_5, 37, 2)
    assert view["connected_at"] == START.wall  # the CONNACK's time, not the time asked
    assert view["address"] == "fake:alpha" and view["listener"].startswith("mqtt ")
    assert [(s["filter"], s["qos"]) for s in view["subscription_list"]] == [("a/+", 1), ("b", 0)]
    assert ops({"op": "client", "client_id": "nobody"})["client"] is None


def test_an_offline_session_answers_with_its_expiry(h: Harness) -> None:
    a = h.connect("off", MQTT_5, clean=False, properties=Properties(session_expiry_interval=100))
    _subscribe(a, ("q/#", 1))
    a.send(Disconnect())
    p = h.connect("pub")
    p.send(Publish("q/1", b"x", qos=1, packet_id=1))
    view = _ops(h)({"op": "client", "client_id": "off"})["client"]
    assert (view["state"], view["queued"], view["subscriptions"]) == ("offline", 1, 1)
    assert view["disconnected_at"] == START.wall and view["expires_at"] == START.wall + 100


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_kick_is_a_server_disconnect_and_publishes_the_will(h: Harness, version: int) -> None:
    watcher = h.connect("w")
    _subscribe(watcher, ("will/#", 0))
    watcher.packets()
    a = h.connect("a", version, will=Will("will/a", b"bye"))
    a.packets()
    answer = _ops(h)({"op": "kick", "client_id": "a"})
    h.run()
    assert answer["kicked"] and answer["version"] == version
    sent = a.packets()
    if version == MQTT_5:
        [d] = sent
        assert isinstance(d, Disconnect) and d.reason_code == reasons.ADMINISTRATIVE_ACTION
    else:
        assert sent == []  # 3.1.1 has no server DISCONNECT: the connection closes
    assert a.transport.closed
    assert [p.payload for p in watcher.packets() if isinstance(p, Publish)] == [b"bye"]
    assert not _ops(h)({"op": "kick", "client_id": "a"})["kicked"]


def test_kick_keeps_the_will_delay(h: Harness) -> None:
    watcher = h.connect("w")
    _subscribe(watcher, ("will/#", 0))
    watcher.packets()
    h.connect("a", MQTT_5, clean=False, properties=Properties(session_expiry_interval=100),
              will=Will("will/a", b"late", properties=Properties(will_delay_interval=5)))
    assert _ops(h)({"op": "kick", "client_id": "a"})["kicked"]
    h.advance(4)
    assert [p for p in watcher.packets() if isinstance(p, Publish)] == []
    h.advance(1.5)
    assert [p.payload for p in watcher.packets() if isinstance(p, Publish)] == [b"late"]


def test_subscriptions_routes_and_retained(h: Harness) -> None:
    a = h.connect("a", MQTT_5)
    _subscribe(a, ("s/+/t", 1), ("$share/g/s/x", 0), ("other", 2))
    ops = _ops(h)
    picked = ops({"op": "subscriptions", "filter": "s/#"})["subscriptions"]
    assert sorted(s["filter"] for s in picked) == ["$share/g/s/x", "s/+/t"]
    assert [s["filter"] for s in ops({"op": "subscriptions", "filter": "oth*"})["subscriptions"]] == ["other"]
    routes = ops({"op": "routes"})
    assert routes["count"] == 3 and routes["routes"]["s/+/t"] == {"0": False}

    p = h.connect("p")
    for i, payload in enumerate([b"one", b"\x1b[31mred", b"three"]):
        p.send(Publish(f"r/{i}", payload, qos=1, retain=True, packet_id=i + 1))
    listed = ops({"op": "retained", "filter": "r/#", "limit": 2})
    assert [r["topic"] for r in listed["retained"]] == ["r/0", "r/1"] and listed["truncated"]
    assert listed["retained"][1]["preview"] == "\\x1b[31mred" and listed["retained"][1]["size"] == 8
    assert not ops({"op": "retained", "filter": "r/+"})["truncated"]
    with pytest.raises(ValueError, match="not a valid topic filter"):
        ops({"op": "retained", "filter": "r/#/x"})


def test_retained_digest_follows_the_retained_messages(h: Harness) -> None:
    ops = _ops(h)
    empty = ops({"op": "retained_digest"})
    assert (empty["count"], empty["digest"], empty["node"], empty["catching_up"]) == (0, "0" * 16, "", [])
    p = h.connect("p")
    p.send(Publish("d/1", b"one", qos=1, retain=True, packet_id=1))
    one = ops({"op": "retained_digest"})
    assert one["count"] == 1 and len(one["digest"]) == 16 and one["digest"] != empty["digest"]
    assert one["counters"]["retain_sent"] == 0  # no other node
    p.send(Publish("d/1", b"", qos=1, retain=True, packet_id=2))
    assert ops({"op": "retained_digest"})["count"] == 0
    assert ops({"op": "retained_digest"})["digest"] == "0" * 16  # the tombstone is not counted


def test_route_table_holders() -> None:
    table = RouteTable()
    table.add(0, "a/b")
    table.add(2, "a/b", durable=True)
    table.add(1, "$share/g/c/#", durable=True)
    assert table.holders() == {"a/b": {0: False, 2: True}, "$share/g/c/#": {1: True}}


def test_selection_covers_or_globs() -> None:
    under_a = subscription_selector("a/#")
    assert under_a("a/b") and under_a("a/+/c") and under_a("$share/g/a/b") and not under_a("b")
    assert not subscription_selector("a/+")("a/#")  # a/# reaches deeper than a/+
    assert subscription_selector("a/*")("a/+/c") and not subscription_selector("a/*")("b/a")
    assert subscription_selector(None)("anything")
    with pytest.raises(ValueError):
        checked_filter("a/#/b")


def test_previews_and_tables_escape_what_clients_sent() -> None:
    assert preview(b"ok\\\x00\xff") == "ok\\\\\\x00\\xff"
    assert preview(b"x" * 40) == "x" * 32 + "..."
    assert printable("id\x1b[31m\x07\u2028") == "id\\x1b[31m\\x07\\u2028"
    assert printable("plain é") == "plain é"
    assert when(0.0) == "1970-01-01T00:00:00+00:00" and when(None) is None
