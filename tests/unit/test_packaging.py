"""contrib/ and the Dockerfile: the systemd unit is valid (``systemd-analyze verify`` where it
is installed) and fits the broker, the example configuration loads, the image runs as a user
with the data directory as its volume. (No image is built here.)"""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardbroker.config import load_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "shardbroker.service"
EXAMPLE = REPO / "contrib" / "shardbroker.toml"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_is_a_hardened_notify_service_that_reloads_with_sighup():
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["User"] == "shardbroker" and service["StateDirectory"] == "shardbroker"
    assert service["KillMode"] == "mixed"  # SIGTERM to the supervisor, which stops its children in order
    assert service["RestartPreventExitStatus"] == "2"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}.items():
        assert service[key] == value, key
    argv = shlex.split(service["ExecStart"])
    assert argv[1:3] == ["serve", "--config"]
    data_dir = argv[argv.index("--data-dir") + 1]
    assert data_dir == "/var/lib/" + service["StateDirectory"] and data_dir in service["ReadWritePaths"].split()
    example = load_config(EXAMPLE)
    # the supervisor's own deadline ends before systemd's SIGKILL
    assert example.server.shutdown_timeout < float(service["TimeoutStopSec"])
    assert example.server.data_dir == data_dir


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    # verify checks that ExecStart names an executable: point it at this installation
    unit = tmp_path / "shardbroker.service"
    installed = Path(sys.executable).parent / "shardbroker"
    unit.write_text(UNIT.read_text().replace("/opt/shardbroker/bin/shardbroker", str(installed)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def _dockerfile() -> list[tuple[str, str]]:
    text = REPO.joinpath("Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_as_a_user_with_the_data_directory_as_a_volume():
    steps = _dockerfile()
    assert [rest for word, rest in steps if word == "FROM"] == ["python:3.11-slim AS build", "python:3.11-slim"]
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in steps and ("EXPOSE", "1883") in steps
    cmd = json.loads(next(rest for word, rest in steps if word == "CMD"))
    assert cmd[:2] == ["shardbroker", "serve"] and cmd[cmd.index("--data-dir") + 1] == "/data"
    copied = [rest.split()[0] for word, rest in steps if word == "COPY" and not rest.startswith("--from=")]
    assert all((REPO / src).exists() for src in copied), copied
    # the build stage has what compiles the hot path: setup.py and a C compiler
    assert any("setup.py" in rest.split() for word, rest in steps if word == "COPY")
    assert any("gcc" in rest.split() for word, rest in steps if word == "RUN")
    assert cmd[cmd.index("--config") + 1] in [rest.split()[1] for word, rest in steps if word == "COPY"]
