"""``shardbroker ctl``: the live admin commands against a running 4-worker broker.

Each test runs the real CLI (``python -m shardbroker.cli.main ctl --data-dir ...``) against a
real broker and checks its answer against what real clients did: who connected, subscribed,
published; kick against what the kicked client and its will's watcher receive.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import mqttbytes as mb
import pytest
from conftest import REPO, Broker, client_id_on_shard, shard_of, skip_unless_shardbroker, wait_until

WORKERS = 4


@pytest.fixture(scope="module")
def b4(make_module_broker) -> Broker:
    skip_unless_shardbroker()
    # strict_utf8 off: client IDs and usernames may hold control characters, which tables escape
    return make_module_broker(workers=WORKERS, name="ctl-broker", config="[limits]\nstrict_utf8 = false\n")


def ctl(broker_or_dir: Broker | os.PathLike[str] | str, *args: str) -> subprocess.CompletedProcess[str]:
    data_dir = broker_or_dir.data_dir if isinstance(broker_or_dir, Broker) else broker_or_dir
    return subprocess.run(
        [sys.executable, "-m", "shardbroker.cli.main", "ctl", "--data-dir", str(data_dir), *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def ctl_json(broker: Broker, *args: str) -> Any:
    out = ctl(broker, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_clients_with_and_without_pattern(b4, mqtt, uniq):
    prefix = uniq.prefix("cl")
    v4 = [f"{prefix}a{i}" for i in range(3)]
    v5 = [f"{prefix}b{i}" for i in range(3)]
    for cid in v4:
        mqtt(b4, cid, version=4)
    for cid in v5:
        mqtt(b4, cid, version=5)
    other = mqtt(b4, uniq.cid("other"), version=4)

    listed = ctl_json(b4, "clients", f"{prefix}*")
    assert listed["missing"] == {}
    assert [c["client_id"] for c in listed["clients"]] == sorted(v4 + v5)
    for c in listed["clients"]:
        assert c["version"] == (4 if c["client_id"] in v4 else 5)
        assert c["shard"] == shard_of(c["client_id"], WORKERS)
        assert c["address"].startswith("127.0.0.1:")
    assert {c["client_id"] for c in ctl_json(b4, "clients", f"{prefix}b?")["clients"]} == set(v5)

    everyone = {c["client_id"] for c in ctl_json(b4, "clients")["clients"]}
    assert set(v4 + v5) <= everyone and any(cid.startswith("other") for cid in everyone)
    other.disconnect()

    table = ctl(b4, "clients", f"{prefix}*")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["client", "id", "shard"]
    assert [line.split()[0] for line in lines[1:]] == sorted(v4 + v5)
    assert all(" 3.1.1 " in line for line in lines[1:4]) and all(" 5.0 " in line for line in lines[4:])


def test_client_detail_and_bytes(b4, mqtt, uniq):
    cid = uniq.cid("det")
    topic = uniq.topic("det")
    c = mqtt(b4, cid, version=5, keepalive=37)
    c.subscribe(topic, qos=1)
    first = ctl_json(b4, "client", cid)
    view = first["client"]
    assert first["shard"] == shard_of(cid, WORKERS) and first["missing"] == {}
    assert (view["state"], view["version"], view["keepalive"], view["subscriptions"]) == ("online", 5, 37, 1)
    assert abs(view["connected_at"] - time.time()) < 30
    [sub] = view["subscription_list"]
    assert (sub["filter"], sub["qos"], sub["no_local"]) == (topic, 1, False)

    c.publish(topic, b"x" * 1000, qos=1)
    c.recv_publish()  # its own subscription delivers it back

    def grown() -> Any:
        now = ctl_json(b4, "client", cid)["client"]
        return now if now["bytes_in"] >= view["bytes_in"] + 1000 and now["bytes_out"] >= view["bytes_out"] + 1000 \
            else None

    wait_until(grown, timeout=5, message="bytes in/out to grow by the publish")

    table = ctl(b4, "client", cid)
    assert table.returncode == 0, table.stderr
    rows = dict(line.split(None, 1) if "  " not in line else line.split("  ", 1) for line in table.stdout.splitlines()
                if line and not line.startswith("key"))
    assert rows["protocol"].strip() == "5.0" and rows["keepalive"].strip() == "37"
    assert rows["connected since"].strip().endswith("+00:00")
    assert topic in table.stdout


def test_offline_session_and_unknown_client(b4, mqtt, uniq):
    cid = uniq.cid("off")
    topic = uniq.topic("off")
    c = mqtt(b4, cid, version=4, clean=False)
    c.subscribe(topic, qos=1)
    c.disconnect()
    view = wait_until(lambda: (v := ctl_json(b4, "client", cid)["client"])["state"] == "offline" and v,
                      message="the session to go offline")
    assert view["subscriptions"] == 1 and view["subscription_list"][0]["filter"] == topic
    assert view["expires_at"] is None and view["persistent"]  # 3.1.1 Clean Session 0: no expiry
    p = mqtt(b4, uniq.cid("pub"), version=4)
    p.publish(topic, b"queued", qos=1)
    wait_until(lambda: ctl_json(b4, "client", cid)["client"]["queued"] == 1, message="a queued message")

    unknown = ctl(b4, "client", "nobody-" + uniq.cid())
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and unknown.stderr.startswith("error: no client")


def test_tables_escape_control_characters_clients_sent(b4, mqtt, uniq):
    prefix = uniq.prefix("esc")
    cid = f"{prefix}\x1b[31mred"
    mqtt(b4, cid, version=5, username="u\x07")
    table = ctl(b4, "clients", f"{prefix}*")
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout
    assert f"{prefix}\\x1b[31mred" in table.stdout and "u\\x07" in table.stdout
    assert ctl_json(b4, "clients", f"{prefix}*")["clients"][0]["client_id"] == cid  # JSON: as it was sent
    detail = ctl(b4, "client", cid)
    assert detail.returncode == 0 and "\x1b" not in detail.stdout and "\\x1b[31mred" in detail.stdout
    unknown = ctl(b4, "kick", f"{prefix}\x1b[2Jgone")
    assert unknown.returncode == 1 and "\x1b" not in unknown.stderr and "\\x1b[2J" in unknown.stderr


def _disconnect_then_closed(c: mb.RawClient) -> mb.Disconnect:
    _type, _flags, body = c.expect(mb.DISCONNECT, timeout=5, skip_publish=True)
    assert c.expect_closed(5)
    return mb.parse_disconnect(body, 5)


def test_kick_v5_sends_0x98_to_that_client_only_and_publishes_its_will(b4, mqtt, uniq):
    will_topic = uniq.topic("will")
    watcher = mqtt(b4, uniq.cid("w"), version=5)
    watcher.subscribe(will_topic, qos=1)
    target_id = uniq.cid("kick5")
    target = mqtt(b4, target_id, version=5, will=mb.Will(will_topic, b"gone", qos=1))
    # a bystander on the same shard, and one with a similar client ID on another
    same_shard_id = client_id_on_shard(target_id + "s", shard_of(target_id, WORKERS), WORKERS)
    same_shard = mqtt(b4, same_shard_id, version=5)
    other = mqtt(b4, target_id + "x", version=5)

    out = ctl(b4, "kick", target_id)
    assert out.returncode == 0, out.stderr
    assert target_id in out.stdout
    assert _disconnect_then_closed(target).reason == 0x98
    msg = watcher.recv_publish()
    assert (msg.topic, msg.payload) == (will_topic, b"gone")
    same_shard.ping()
    other.ping()
    assert ctl_json(b4, "client", same_shard_id)["client"]["state"] == "online"
    gone = ctl(b4, "client", target_id, "--json")  # a clean session ends with its connection
    assert gone.returncode == 1 and json.loads(gone.stdout)["client"] is None

    again = ctl(b4, "kick", target_id)
    assert again.returncode == 1 and again.stderr.startswith("error: client") and "not connected" in again.stderr


def test_kick_v311_closes_and_publishes_its_will(b4, mqtt, uniq):
    will_topic = uniq.topic("will")
    watcher = mqtt(b4, uniq.cid("w"), version=4)
    watcher.subscribe(will_topic, qos=1)
    target_id = uniq.cid("kick4")
    target = mqtt(b4, target_id, version=4, will=mb.Will(will_topic, b"gone4", qos=1))
    bystander = mqtt(b4, uniq.cid("by"), version=4)

    out = ctl_json(b4, "kick", target_id)
    assert out["kicked"] and out["version"] == 4
    assert target.expect_closed(5)  # no DISCONNECT in 3.1.1: the connection closes
    msg = watcher.recv_publish()
    assert (msg.topic, msg.payload) == (will_topic, b"gone4")
    bystander.ping()


def test_kick_respects_will_delay(b4, mqtt, uniq):
    will_topic = uniq.topic("will")
    watcher = mqtt(b4, uniq.cid("w"), version=5)
    watcher.subscribe(will_topic, qos=1)
    target_id = uniq.cid("delay")
    target = mqtt(b4, target_id, version=5, props=mb.prop_u32(mb.SESSION_EXPIRY_INTERVAL, 60),
                  will=mb.Will(will_topic, b"late", qos=1, props=mb.prop_u32(mb.WILL_DELAY_INTERVAL, 2)))
    kicked_at = time.monotonic()
    assert ctl_json(b4, "kick", target_id)["kicked"]
    assert _disconnect_then_closed(target).reason == 0x98
    assert watcher.no_packet(1.0) is None  # not before its delay
    msg = watcher.recv_publish(timeout=5)
    assert msg.payload == b"late" and time.monotonic() - kicked_at >= 1.9


def test_subscriptions_and_routes_agree_with_subscribes(b4, mqtt, uniq):
    base = uniq.topic("subs")
    subscribed: set[tuple[str, str, int]] = set()
    for shard in range(WORKERS):
        cid = client_id_on_shard(uniq.prefix("s"), shard, WORKERS)
        c = mqtt(b4, cid, version=5)
        filters = [(f"{base}/{shard}/+", 1), (f"{base}/all", shard % 3)]
        c.subscribe(filters)
        subscribed |= {(cid, flt, qos) for flt, qos in filters}
    shared_cid = uniq.cid("sh")
    mqtt(b4, shared_cid, version=5).subscribe(f"$share/g/{base}/shared", 0)
    subscribed.add((shared_cid, f"$share/g/{base}/shared", 0))

    listed = ctl_json(b4, "subscriptions", f"{base}/#")
    assert listed["missing"] == {}
    assert {(s["client_id"], s["filter"], s["qos"]) for s in listed["subscriptions"]} == subscribed
    assert [s["filter"] for s in listed["subscriptions"]] == sorted(s["filter"] for s in listed["subscriptions"])
    globbed = ctl_json(b4, "subscriptions", f"{base}/*/+")
    assert {s["filter"] for s in globbed["subscriptions"]} == {f"{base}/{s}/+" for s in range(WORKERS)}

    def routes_agree() -> Any:
        table = {r["filter"]: r["shards"] for r in ctl_json(b4, "routes")["routes"] if r["filter"].find(base) >= 0}
        want = {f"{base}/{s}/+": [s] for s in range(WORKERS)}
        want[f"{base}/all"] = list(range(WORKERS))
        want[f"$share/g/{base}/shared"] = [shard_of(shared_cid, WORKERS)]
        return table == want or None

    wait_until(routes_agree, message="the route table to list each filter with its shards")
    table = ctl(b4, "routes")
    assert table.returncode == 0 and f"{base}/all" in table.stdout and "routes" in table.stdout.splitlines()[-1]

    bad = ctl(b4, "subscriptions", "a/#/b")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error:")


def test_retained_agrees_with_retained_publishes(b4, mqtt, uniq):
    base = uniq.topic("ret")
    p = mqtt(b4, uniq.cid("rp"), version=4)
    payloads = {f"{base}/a": b"hello", f"{base}/b": b"\x1b[2Jbell\x07" + b"z" * 100, f"{base}/c/d": b"x"}
    for topic, payload in payloads.items():
        p.publish(topic, payload, qos=1, retain=True)
    p.publish(f"{base}/gone", b"soon", qos=1, retain=True)
    p.publish(f"{base}/gone", b"", qos=1, retain=True)  # deletes it

    listed = ctl_json(b4, "retained", f"{base}/#")
    assert listed["missing"] == {} and not listed["truncated"]
    assert {r["topic"]: r["size"] for r in listed["retained"]} == {t: len(v) for t, v in payloads.items()}
    escaped = next(r for r in listed["retained"] if r["topic"] == f"{base}/b")["preview"]
    assert escaped.startswith("\\x1b[2Jbell\\x07zz") and escaped.endswith("...") and escaped.isprintable()
    assert [r["topic"] for r in ctl_json(b4, "retained", f"{base}/+")["retained"]] == [f"{base}/a", f"{base}/b"]

    capped = ctl_json(b4, "retained", f"{base}/#", "--limit", "2")
    assert capped["truncated"] and len(capped["retained"]) == 2
    table = ctl(b4, "retained", f"{base}/#", "--limit", "2")
    assert table.returncode == 0 and "there are more" in table.stderr
    assert "\x1b" not in table.stdout and "\\x1b[2J" in table.stdout
    zero = ctl(b4, "retained", "--limit", "0")
    assert zero.returncode == 2 and zero.stderr == "error: --limit: at least 1, got 0\n"


def test_retained_digest_changes_with_the_retained_messages(b4, mqtt, uniq):
    before = ctl_json(b4, "retained-digest")
    assert before["missing"] == {} and len(before["digest"]) == 16 and before["node"] == ""
    p = mqtt(b4, uniq.cid("rd"), version=4)
    p.publish(uniq.topic("digest"), b"v", qos=1, retain=True)
    after = ctl_json(b4, "retained-digest")
    assert after["count"] == before["count"] + 1 and after["digest"] != before["digest"]
    table = ctl(b4, "retained-digest")
    assert table.returncode == 0 and table.stdout == (f"node (none): {after['count']} retained messages, "
                                                      f"digest {after['digest']}\n")


def test_stats_counts_qos1_publishes(b4, mqtt, uniq):
    def received() -> int:
        answer = ctl_json(b4, "stats")
        acceptor = answer["acceptor"]
        assert answer["missing"] == {} and acceptor["accepted"] > 0
        # hand-offs go in batches: at least one send, never more sends than connections
        assert 0 < acceptor["handoff_sends"] <= acceptor["handed_off"]
        return int(answer["total"]["received"])

    before = received()
    p = mqtt(b4, uniq.cid("st"), version=5)
    for i in range(7):
        p.publish(uniq.topic("st"), b"%d" % i, qos=1)
    assert received() - before == 7
    table = ctl(b4, "stats")
    assert table.returncode == 0 and "received" in table.stdout and "accepted" in table.stdout


def test_a_stopped_worker_is_named(b4, mqtt, uniq):
    pids = b4.worker_pids()
    assert len(pids) == WORKERS
    os.kill(pids[2], signal.SIGSTOP)
    try:
        out = ctl(b4, "clients", "--json")
        assert out.returncode == 1
        assert set(json.loads(out.stdout)["missing"]) == {"2"}
        assert "shard 2 did not answer" in out.stderr
        stats = ctl(b4, "stats")
        assert stats.returncode == 1 and "shard 2 did not answer" in stats.stderr
        assert "shard 0" in stats.stdout  # the others are shown
    finally:
        os.kill(pids[2], signal.SIGCONT)
    assert ctl(b4, "clients").returncode == 0


def test_control_socket_is_owner_only(b4):
    mode = os.stat(b4.data_dir / "control.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_no_broker_is_one_line_and_exit_2(tmp_path):
    out = ctl(tmp_path, "clients")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error:") and "running" in out.stderr
    assert "Traceback" not in out.stderr
