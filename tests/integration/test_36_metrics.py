"""36: metrics: $SYS/broker totals with Mosquitto's names, Prometheus /metrics, /healthz and
/readyz, and ``ctl stats``, all counting the same messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO, Broker, client_id_on_shard, skip_unless_shardbroker, wait_until
from prometheus_client.parser import text_string_to_metric_families

METRICS_RE = re.compile(r"metrics on http://[^\s:]+:(\d+)")
CONFIG = "[server]\nsys_interval = 0.5\n[metrics]\nenabled = true\nport = 0\n"


@pytest.fixture(autouse=True)
def _shardbroker_only() -> None:
    skip_unless_shardbroker("metrics, health endpoints and the $SYS/broker totals")


def metrics_port(b: Broker) -> int:
    return int(METRICS_RE.search(b.wait_for_log(METRICS_RE.pattern)).group(1))  # type: ignore[union-attr]


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics by (name, labels)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """``name`` summed over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def ctl_stats(b: Broker) -> dict:
    out = subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "ctl", "--data-dir", str(b.data_dir),
                          "stats", "--json"], cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_published_messages_counted_in_sys_metrics_and_ctl(make_broker, mqtt, paho, uniq):
    b = make_broker(workers=4, config=CONFIG)
    port = metrics_port(b)
    n = 24
    # persistent sessions: each shard stores one, so each commits to its store
    publishers = [mqtt(b, client_id_on_shard(uniq.prefix("p"), shard, 4), clean=False) for shard in range(4)]
    for i in range(n):
        publishers[i % 4].publish(uniq.topic(), b"payload-%d" % i, qos=1)  # 9 or 10 payload bytes
    payload_bytes = sum(len(b"payload-%d" % i) for i in range(n))

    watcher = paho(b, uniq.cid("sys"))
    watcher.subscribe("$SYS/broker/messages/received", 0)
    watcher.subscribe("$SYS/broker/publish/bytes/received", 0)
    seen: dict[str, bytes] = {}

    def sys_counts() -> bool:
        while not watcher.messages.empty():
            m = watcher.messages.get_nowait()
            seen[m.topic] = m.payload
        return seen.get("$SYS/broker/messages/received") == str(n).encode()

    wait_until(sys_counts, timeout=10, message=f"$SYS/broker/messages/received = {n}")
    assert seen["$SYS/broker/publish/bytes/received"] == str(payload_bytes).encode()

    if shutil.which("mosquitto_sub"):  # a retained value: another client reads it at once
        out = subprocess.run(["mosquitto_sub", "-p", str(b.port), "-t", "$SYS/broker/messages/received",
                              "-t", "$SYS/broker/version", "-v", "-C", "2", "-W", "5"],
                             capture_output=True, text=True, timeout=10, check=False)
        lines = set(out.stdout.splitlines())
        assert f"$SYS/broker/messages/received {n}" in lines, out
        assert "$SYS/broker/version shardbroker 0.1.0" in lines, out

    samples = scrape(port)
    assert total(samples, "shardbroker_messages_received_total", qos="1") == n
    assert total(samples, "shardbroker_messages_received_total") == n
    assert total(samples, "shardbroker_publish_received_bytes_total") == payload_bytes
    for shard in range(4):  # one publisher per shard: every shard counted its share
        assert total(samples, "shardbroker_messages_received_total", shard=str(shard)) == n // 4
        assert total(samples, "shardbroker_shard_up", shard=str(shard)) == 1
        commits = total(samples, "shardbroker_store_commits_total", shard=str(shard))
        assert commits >= 1
        assert total(samples, "shardbroker_store_commit_duration_seconds_count", shard=str(shard)) == commits
        assert total(samples, "shardbroker_store_commit_operations_count", shard=str(shard)) == commits
    assert total(samples, "shardbroker_acceptor_handoff_duration_seconds_count") >= 5
    assert total(samples, "shardbroker_connections") >= 5

    stats = ctl_stats(b)
    assert stats["total"]["received"] == n
    assert stats["total"]["received_qos1"] == n
    assert stats["total"]["received_bytes"] == payload_bytes


def test_sys_values_are_retained_for_a_late_subscriber(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config=CONFIG)
    early = mqtt(b, uniq.cid("early"))
    early.subscribe("$SYS/broker/uptime", 0)
    early.recv_publish(5)  # a round has been published
    time.sleep(1.2)  # and more rounds after it: $SYS/broker/version was published once, at the first
    late = mqtt(b, uniq.cid("late"))
    late.subscribe("$SYS/broker/#", 0)
    got: dict[str, object] = {}
    for m in late.drain_publishes(0.3):
        got.setdefault(m.topic, m)  # the first of each topic: what the subscription brought
    # retained (the flag is set only on a retained message sent at a subscription [MQTT-3.3.1-8/9])
    version = got["$SYS/broker/version"]
    assert version.retain and version.payload == b"shardbroker 0.1.0"
    for name in ("uptime", "clients/connected", "clients/maximum", "messages/received", "messages/sent",
                 "publish/messages/dropped", "publish/bytes/received", "retained messages/count",
                 "subscriptions/count", "store/messages/count", "store/messages/bytes", "load/messages/received/1min",
                 "load/connections/15min"):
        assert got[f"$SYS/broker/{name}"].retain, name
    assert got["$SYS/broker/uptime"].payload.endswith(b" seconds")
    assert int(got["$SYS/broker/clients/connected"].payload) >= 1  # "early", connected all along


def test_readyz_fails_while_a_worker_is_stopped_or_dead(make_broker):
    b = make_broker(workers=4, config=CONFIG)
    port = metrics_port(b)
    assert http_get(port, "/healthz") == (200, "ok\n")
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, message="/readyz 200")
    pid = b.worker_pids()[2]
    os.kill(pid, signal.SIGSTOP)
    try:
        status, text = http_get(port, "/readyz")
        assert status == 503
        assert text.startswith("shard 2: no answer"), text
        assert http_get(port, "/healthz")[0] == 200  # the supervisor lives
        samples = scrape(port)  # a scrape still answers, and says which shard is missing
        assert total(samples, "shardbroker_shard_up", shard="2") == 0
        assert total(samples, "shardbroker_shard_up", shard="1") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, message="/readyz 200 after SIGCONT")

    pid = b.worker_pids()[1]
    os.kill(pid, signal.SIGKILL)
    status, text = http_get(port, "/readyz")
    assert status == 503 and "shard 1: " in text, text
    wait_until(lambda: b.worker_pids().get(1) not in (None, pid), timeout=10, message="worker 1 restarted")
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10, message="/readyz 200 after the restart")


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (from /proc: its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default(make_broker):
    b = make_broker(workers=1)
    assert "metrics on" not in b.log_text()
    assert _listening_ports(b.pid) == {b.port}  # the MQTT listener and nothing else


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "broker.toml"
        config.write_text(f"[metrics]\nenabled = true\nport = {port}\n")
        out = subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "serve", "--port", "0", "--workers", "1",
                              "--data-dir", str(tmp_path / "data"), "--config", str(config)],
                             cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "cannot serve metrics" in line]
    assert errors == [(f"shardbroker: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
                       "(metrics.host, metrics.port)")], out.stderr
    assert "Traceback" not in out.stderr
