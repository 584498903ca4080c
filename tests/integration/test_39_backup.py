"""39: ``shardbroker store backup`` while the broker runs, and a broker started from the copy."""

from __future__ import annotations

import subprocess
import sys

from conftest import assert_no_publish, client_id_on_shard

CLI = [sys.executable, "-m", "shardbroker.cli.main"]


def _backup(data_dir, dest) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "store", "backup", str(dest), "--data-dir", str(data_dir)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_a_hot_backup_starts_a_broker_with_the_sessions_and_retained_messages(make_broker, mqtt, uniq):
    b = make_broker(workers=2)
    topic = uniq.topic()
    # a persistent session on each shard, offline, with messages queued for it
    sleepers = [client_id_on_shard(uniq.cid("s"), shard, 2) for shard in (0, 1)]
    for cid in sleepers:
        s = mqtt(b, cid, version=4, clean=False)
        assert s.subscribe(topic, 1) == [1]
        s.disconnect()
    pub = mqtt(b, uniq.cid("p"), version=4)
    pub.publish(topic + "/state", b"retained before", qos=1, retain=True)
    for i in range(3):
        pub.publish(topic, f"queued {i}".encode(), qos=1)
    copy = make_broker(workers=2, start=False, name="restored")
    done = _backup(b.data_dir, copy.data_dir)  # an empty directory will do
    assert done.returncode == 0, done.stderr
    assert "shard-000" in done.stdout and "shard-001" in done.stdout and "retained" in done.stdout
    pub.publish(topic, b"after the backup", qos=1)  # in the original only
    assert b.alive()
    b.stop()

    copy.start()
    for cid in sleepers:
        s = mqtt(copy, cid, version=4, clean=False)
        assert s.connack.session_present
        assert [m.payload for m in s.recv_publishes(3)] == [b"queued 0", b"queued 1", b"queued 2"]
        assert_no_publish(s, 0.3)
    fresh = mqtt(copy, uniq.cid("f"), version=5)
    assert fresh.subscribe(topic + "/#", 1) == [1]
    m = fresh.recv_publish()
    assert (m.topic, m.payload, m.retain) == (topic + "/state", b"retained before", True)


def test_backup_refuses_a_directory_that_is_not_empty(make_broker, tmp_path):
    b = make_broker(workers=1)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "something").write_text("x")
    done = _backup(b.data_dir, tmp_path / "dest")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'dest'}: exists and is not an empty directory"
    done = _backup(tmp_path / "nothing", tmp_path / "dest2")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
