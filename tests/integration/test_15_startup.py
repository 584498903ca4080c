"""15: refusing to start, with one clear line and nothing overwritten: bad configuration,
a foreign or damaged data directory, a data directory made for another worker count,
a data directory already in use, a store left marked by an interrupted move of virtual
shards (until ``store reshard`` finishes the move)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
         "--log-level", "warning", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_bad_setting_is_one_line_naming_it(tmp_path):
    res = serve("--data-dir", str(tmp_path / "d"), "--workers", "-1")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "shardbroker: configuration error: server.workers: must be an integer between 0 and 256, got -1"
    ]


def test_bad_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[limits]\nmax_packet_sise = 10\n")
    res = serve("--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.max_packet_sise" in lines[0] and "limits.max_packet_size" in lines[0]


def test_foreign_data_file_is_refused_and_untouched(tmp_path):
    shard = tmp_path / "d" / "shard-000"
    shard.mkdir(parents=True)
    junk = b"this is not an LMDB file" * 100
    (shard / "data.mdb").write_bytes(junk)
    res = serve("--data-dir", str(tmp_path / "d"), "--workers", "1")
    assert res.returncode != 0
    assert "not an LMDB data file" in res.stderr
    assert "Traceback" not in res.stderr
    assert (shard / "data.mdb").read_bytes() == junk


@pytest.mark.slow
def test_other_worker_count_is_refused_before_any_write(tmp_path):
    data = tmp_path / "d"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
         "--workers", "2", "--data-dir", str(data), "--log-level", "info"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "ready" in line:
                break
        # a second broker on the same data directory is refused while the first runs
        res = serve("--data-dir", str(data), "--workers", "2")
        assert res.returncode != 0 and "in use by another broker" in res.stderr
    finally:
        proc.terminate()
        proc.wait(15)
    before = sorted(p.name for p in data.iterdir())
    res = serve("--data-dir", str(data), "--workers", "3")
    assert res.returncode == 2
    assert "was created with 2 workers, not 3" in res.stderr
    assert sorted(p.name for p in data.iterdir()) == before  # no shard-002 created


def test_the_open_files_limit_is_raised_to_the_hard_limit(tmp_path):
    """A soft limit of 256 would stop a worker at about 250 clients: the broker takes the hard one."""
    import resource

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    proc = subprocess.Popen([sys.executable, "-m", "shardbroker.cli.main", "serve", "--port", "0", "--workers", "1",
                             "--data-dir", str(tmp_path / "data")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=low)  # noqa: PLW1509 - no threads in this test process's child setup
    try:
        lines = []
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if "ready:" in line:
                break
        assert any("open files limit raised from 256 to 4096" in line for line in lines), "".join(lines)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    finally:
        proc.terminate()
        proc.wait(timeout=15)


class _Killed(BaseException):
    """Stands for a kill in the middle of a move: nothing in the move catches it."""


def test_a_store_left_by_an_interrupted_move_is_refused_until_recovered(tmp_path, monkeypatch):
    from shardbroker.storage import vshards
    from shardbroker.storage.lmdb_store import ShardStore, vshard_of
    from shardbroker.storage.records import SessionRecord

    data = tmp_path / "d"
    stores = [ShardStore.open(data, i, 2) for i in range(2)]
    with stores[0].batch() as b:
        b.put_session(SessionRecord("mover", 5, 3600, 1.75e9))

    def killed(*_a):
        raise _Killed

    monkeypatch.setattr(vshards, "_finish", killed)  # after the copy, before the source delete
    with pytest.raises(_Killed):
        vshards.move_vshards(stores[0], stores[1], [vshard_of("mover")])
    for s in stores:
        s.close()
    res = serve("--data-dir", str(data), "--workers", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "a move of virtual shards that did not finish marks this store" in res.stderr
    assert f"shardbroker store reshard --data-dir {data} --workers 2" in res.stderr
    done = subprocess.run(
        [sys.executable, "-m", "shardbroker.cli.main", "store", "reshard", "--data-dir", str(data),
         "--workers", "2", "--yes"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "finished an interrupted move from shard-000 to shard-001" in done.stderr
    with ShardStore.open(data, 0, 2, readonly=True) as s0, ShardStore.open(data, 1, 2, readonly=True) as s1:
        assert s0.session("mover") is None and s1.session("mover") is not None
        assert s0.check() == [] and s1.check() == []
