"""The compiled hot path is used only when it was built from the sources beside it
(``shardbroker/_compiled.py``); otherwise every compiled module loads from source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardbroker import _compiled

PACKAGE = Path(_compiled.__file__).resolve().parent

_PROBE = """
import json, sys
import shardbroker
from shardbroker import _compiled
files = {}
for name, _ in _compiled.sources():
    __import__(name)
    files[name] = sys.modules[name].__file__
print(json.dumps({"state": _compiled.state(), "files": files}))
"""


def _probe(**env: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_the_list_names_the_hot_path() -> None:
    names = [name for name, _ in _compiled.sources()]
    for hot in ("shardbroker.core.broker", "shardbroker.core.delivery", "shardbroker.protocol.codec",
                "shardbroker.peer.messages", "shardbroker.storage.records", "shardbroker.storage.batch"):
        assert hot in names
    assert all(path.is_file() and path.suffix == ".py" for _, path in _compiled.sources())
    assert not any(name.endswith("__init__") for name in names)


def test_the_digest_follows_every_byte_of_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "shardbroker"
    shutil.copytree(PACKAGE, copy, symlinks=False,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    before = _compiled.digest(copy)
    assert before == _compiled.digest(PACKAGE)
    _compiled.write_stamp(copy, built=True)
    assert _compiled.build_tried(copy)
    delivery = copy / "core" / "delivery.py"
    delivery.write_bytes(delivery.read_bytes() + b"\n")
    assert _compiled.digest(copy) != before
    assert not _compiled.build_tried(copy)


def test_pure_python_on_request_loads_every_compiled_module_from_source() -> None:
    got = _probe(SHARDBROKER_PURE_PYTHON="1")
    files = got["files"]
    assert isinstance(files, dict)
    assert all(str(f).endswith(".py") for f in files.values()), files
    assert str(got["state"]).startswith("source")


def test_what_runs_matches_the_build() -> None:
    """Built for these sources: all compiled; otherwise all from source, with the reason."""
    got = _probe(SHARDBROKER_PURE_PYTHON="")
    files = got["files"]
    assert isinstance(files, dict)
    compiled = [f for f in files.values() if not str(f).endswith(".py")]
    if got["state"] == "compiled":
        assert len(compiled) == len(files), files
    else:
        assert compiled == [], files
        assert str(got["state"]).startswith("source ("), got["state"]
    if os.environ.get("CI") == "true" and shutil.which("cc") and _compiled.build_tried():
        # CI builds with a C compiler: the suite must have run the compiled code
        assert got["state"] == "compiled", got["state"]


@pytest.mark.parametrize("argv", [["--version"], ["version"]])
def test_version_says_which(argv: list[str]) -> None:
    exe = Path(sys.executable).with_name("shardbroker")
    out = subprocess.run([str(exe), *argv], capture_output=True, text=True, check=True).stdout
    assert ("; compiled)" in out) or ("; source (" in out), out
