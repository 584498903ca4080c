"""The fuzz targets in the test suite: a short, bounded run of each under atheris.

Each target runs as its own process for ``SECONDS`` from its committed seed corpus (copied,
so that what the run adds stays out of the tree). A crash, a hang past ``-timeout`` or
running out of ``-rss_limit_mb`` fails the test with the input in hex, to become a test in
``tests/unit/test_fuzz_regressions.py``. The run must also have executed ``MIN_RUNS``
inputs with coverage feedback, so a target that stopped exercising the code fails too.
These skip only where atheris cannot be imported (pyproject's marker: no wheel there).

Without atheris: the committed corpus is what ``seeds.py`` builds, and every seed passes
its target's checks and reads as it is meant to (a CONNECT, a packet per seed...).

Longer by hand, for instance ten minutes of the codec target (``mkdir -p /tmp/codec-corpus``
first: new inputs go there): ``python tests/fuzz/fuzz_codec.py -max_total_time=600 /tmp/codec-corpus tests/fuzz/corpus/codec``
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fuzz_acceptor_input
import fuzz_codec
import pytest
import seeds

HERE = Path(__file__).resolve().parent
TARGETS = {"codec": "fuzz_codec.py", "acceptor_input": "fuzz_acceptor_input.py"}
SECONDS = 20  # per target: the fuzz step costs well under a minute
MIN_RUNS = 1_000  # each target runs thousands per second on a loaded CI core
MIN_COVERAGE = 150  # edges; a run without instrumentation sees a handful


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform (pyproject.toml)")
    corpus = tmp_path / "corpus"
    shutil.copytree(seeds.CORPUS / target, corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [sys.executable, str(HERE / TARGETS[target]), f"-max_total_time={SECONDS}", "-timeout=10",
           "-rss_limit_mb=1024", "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus)]
    # atheris instruments Python bytecode: the codec is fuzzed from source, not compiled
    env = {**os.environ, "SHARDBROKER_PURE_PYTHON": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=SECONDS + 120,
                         check=False, env=env)
    log = res.stdout + res.stderr
    found = sorted(artifacts.iterdir())
    if res.returncode or found:
        inputs = "\n".join(f"{p.name}: {p.read_bytes().hex()}" for p in found)
        report = log[log.find("=== "):] if "=== " in log else log[-4000:]
        report = report.split("\nINFO: Instrumenting", 1)[0]
        pytest.fail(f"{target}: the fuzzer failed (exit {res.returncode}); input (hex, with the "
                    f"two control bytes first):\n{inputs}\n{report[:6000]}", pytrace=False)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    coverage = re.findall(r"\bcov: (\d+)", log)
    assert runs and int(runs.group(1)) >= MIN_RUNS, log[-3000:]
    assert coverage and int(coverage[-1]) >= MIN_COVERAGE, log[-3000:]
    print(f"{target}: {runs.group(1)} inputs in {SECONDS} s, coverage {coverage[-1]} edges")


def test_committed_corpus_is_what_seeds_builds() -> None:
    for target, build in seeds.TARGETS.items():
        expected = {seeds.file_name(name, data): data for name, data in build().items()}
        folder = seeds.CORPUS / target
        committed = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert committed == expected, f"run python tests/fuzz/seeds.py to rebuild {folder}"


def test_codec_seeds_read_as_packets() -> None:
    for name, data in seeds.codec_seeds().items():
        outcome = fuzz_codec.check(data)
        assert outcome is not None, name
        packets, error, pending = outcome
        if name == "v4-too-large":
            assert not packets and error is not None and error[0] == 0x95, (name, outcome)
        else:
            assert packets and error is None and not pending, (name, outcome)


def test_acceptor_seeds_reach_the_connect() -> None:
    refused = {"tcp-connect6", "ws-text-then-close"}  # level 6; a text frame fails the WebSocket
    for name, data in seeds.acceptor_seeds().items():
        connect = fuzz_acceptor_input.check(data)
        assert (connect is None) == (name in refused), (name, connect)
