"""37: what a newcomer meets in the first hour: one-line errors for a data directory the broker
cannot use (naming who holds its lock), nothing left behind by a failed start, the run
directory inside the data directory, the port announced at every log level, a quick SIGTERM,
plain usage errors, ``-h`` and ``--version``, a quiet end when stdout closes, ``check-config``
printing TOML that reads back, ``store check --json``, ``reshard --workers 0``, progress bars
only on a terminal, one INFO line per connect and disconnect, and JSON log lines."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import mqttbytes as mb
import pytest
from conftest import REPO

from shardbroker import __version__
from shardbroker.config import load_config
from shardbroker.sharding import shard_for

pytestmark = pytest.mark.usefixtures("_only_shardbroker")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardbroker.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, env=env)


def serve(data_dir: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1",
               "--data-dir", str(data_dir), "--log-level", "warning", *args, timeout=30)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


class Server:
    """``shardbroker serve`` in a subprocess with its stderr kept, for what the fixtures hide."""

    def __init__(self, data_dir: Path, *args: str, workers: int = 1) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardbroker.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
             "--workers", str(workers), "--data-dir", str(data_dir), *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if re.search(r"\bready\b", line):
                return
            assert time.monotonic() < deadline, "no ready line"
        raise AssertionError("serve ended before ready:\n" + "\n".join(self.lines))

    def stop(self) -> float:
        """SIGTERM; the seconds until the supervisor exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stderr is not None
        rest = self.proc.stderr.read()
        self.proc.wait(10)
        took = time.monotonic() - started
        self.lines += rest.splitlines()
        return took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(*args: object, **kw: int) -> Server:
        s = Server(*args, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


# --------------------------------------------------------------------------- the data directory


def test_a_data_directory_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "data"
    path.write_text("not a directory")
    assert one_line_error(serve(path)) == f"shardbroker: data directory {path} is not a directory"


def test_a_data_directory_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "data"
    line = one_line_error(serve(path))
    assert line.startswith(f"shardbroker: cannot create data directory {path}: ") and "Errno" not in line


def test_a_data_directory_that_cannot_be_written_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: take a directory of sysfs
        path = Path("/sys/fs")
        if not path.is_dir() or os.access(path, os.W_OK) and _can_create(path):
            pytest.skip("no directory here refuses root")
    else:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
    line = one_line_error(serve(path))
    assert line.startswith(f"shardbroker: cannot lock data directory {path}: "), line
    assert not (path / "broker.lock").exists()


def _can_create(path: Path) -> bool:
    try:
        (path / "broker.lock").touch()
    except OSError:
        return False
    (path / "broker.lock").unlink()
    return True


def test_a_failed_start_leaves_no_new_data_directory(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data = tmp_path / "new" / "data"
        res = cli("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--data-dir", str(data), timeout=30)
    line = one_line_error(res)
    assert line.startswith(f"shardbroker: cannot listen on 127.0.0.1:{port}: "), line
    assert not data.exists()
    # an existing data directory is left as it was, but for its lock file
    data.mkdir(parents=True)
    (data / "keep").write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        one_line_error(cli("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                           "--data-dir", str(data), timeout=30))
    assert sorted(p.name for p in data.iterdir()) == ["broker.lock", "keep"]


def test_a_locked_data_directory_names_the_process_holding_it(make_broker):
    b = make_broker(workers=1)
    line = one_line_error(serve(b.data_dir))
    assert line == (f"shardbroker: data directory {b.data_dir} is in use by another broker or "
                    f"reshard (pid {b.pid})")
    reshard = cli("store", "reshard", "--data-dir", str(b.data_dir), "--workers", "2", "--yes")
    assert reshard.returncode == 2 and f"(pid {b.pid})" in reshard.stderr


def test_the_run_directory_lives_in_the_data_directory_and_goes_with_the_broker(make_broker):
    b = make_broker(workers=2)
    run = Path((b.data_dir / "run-dir").read_text().strip())
    assert run == (b.data_dir / "run").resolve()
    assert {"handoff-0.sock", "handoff-1.sock", "ctl-0.sock", "ctl-acceptor.sock"} <= {
        p.name for p in run.iterdir()}
    b.kill9()
    assert run.is_dir()  # what a crash leaves is inside the data directory ...
    b.start()
    assert run.is_dir() and (run / "handoff-0.sock").exists()  # ... and made anew at the next start
    assert b.stop() == 0
    assert not run.exists()


def test_a_data_directory_with_a_long_path_gets_a_run_directory_elsewhere(servers, tmp_path):
    # DATA/run/ctl-acceptor.sock would be 112 bytes, over the 107 of a socket path
    data = tmp_path / "d"
    data = tmp_path / ("d" * (90 - len(str(data)) + 1))
    assert len(str(data)) == 90
    s = servers(data)
    s.wait_ready()
    run = Path((data / "run-dir").read_text().strip())
    assert run.parent == Path(tempfile.gettempdir()) and run.name.startswith("shardbroker-")
    assert s.stop() < 5 and s.proc.returncode == 0
    assert not run.exists()


# --------------------------------------------------------------------------- logging at startup


def test_port_zero_is_announced_at_every_log_level(servers, tmp_path):
    for level in ("warning", "error"):
        s = servers(tmp_path / level, "--log-level", level, workers=2)
        s.wait_ready()
        s.stop()
        text = "\n".join(s.lines)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(mqtt\)", text)
        assert m and int(m.group(1)) > 0, text
        assert re.search(r"ready: 2 workers serving on 127\.0\.0\.1:" + m.group(1), text), text
        assert "shard 0 serving" not in text and " INFO " in text  # the two lines only
        assert len([ln for ln in s.lines if " INFO " in ln]) == 2, text


def test_a_sigterm_stops_an_idle_broker_quickly(servers, tmp_path):
    s = servers(tmp_path / "d", workers=2)
    s.wait_ready()
    took = s.stop()
    assert s.proc.returncode == 0
    assert took < 1.0, f"shutdown took {took:.2f}s"
    assert "shardbroker stopped" in s.lines[-1]


# --------------------------------------------------------------------------- the command line


def test_usage_errors_are_one_line():
    res = cli("serve", "--bogus")
    line = one_line_error(res)
    assert line.startswith("shardbroker serve: No such option: --bogus") and line.endswith(
        "(see shardbroker serve -h)")
    line = one_line_error(cli("store", "reshard", "--workers", "many"))
    assert line.startswith("shardbroker store reshard: Invalid value for '--workers'")
    assert one_line_error(cli("nonsense")).startswith("shardbroker: No such command 'nonsense'")


def test_dash_h_is_help_everywhere_and_version_is_an_option():
    for args in ([], ["serve"], ["store"], ["store", "check"], ["ctl", "stats"]):
        res = cli(*args, "-h")
        assert res.returncode == 0 and res.stdout.startswith("Usage: shardbroker"), (args, res)
        assert "-h, --help" in res.stdout
    res = cli("--version")
    assert res.returncode == 0
    assert re.fullmatch(rf"shardbroker {re.escape(__version__)} \(Python {re.escape(sys.version.split()[0])}; "
                        r"(compiled|source \(.+\))\)\n", res.stdout), res.stdout
    assert cli("version").stdout == res.stdout


def test_packaging_uses_an_spdx_license_and_run_installs_no_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
    run = (REPO / "scripts" / "run").read_text()
    assert 'EXTRAS="" scripts/install' in run
    install = (REPO / "scripts" / "install").read_text()
    assert 'EXTRAS="${EXTRAS-test,load}"' in install


def _filled_data_dir(make_broker, mqtt, uniq, retained: int) -> Path:
    """A stopped broker's data directory holding ``retained`` retained messages."""
    b = make_broker(workers=1)
    pub = mqtt(b, uniq.cid("fill"), version=4)
    base = uniq.topic("r")
    for i in range(retained):
        pub.publish(f"{base}/{i}", b"x" * 100, qos=0, retain=True)
    pub.publish(f"{base}/last", b"sync", qos=1, retain=True)
    pub.disconnect()
    assert b.stop() == 0
    return b.data_dir


def test_a_closed_stdout_ends_streaming_commands_quietly(make_broker, mqtt, uniq):
    data = _filled_data_dir(make_broker, mqtt, uniq, 1500)
    for args in (["store", "dump"], ["store", "retained", "--json"], ["settings"], ["default-config"],
                 ["store", "retained"]):
        if args[0] == "store":
            args = [*args, "--data-dir", str(data)]
        proc = subprocess.Popen([sys.executable, "-m", "shardbroker.cli.main", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # like ``| head -1``
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(30)
        assert err == b"", (args, err)
        assert code in (0, 1), (args, code)


def test_check_config_prints_toml_that_reads_back(tmp_path):
    original = tmp_path / "broker.toml"
    original.write_text(
        '[server]\nworkers = 3\nlog_format = "json"\ndata_dir = "/var/lib/q\\"uote"\n'
        '[limits]\nconnect_timeout = 2.5\nqueue_qos0 = true\n'
        '[acl]\ndeny_publish = ["a/#", "b/+/c"]\n'
        '[auth]\nallow_anonymous = "auto"\n'
        '[[listener]]\ntype = "mqtt"\nport = 1999\n'
        '[[listener]]\ntype = "ws"\nport = 0\npath = "/x"\ntrusted_proxies = ["10.0.0.0/8"]\n'
        'allow_anonymous = false\n')
    res = cli("check-config", str(original))
    assert res.returncode == 0, res.stderr
    doc = tomllib.loads(res.stdout)  # all of it, the closing "ok" line included (a comment)
    assert doc["server"]["workers"] == 3 and doc["acl"]["deny_publish"] == ["a/#", "b/+/c"]
    assert res.stdout.splitlines()[-1] == f"# {original}: ok (3 workers)"
    printed = tmp_path / "printed.toml"
    printed.write_text(res.stdout)
    assert load_config(printed) == load_config(original)
    assert cli("check-config", str(printed)).stdout.replace(str(printed), str(original)) == res.stdout


def test_store_check_json_and_progress_only_when_asked(make_broker, mqtt, uniq):
    data = _filled_data_dir(make_broker, mqtt, uniq, 50)
    plain = cli("store", "check", "--data-dir", str(data))
    assert plain.returncode == 0 and plain.stderr == ""
    assert plain.stdout == f"ok: 2 environment(s) in {data}, no problems\n"
    res = cli("store", "check", "--json", "--data-dir", str(data))
    assert res.returncode == 0 and res.stderr == ""
    assert json.loads(res.stdout) == {"data_dir": str(data), "environments": 2, "ok": True, "problems": []}
    # the bar, forced on a pipe: drawn on stderr, stdout as without it
    forced = cli("store", "check", "--data-dir", str(data), env=dict(os.environ, SHARDBROKER_PROGRESS="1"))
    assert forced.returncode == 0 and forced.stdout == plain.stdout
    m = re.search(r"check .*?(\d+)/(\d+)", forced.stderr)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) > 50, forced.stderr
    off = cli("store", "check", "--no-progress", "--data-dir", str(data),
              env=dict(os.environ, SHARDBROKER_PROGRESS="1"))
    assert off.stdout == plain.stdout and off.stderr == ""
    out = data.parent / "compacted"
    compact = cli("store", "compact", "--output", str(out), "--data-dir", str(data),
                  env=dict(os.environ, SHARDBROKER_PROGRESS="1"))
    assert compact.returncode == 0 and "compacted copy written" in compact.stdout
    assert "compact" in compact.stderr and (out / "retained" / "data.mdb").exists()


def _offline_pair(prefix: str) -> tuple[str, str]:
    """Two client ids on shard 0 of 1 that go to different shards of 2."""
    ids = {}
    for i in range(1000):
        ids.setdefault(shard_for(f"{prefix}{i}", 2), f"{prefix}{i}")
        if len(ids) == 2:
            return ids[0], ids[1]
    raise AssertionError("no pair")


def test_reshard_takes_0_as_one_per_core_and_explains_the_message_count(make_broker, mqtt, uniq):
    b = make_broker(workers=1)
    topic = uniq.topic()
    a, c = _offline_pair(uniq.prefix("rs"))
    for cid in (a, c):
        s = mqtt(b, cid, version=4, clean=False)
        s.subscribe(topic, 1)
        s.disconnect()
    pub = mqtt(b, uniq.cid("pub"), version=4)
    pub.publish(topic, b"one message, two queues", qos=1)
    pub.disconnect()
    assert b.stop() == 0
    cores = max(1, os.cpu_count() or 1)
    res = cli("store", "reshard", "--workers", "0", "--yes", "--data-dir", str(b.data_dir),
              env=dict(os.environ, SHARDBROKER_PROGRESS="1"))
    assert res.returncode == 0, res.stderr
    assert f"--workers 0: one per core, {cores}" in res.stderr
    if cores == 1:
        assert "nothing to do" in res.stdout
        return
    assert f"resharded {b.data_dir} from 1 to {cores} shards" in res.stdout
    assert re.search(r"reshard .*?2/2", res.stderr), res.stderr  # the bar: 2 sessions
    if cores == 2:  # the two subscribers are apart now: their message is stored twice
        assert "2 messages stored where there were 1: a message queued for" in res.stdout
    b.workers = cores
    b.start()
    for cid in (a, c):
        s = mqtt(b, cid, version=4, clean=False)
        assert s.recv_publish().payload == b"one message, two queues"


# --------------------------------------------------------------------------- connect and disconnect lines


def test_every_connect_and_disconnect_is_one_info_line_with_its_reason(make_broker, mqtt, uniq):
    b = make_broker(workers=1)

    def line_for(cid: str, what: str) -> str:
        return b.wait_for_log(rf"INFO shardbroker\.clients\[\d+\]: client {re.escape(cid)} {what}")

    bye, gone, quiet, rude, old, last = (uniq.cid(t) for t in ("bye", "gone", "quiet", "rude", "old", "last"))
    c = mqtt(b, bye, version=5)
    line = line_for(bye, "connected from")
    assert re.search(r"connected from 127\.0\.0\.1:\d+ \(MQTT 5\.0, shard 0, new session\)", line)
    c.disconnect()
    assert "client sent DISCONNECT [0x00 " in line_for(bye, "disconnected from 127.0.0.1:")

    mqtt(b, gone, version=4).abort()
    assert "(MQTT 3.1.1): connection lost (closed without DISCONNECT)" in line_for(gone, "disconnected")

    mqtt(b, quiet, version=4, keepalive=1)  # then silent
    assert "keepalive 1s expired" in b.wait_for_log(rf"client {quiet} disconnected", timeout=5)

    r = mqtt(b, rude, version=5)
    r.send(mb.connect(rude, version=5))  # a second CONNECT: a protocol error
    assert "second CONNECT [0x82 protocol error]" in line_for(rude, "disconnected")

    mqtt(b, old, version=4)
    mqtt(b, old, version=4)
    assert "session taken over" in line_for(old, "disconnected")

    mqtt(b, last, version=5)
    line_for(last, "connected")
    assert b.stop() == 0
    assert "server shutting down" in line_for(last, "disconnected")
    for cid in (bye, gone, quiet, rude, last):
        assert len(re.findall(rf"client {cid} disconnected", b.log_text())) == 1, cid


def test_json_log_lines_from_every_process(make_broker, mqtt, uniq):
    b = make_broker(workers=2, config='[server]\nlog_format = "json"\n[limits]\nstrict_utf8 = false\n')
    cid = uniq.cid("js") + "\x1b[31m"
    mqtt(b, cid, version=4).disconnect()
    b.wait_for_log(r'"msg": "client .* disconnected')
    assert b.stop() == 0
    records = [json.loads(line) for line in b.lines if not line.startswith("--- test harness")]
    assert {r["logger"] for r in records} >= {"shardbroker.process.supervisor", "shardbroker.process.acceptor",
                                              "shardbroker.process.worker", "shardbroker.announce"}
    assert len({r["pid"] for r in records}) == 4  # supervisor, acceptor, 2 workers
    for r in records:
        assert {"ts", "level", "logger", "pid", "msg"} <= r.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])
    escaped = cid.replace("\x1b", "\\x1b")
    connect = [r for r in records if r["msg"].startswith(f"client {escaped} connected")]
    disconnect = [r for r in records if r["msg"].startswith(f"client {escaped} disconnected")]
    assert len(connect) == len(disconnect) == 1
    assert connect[0]["client_id"] == escaped and connect[0]["version"] == "3.1.1"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", connect[0]["address"]) and "reason" not in connect[0]
    assert disconnect[0]["reason"].startswith("client sent DISCONNECT")
    assert not any("\x1b" in line for line in b.lines)


def test_log_format_option_and_announce_lines_in_json(servers, tmp_path):
    s = servers(tmp_path / "d", "--log-format", "json", "--log-level", "warning")
    s.wait_ready()
    s.stop()
    records = [json.loads(line) for line in s.lines]
    assert [r["msg"].split(":")[0] for r in records] == ["listening on 127.0.0.1", "ready"]
    bad = cli("serve", "--log-format", "xml", "--data-dir", str(tmp_path / "x"))
    assert one_line_error(bad).startswith("shardbroker: configuration error: server.log_format: must be one of")
