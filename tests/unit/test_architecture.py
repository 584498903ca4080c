"""The architecture's boundaries: the import contracts of ``pyproject.toml``, and the layout.

``storage/`` and ``cli/`` sit at the top of the repository and install as
``shardbroker.storage`` and ``shardbroker.cli`` (``[tool.setuptools.package-dir]``).
In the source tree ``shardbroker/storage`` and ``shardbroker/cli`` are symbolic links
to them, so that tools which read the package from disk (``lint-imports``, ``mypy``)
see the layout an install makes. The contracts are checked by the real tool.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _lint_imports() -> Path:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the test extra (pip install -e '.[test]')")
    return exe


def test_import_contracts_hold() -> None:
    res = subprocess.run([str(_lint_imports()), "--no-cache", str(REPO / "pyproject.toml")],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_contracts_name_every_boundary() -> None:
    """The boundaries the architecture promises are all declared (a contract can't be dropped quietly)."""
    names = {c["name"] for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
    for needed in ("protocol imports nothing of the project", "storage imports no broker",
                   "the broker core does no I/O and reads no clock: no socket, ssl, zmq, lmdb, asyncio or time",
                   "typer only in cli", "zmq is imported by the bus alone", "lmdb is imported by the store alone",
                   "etcd3gw is imported by cluster.etcd alone",
                   "the cluster's placement, map, fence and grants are pure: no I/O, no clock"):
        assert needed in names


def test_only_shardbroker_is_installed() -> None:
    """Every installed package sits inside the ``shardbroker`` namespace."""
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert all(p == "shardbroker" or p.startswith("shardbroker.") for p in packages)
    for folder in ("storage", "cli"):
        assert PACKAGE_DIRS[f"shardbroker.{folder}"] == folder


@pytest.mark.parametrize("folder", ["storage", "cli"])
def test_the_source_tree_shows_the_installed_layout(folder: str) -> None:
    link = REPO / "shardbroker" / folder
    assert link.is_symlink() and os.readlink(link) == f"../{folder}"
    assert link.resolve() == (REPO / folder).resolve()


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("tree", ["shardbroker", "storage", "cli", "tests", "loadtests"])
def test_nothing_imports_the_source_folders_by_their_own_name(tree: str) -> None:
    """``storage`` and ``cli`` exist only as ``shardbroker.storage`` and ``shardbroker.cli``:
    importing the folders by their own name would load a second copy of each module."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / tree).rglob("*.py")
                 if {"storage", "cli"} & _top_level_imports(p)
                 or any(f'"-m", "{name}.' in p.read_text() for name in ("storage", "cli"))]
    assert offenders == []
