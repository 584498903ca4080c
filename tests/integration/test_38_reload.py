"""38: reload (SIGHUP, ``ctl reload``) and the service manager's readiness protocol (sd_notify).

A reload reads the configuration file again: live settings take effect without a disconnect,
the others are named as needing a restart, a broken file changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import mqttbytes as mb
import pytest
from conftest import client_id_on_shard, wait_until

CLI = [sys.executable, "-m", "shardbroker.cli.main"]
MAX_PACKET_SIZE = 0x27  # CONNACK property
RECEIVE_MAXIMUM = 0x21
LONG = "a/" + "b" * 150  # a filter of 152 bytes

CONFIG = """
[limits]
max_topic_length = {length}
max_packet_size = {size}
receive_maximum = {receive}
"""


def _config(length: int = 1000, size: int = 100000, receive: int = 100) -> str:
    return CONFIG.format(length=length, size=size, receive=receive)


def _ctl_reload(b) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "ctl", "--data-dir", str(b.data_dir), "reload", "--json"],
                          check=False, capture_output=True, text=True, timeout=30)


def _sighup(b, pattern: str) -> str:
    since = b.log_len()
    os.kill(b.pid, signal.SIGHUP)
    return b.wait_for_log(pattern, timeout=10, since=since)


def _refused(code: int) -> bool:
    return code >= 0x80


def test_reload_changes_a_live_setting_without_a_disconnect(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config=_config())
    pids = b.worker_pids()
    old4 = mqtt(b, client_id_on_shard("old4-", 0, 2), version=4)
    old5 = mqtt(b, client_id_on_shard("old5-", 1, 2), version=5)
    assert old5.connack.props[MAX_PACKET_SIZE] == 100000
    assert old4.subscribe(LONG, 1) == [1]  # 152 bytes: within 1000
    b.config_path.write_text(_config(length=100, size=5000))
    line = _sighup(b, r"reload: applied")
    assert "limits.max_packet_size" in line and "limits.max_topic_length" in line
    wait_until(lambda: b.log_text().count("password and ACL files reloaded") >= 2, timeout=10)
    # the topic length applies at once to the clients already connected: refused, not disconnected
    assert _refused(old4.subscribe(LONG + "/x", 1)[0])
    assert old5.subscribe(LONG + "/y", 1) == [0x8F]  # Topic Filter invalid
    # the packet size is agreed at CONNECT: new connections get the new one
    new5 = mqtt(b, uniq.cid("new"), version=5)
    assert new5.connack.props[MAX_PACKET_SIZE] == 5000
    # nobody was disconnected, no process restarted, and messages still flow between them
    topic = uniq.topic()
    assert old4.subscribe(topic, 1) == [1]
    old5.publish(topic, b"after the reload", qos=1)
    assert old4.recv_publish().payload == b"after the reload"
    old4.ping()
    old5.ping()
    assert b.worker_pids() == pids
    assert "after a reload" not in b.log_text()  # (how a reload's disconnect is logged)


def test_ctl_reload_answers_live_and_restart_needed_settings(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config=_config())
    b.config_path.write_text(_config(length=100, receive=7) + "\n[storage]\nmax_map_size = 1073741824\n")
    done = _ctl_reload(b)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["changed"] == ["limits.max_topic_length"]
    assert answer["restart_needed"] == ["limits.receive_maximum", "storage.max_map_size"]
    assert sorted(answer["shards"]) == ["0", "1"] and answer["missing"] == {}
    assert answer["acceptor"] == {"acceptor": True}
    line = b.wait_for_log("needing a restart")
    assert "limits.receive_maximum" in line and "storage.max_map_size" in line
    # a restart-needed setting keeps its running value
    c = mqtt(b, uniq.cid("c"), version=5)
    assert c.connack.props.get(RECEIVE_MAXIMUM, 65535) == 100
    assert c.subscribe(LONG, 1) == [0x8F]
    # the table for people
    b.config_path.write_text(_config(length=100, receive=7))
    done = subprocess.run([*CLI, "ctl", "--data-dir", str(b.data_dir), "reload"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "applied: nothing" in done.stdout and "needs a restart: limits.receive_maximum" in done.stdout


def test_a_broken_file_on_reload_leaves_the_running_configuration(make_broker, mqtt, uniq):
    b = make_broker(workers=1, config=_config(length=200))
    c = mqtt(b, uniq.cid("c"), version=4)
    b.config_path.write_text("[limits\nmax_topic_length = 100\n")
    since = b.log_len()
    line = _sighup(b, r"reload failed")
    assert "the previous configuration stays in force" in line and "invalid TOML" in line
    time.sleep(0.3)
    assert sum("reload failed" in ln for ln in b.lines[since:]) == 1  # one line
    b.config_path.write_text(_config(length=-5))
    done = _ctl_reload(b)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        ("error: reload failed, the previous configuration stays in force: limits.max_topic_length: "
         "must be an integer between 1 and 65535, got -5")]
    assert c.subscribe(LONG, 1) == [1]  # 152 bytes: the running limit (200) still holds
    assert b.alive()


def test_a_restarted_worker_gets_the_reloaded_configuration(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config=_config())
    b.config_path.write_text(_config(length=100))
    _sighup(b, r"reload: applied limits.max_topic_length")
    before = b.worker_pids()
    os.kill(before[1], signal.SIGKILL)
    wait_until(lambda: b.worker_pids().get(1) not in (None, before[1]), timeout=10)

    def subscribed() -> list[int] | None:
        try:
            c = mqtt(b, client_id_on_shard(uniq.cid("r"), 1, 2), version=4)
            return c.subscribe(LONG, 1)
        except (OSError, AssertionError, mb.ConnectionClosed):
            return None

    assert _refused(wait_until(subscribed, timeout=10)[0])


def _datagrams(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(until in g for g in got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {until!r} from the broker; got {got}") from None
    return got


def test_the_service_manager_is_told_ready_reloading_and_stopping(make_broker, monkeypatch):
    name = f"shardbroker-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # the abstract namespace, as systemd may give it ("@name")
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        b = make_broker(workers=2, config=_config())
        ready = _datagrams(sock, "READY=1")
        fields = dict(line.split("=", 1) for line in ready[-1].splitlines())
        assert fields["MAINPID"] == str(b.pid) and fields["STATUS"].startswith("serving")
        assert len(ready) == 1  # the children do not speak for the service
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(b.pid, signal.SIGHUP)
        reload = _datagrams(sock, "READY=1")
        assert reload[0].startswith("RELOADING=1\n")
        usec = int(dict(line.split("=", 1) for line in reload[0].splitlines())["MONOTONIC_USEC"])
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        b.stop()
        assert any(g.startswith("STOPPING=1") for g in _datagrams(sock, "STOPPING=1"))
    finally:
        sock.close()


@pytest.mark.parametrize("version", [4, 5])
def test_reload_applies_acl_rules_to_connected_clients(make_broker, mqtt, uniq, version):
    b = make_broker(workers=1, config=_config())
    c = mqtt(b, uniq.cid("c"), version=version)
    assert c.subscribe("secret/a", 1) == [1]
    b.config_path.write_text(_config() + '\n[acl]\ndeny_subscribe = ["secret/#"]\n')
    _sighup(b, r"reload: applied acl.deny_subscribe")
    wait_until(lambda: "password and ACL files reloaded" in b.log_text(), timeout=10)
    assert c.subscribe("secret/b", 1) == [0x80 if version == 4 else 0x87]
    c.ping()
