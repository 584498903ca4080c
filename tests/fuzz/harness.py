"""What the fuzz targets share: coverage instrumentation when run as a fuzzer, the run
itself, and deterministic split points for a byte stream.

A target module defines ``check(data: bytes) -> None``, which raises ``AssertionError`` (or
lets an unexpected exception escape) when a property breaks. Run as a script, a target
instruments the project's modules as it imports them and hands ``check`` to atheris
(libFuzzer options and corpus directories on the command line); imported, as by
``test_fuzz.py``, it is plain Python and atheris is not needed.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator

#: Top-level packages whose code the fuzzer gets coverage feedback from.
INSTRUMENTED = ("shardbroker", "websockets")


@contextlib.contextmanager
def instrumented(as_fuzzer: bool) -> Iterator[None]:
    """Around a target's imports: add coverage instrumentation when it runs as the fuzzer."""
    if not as_fuzzer:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        yield


def fuzz(check: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Run ``check`` under atheris until the libFuzzer options in ``argv`` say stop."""
    import atheris

    atheris.Setup(list(sys.argv if argv is None else argv), check)
    atheris.Fuzz()


def chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at points chosen by ``seed`` (0: every byte alone), in order."""
    if not seed:
        return [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 5, 8, 64, 1000))
        out.append(data[pos:pos + step])
        pos += step
    return out
