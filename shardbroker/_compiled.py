"""The modules compiled to C with mypyc, and whether this process may use them.

The hot path (the sans-I/O core, the MQTT codec, the peer messages and the store records) is
plain typed Python. When the package is built with a C compiler at hand, ``setup.py`` also
compiles those modules with mypyc into extension modules that sit beside the sources and are
imported in their place: the same code, two to three times less CPU per message in the
workers (``docs/BENCHMARKS.md``). Without a compiler, or with ``SHARDBROKER_COMPILE=0`` at
install, the build skips them and everything runs from source.

The source stays the truth. The build writes the digest of the sources it compiled to
``_compiled.stamp``; at import (``shardbroker/__init__.py``) the compiled modules are used only
if that digest is the digest of the sources now beside them. After an edit or a checkout of
another commit they are all set aside together (compiled modules call each other directly, so
one fresh source among stale compiled modules would not be used), a finder loads every one of
them from source, and ``state()`` says why. ``SHARDBROKER_PURE_PYTHON=1`` does the same on
purpose. ``scripts/install`` compiles again when the stamp does not match.

``shardbroker --version`` and the broker's first log line say which it runs;
``build_tried()`` tells ``scripts/install`` whether to build again.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

PACKAGE_DIR: Final = Path(__file__).resolve().parent
STAMP: Final = "_compiled.stamp"  # beside this file: "<digest> built" or "<digest> not built"
PURE_ENV: Final = "SHARDBROKER_PURE_PYTHON"

# Whole packages (but their __init__) and single modules, relative to the shardbroker package.
# Only code that calls the project and the builtins: compiled, a call into a library whose type
# stub is wrong about what it returns (uvloop's remove_reader returns None, typeshed says bool)
# becomes a TypeError, so the I/O shell (processes, transports, the bus) stays interpreted.
_PACKAGES: Final = ("core", "protocol")
_MODULES: Final = ("peer/messages.py", "storage/records.py", "storage/batch.py")


def sources(package_dir: Path = PACKAGE_DIR) -> list[tuple[str, Path]]:
    """(module name, source path) of every compiled module, in a fixed order."""
    files: list[Path] = []
    for pkg in _PACKAGES:
        files.extend(p for p in sorted((package_dir / pkg).glob("*.py")) if p.name != "__init__.py")
    files.extend(package_dir / rel for rel in _MODULES)
    out = []
    for path in files:
        rel = path.relative_to(package_dir).with_suffix("")
        out.append(("shardbroker." + ".".join(rel.parts), path))
    return out


def digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the names and bytes of the compiled modules' sources."""
    h = hashlib.sha256()
    for name, path in sources(package_dir):
        h.update(name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def write_stamp(package_dir: Path, built: bool, source_dir: Path | None = None) -> None:
    """Record that the sources in ``source_dir`` (default: ``package_dir``) were compiled
    (``built``) or that compiling them failed, in ``package_dir`` (``setup.py``)."""
    text = f"{digest(source_dir or package_dir)} {'built' if built else 'not built'}\n"
    (package_dir / STAMP).write_text(text)


def _read_stamp(package_dir: Path) -> tuple[str, bool] | None:
    try:
        fields = (package_dir / STAMP).read_text().split(maxsplit=1)
    except OSError:
        return None
    if len(fields) != 2:
        return None
    return fields[0], fields[1].strip() == "built"


def _has_extensions(package_dir: Path) -> bool:
    return any(
        path.with_name(path.stem + suffix).exists()
        for _, path in sources(package_dir)[:1]
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their ``.py`` files, ahead of the extension modules."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or sys.path:
            candidate = os.path.join(entry, leaf)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


_state = "not decided"


def state() -> str:
    """``compiled``, or ``source (...)`` with the reason."""
    return _state


def compiled() -> bool:
    return _state == "compiled"


def decide(package_dir: Path = PACKAGE_DIR) -> str:
    """Use the compiled modules, or put ``_FromSource`` first; once per process (at import)."""
    global _state
    if _state != "not decided":
        return _state
    if not _has_extensions(package_dir):
        _state = "source (not compiled: no C compiler or mypyc at install, or SHARDBROKER_COMPILE=0)"
        return _state
    stamp = _read_stamp(package_dir)
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        reason = f"{PURE_ENV} is set"
    elif stamp is None or not stamp[1]:
        reason = "the last install did not compile"
    elif stamp[0] != digest(package_dir):
        reason = "the sources changed after the build; scripts/install compiles them again"
    else:
        _state = "compiled"
        return _state
    # just ahead of the path finder, so that hooks placed before it (a coverage tracer) see
    # the source modules this finder returns
    finder = _FromSource(frozenset(name for name, _ in sources(package_dir)))
    at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), 0)
    sys.meta_path.insert(at, finder)
    _state = f"source ({reason})"
    return _state


def build_tried(package_dir: Path = PACKAGE_DIR) -> bool:
    """Whether a build was tried for the sources as they are now (compiled or not)."""
    stamp = _read_stamp(package_dir)
    return stamp is not None and stamp[0] == digest(package_dir)
