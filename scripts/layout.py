"""Lay the package out as an install does: ``python scripts/layout.py DIR``.

``storage/`` and ``cli/`` sit at the top of the repository and install as
``shardbroker.storage`` and ``shardbroker.cli`` (``[tool.setuptools.package-dir]`` in
``pyproject.toml``). Tools that read a package from disk (``lint-imports``, ``mypy``)
need that layout: this copies each mapped folder to where an install puts it.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lay_out(into: Path) -> None:
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):
        shutil.copytree(REPO / folder, into.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/layout.py DIR")
    lay_out(Path(sys.argv[1]))
