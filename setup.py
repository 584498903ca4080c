"""Build: everything is in pyproject.toml, except the optional mypyc compilation of the hot
path (``shardbroker/_compiled.py`` says which modules and why).

The extensions are optional: without a C compiler (or without mypyc) the build goes on and
the package runs from source. ``SHARDBROKER_COMPILE=0`` skips them on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from shardbroker import _compiled  # plain stdlib; nothing else of the package


class BuildExt(build_ext):
    """Builds the extensions, then writes the stamp saying whether they were built."""

    def run(self) -> None:
        if self.inplace:  # an editable install: what an earlier build left must not shadow a source
            for stale in [*ROOT.glob("*__mypyc.*.so"), *(ROOT / "shardbroker").rglob("*.so")]:
                stale.unlink()
        super().run()
        if not self.extensions:
            return
        built = all(os.path.exists(self.get_ext_fullpath(ext.name)) for ext in self.extensions)
        target = ROOT / "shardbroker" if self.inplace else Path(self.build_lib) / "shardbroker"
        _compiled.write_stamp(target, built, source_dir=ROOT / "shardbroker")
        if not built:
            print("shardbroker: the mypyc extensions were not built; running from source", file=sys.stderr)


def ext_modules() -> list:
    if os.environ.get("SHARDBROKER_COMPILE", "1") == "0":
        return []
    if set(sys.argv[1:2]) & {"egg_info", "dist_info"}:
        return []  # metadata only (the build backend's first steps): nothing to compile
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("shardbroker: mypyc is not available; running from source", file=sys.stderr)
        return []
    files = [str(path.relative_to(ROOT)) for _, path in _compiled.sources(ROOT / "shardbroker")]
    try:
        # Every third-party module is typed as Any in the build, whether or not the build can
        # see it installed: the compiled code is then the same on every machine, and it checks
        # no library's return values against a stub that may be wrong (``_compiled.py``).
        flags = ["--no-site-packages", "--ignore-missing-imports", "--follow-imports=silent",
                 "--no-warn-unused-ignores", "--no-warn-return-any"]
        extensions = mypycify([*flags, *files], opt_level="3")
    except (Exception, SystemExit) as exc:  # noqa: BLE001  (any failure: build from source; mypyc exits on type errors)
        print(f"shardbroker: mypyc could not compile ({exc}); running from source", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no C compiler: a warning, and the package runs from source
    return extensions


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
