"""``shardbroker store ...`` (cli/store.py) against a store populated in ``tmp_path``.

Each command is run through typer's CliRunner on the sub-app: table output is
checked for its rows, ``--json`` output is parsed, and the error paths (unknown
session, bad data directory, damaged store) must give the documented exit code
and one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import lmdb
import pytest
from typer.testing import CliRunner, Result

from shardbroker.cli.store import app
from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.sharding import shard_for
from shardbroker.storage.lmdb_store import RetainedStore, ShardStore
from shardbroker.storage.records import (
    AWAIT_PUBREC,
    EXPIRY_NEVER,
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
    StoredWill,
    pack_message,
)

SHARDS = 2
runner = CliRunner()


def run(*args: str) -> Result:
    return runner.invoke(app, list(args))


def m(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> StoredMessage:
    return StoredMessage(topic, payload, qos, retain, NO_PROPERTIES)


def populate(d: Path) -> Path:
    """Two shards (alice, bob, carol) and three retained messages."""
    stores = [ShardStore.open(d, i, SHARDS, map_size=64 << 10) for i in range(SHARDS)]
    try:
        def batch(client: str) -> Any:
            return stores[shard_for(client, SHARDS)].batch()

        with batch("alice") as b:
            b.put_session(SessionRecord(
                "alice", 5, 3600, None,
                (StoredSubscription("home/#", 1, no_local=True, subscription_id=7),
                 StoredSubscription("$share/g/work/+", 2)),
                StoredWill("lwt/alice", b"bye", 1, False, NO_PROPERTIES, 10)))
            shared = b.add_message(StoredMessage("home/kitchen/temp", b"21.5", 1, False,
                                                 Properties(user_properties=(("u", "v"),))))
            b.enqueue("alice", shared, 1)
            b.enqueue("alice", b.add_message(m("work/x", b"\xff\x00", 2)), 2)
            b.put_inflight("alice", 5, InflightRecord(b.add_message(m("home/a", b"x", 2)), 2,
                                                      AWAIT_PUBREC))
            b.add_qos2_incoming("alice", 9)
        for client, version, at in (("bob", 4, 1_700_000_000.0), ("carol", 3, None)):
            with batch(client) as b:
                b.put_session(SessionRecord(client, version, EXPIRY_NEVER, at))
                b.enqueue(client, b.add_message(m("home/kitchen/temp", b"21.5")), 1)
    finally:
        for s in stores:
            s.close()
    r = RetainedStore.open(d, map_size=64 << 10)
    r.write([("home/kitchen/temp", m("home/kitchen/temp", b"21.5", retain=True)),
             ("home/garage/door", m("home/garage/door", b"\x00\x01", retain=True)),
             ("$SYS/uptime", m("$SYS/uptime", b"5", retain=True))])
    r.close()
    return d


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return populate(tmp_path / "data")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def test_help_lists_every_command() -> None:
    out = ok(run("--help")).stdout
    for cmd in ("stats", "sessions", "session", "retained", "messages", "dump", "check", "compact"):
        assert cmd in out


def test_stats(data_dir: Path) -> None:
    out = ok(run("stats", "--data-dir", str(data_dir))).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ENV", "SESSIONS", "SUBS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["shard-000", "shard-001", "retained", "total"]
    assert lines[-1].split()[1:8] == ["3", "2", "4", "1", "1", "5", "3"]
    data = json.loads(ok(run("stats", "--data-dir", str(data_dir), "--json")).stdout)
    assert data["shard_count"] == 2 and len(data["shards"]) == 2
    assert data["total"]["sessions"] == 3 and data["total"]["queued"] == 4
    assert data["retained"]["retained"] == 3 and data["total"]["used_bytes"] > 0


def test_sessions(data_dir: Path) -> None:
    out = ok(run("sessions", "--data-dir", str(data_dir))).stdout.splitlines()
    assert out[0].split() == ["CLIENT", "ID", "SHARD", "VERSION", "STATE", "EXPIRY", "SUBS",
                              "QUEUED", "INFLIGHT"]
    rows = {ln.split()[0]: ln for ln in out[1:]}
    assert set(rows) == {"alice", "bob", "carol"}
    assert "disconnected 2023-11-14T22:13:20Z" in rows["bob"] and "never" in rows["bob"]
    assert rows["alice"].split()[2:5] == ["5.0", "connected", "3600s"]
    data = json.loads(ok(run("sessions", "a*", "--data-dir", str(data_dir), "--json")).stdout)
    assert [(s["client_id"], s["shard"], s["queued"], s["inflight"]) for s in data] == [
        ("alice", shard_for("alice", SHARDS), 2, 1)]
    assert json.loads(ok(run("sessions", "zz*", "--data-dir", str(data_dir), "--json")).stdout) == []


def test_session_detail(data_dir: Path) -> None:
    out = ok(run("session", "alice", "--data-dir", str(data_dir))).stdout
    for text in ("client id:     alice", "MQTT 5.0", "home/#", "$share/g/work/+", "lwt/alice",
                 "queue (2):", "inflight (1):", "await PUBREC", "qos2 incoming: 9"):
        assert text in out
    data = json.loads(ok(run("session", "alice", "--data-dir", str(data_dir), "--json")).stdout)
    assert data["subscriptions"][0] == {
        "topic_filter": "home/#", "qos": 1, "no_local": True, "retain_as_published": False,
        "retain_handling": 0, "subscription_id": 7}
    assert data["will"]["payload"] == "bye" and data["will"]["delay"] == 10
    assert [q["topic"] for q in data["queue"]] == ["home/kitchen/temp", "work/x"]
    assert data["queue"][0]["properties"] == {"user_properties": [["u", "v"]]}
    assert data["queue"][1]["payload_encoding"] == "base64"
    assert base64.b64decode(data["queue"][1]["payload"]) == b"\xff\x00"
    assert data["inflight"][0]["packet_id"] == 5 and data["inflight"][0]["message"]["topic"] == "home/a"
    assert data["qos2_incoming"] == [9]


def test_unknown_session_exits_1(data_dir: Path) -> None:
    result = run("session", "nobody", "--data-dir", str(data_dir))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no session for client id 'nobody' in {data_dir}"
    assert result.stdout == ""


def test_retained(data_dir: Path) -> None:
    out = ok(run("retained", "--data-dir", str(data_dir))).stdout.splitlines()
    assert [ln.split()[0] for ln in out[1:]] == ["home/garage/door", "home/kitchen/temp"]  # no $SYS
    data = json.loads(ok(run("retained", "home/+/temp", "--data-dir", str(data_dir), "--json")).stdout)
    assert [(d["topic"], d["payload"], d["payload_encoding"]) for d in data] == [
        ("home/kitchen/temp", "21.5", "utf-8")]
    data = json.loads(ok(run("retained", "$SYS/#", "--data-dir", str(data_dir), "--json")).stdout)
    assert [d["topic"] for d in data] == ["$SYS/uptime"]
    data = json.loads(ok(run("retained", "home/garage/door", "--data-dir", str(data_dir),
                             "--json")).stdout)
    assert data[0]["payload"] == base64.b64encode(b"\x00\x01").decode()
    bad = run("retained", "a/#/b", "--data-dir", str(data_dir))
    assert bad.exit_code == 2 and bad.stderr.startswith("error: invalid topic filter")


def test_messages(data_dir: Path) -> None:
    out = ok(run("messages", "--data-dir", str(data_dir))).stdout.splitlines()
    assert len(out) == 1 + 5 and out[0].split()[:3] == ["SHARD", "MSG-ID", "REFS"]
    data = json.loads(ok(run("messages", "--topic", "home/kitchen/#", "--data-dir", str(data_dir),
                             "--json")).stdout)
    assert [(d["topic"], d["refcount"]) for d in data] == [("home/kitchen/temp", 1)] * 3


def test_dump_streams_json_lines(data_dir: Path) -> None:
    lines = ok(run("dump", "--json", "--data-dir", str(data_dir))).stdout.splitlines()
    records = [json.loads(ln) for ln in lines]
    kinds = [r["kind"] for r in records]
    assert {"meta", "session", "message", "queue", "inflight", "qos2_incoming", "retained"} == set(kinds)
    assert kinds.count("session") == 3 and kinds.count("queue") == 4 and kinds.count("retained") == 3
    meta = {(r["env"], r["key"]): r["value"] for r in records if r["kind"] == "meta"}
    assert meta[("shard-001", "shards")] == 2
    inflight = next(r for r in records if r["kind"] == "inflight")
    assert (inflight["client_id"], inflight["packet_id"], inflight["state_name"]) == (
        "alice", 5, "await PUBREC")


def test_check_ok_then_finds_unreferenced_message(data_dir: Path) -> None:
    out = ok(run("check", "--data-dir", str(data_dir))).stdout
    assert out.startswith("ok: 3 environment(s)")
    env = lmdb.open(str(data_dir / "shard-000"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put((0).to_bytes(8, "big"), pack_message(m("leak", b"x")), db=env.open_db(b"messages", txn=txn))
    env.close()
    result = run("check", "--data-dir", str(data_dir))
    assert result.exit_code == 1
    assert "message 0 is named by no queue or inflight row" in result.stdout
    assert "1 problem(s)" in result.stderr


def test_compact(data_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "compacted"
    out = ok(run("compact", "--output", str(out_dir), "--data-dir", str(data_dir))).stdout
    assert "compacted copy written to" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["retained", "shard-000", "shard-001"]
    before = json.loads(run("stats", "--data-dir", str(data_dir), "--json").stdout)["total"]
    after = json.loads(ok(run("stats", "--data-dir", str(out_dir), "--json")).stdout)["total"]
    for key in ("sessions", "queued", "inflight", "messages", "retained"):
        assert before[key] == after[key]
    again = run("compact", "--output", str(out_dir), "--data-dir", str(data_dir))
    assert again.exit_code == 2 and "not an empty directory" in again.stderr


@pytest.mark.parametrize("setup", ["missing", "empty", "garbage", "foreign"])
def test_bad_data_dir_is_one_error_line_exit_2(tmp_path: Path, setup: str) -> None:
    d = tmp_path / "d"
    if setup != "missing":
        d.mkdir()
    if setup == "garbage":
        (d / "shard-000").mkdir()
        (d / "shard-000" / "data.mdb").write_bytes(b"not lmdb" * 1000)
    if setup == "foreign":
        (d / "shard-000").mkdir()
        (d / "shard-000" / "README").write_text("hi")
    for cmd in (["stats"], ["sessions"], ["session", "x"], ["retained"], ["messages"], ["dump"],
                ["check"]):
        result = run(*cmd, "--data-dir", str(d))
        assert result.exit_code == 2, (cmd, result.output)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(d) in lines[0]
        assert result.exception is None or isinstance(result.exception, SystemExit)
