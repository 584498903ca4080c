"""Crash test, CI size: acknowledged QoS 1/2 messages survive SIGKILL of a worker, the
acceptor and the whole process tree (README, "Durability"; mode fsync).

The harness is ``loadtests/crash.py`` (``python -m loadtests.crash`` runs the long
version): persistent subscribers (3.1.1 and 5.0, some staying connected, some coming
and going) subscribed QoS 2 to ``crash/#``; QoS 1 and QoS 2 publishers on other shards
recording what was acknowledged (PUBACK / PUBREC); a SIGKILL per cycle; at the end every
acknowledged message must have reached every subscriber, QoS 2 exactly once, and each
publisher's messages in order. ``CRASH_SEED`` replays a run's random choices (the
timing of a crash cannot be replayed).
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import skip_unless_shardbroker

from loadtests import crash


@pytest.mark.slow
def test_acknowledged_messages_survive_sigkill_of_any_process(tmp_path):
    skip_unless_shardbroker()
    seed = int(os.environ["CRASH_SEED"]) if os.environ.get("CRASH_SEED") else None
    opts = crash.Options(
        cycles=4, workers=2, seconds_per_cycle=1.5, seed=seed,
        kills=["worker", "acceptor", "tree", "worker"],  # each kind at least once
        recover_timeout=12.0, finish_timeout=6.0, drain_idle=8.0, drain_timeout=15.0, verbose=False,
    )
    result = crash.run(opts, base_dir=tmp_path)
    s = result.summary
    details = result.describe() + f"\nbroker log: {result.log_path}"
    print(details)  # shown with -s / -rP: seed, kills, figures
    assert result.error is None, details
    assert s["cycles_done"] == 4 and all(s["kills"][k] >= 1 for k in crash.KILL_KINDS), details
    assert s["acked"] > 0, details
    assert s["lost"] == 0, "acknowledged messages lost:\n" + details
    assert s["qos2_dups"] == 0, "QoS 2 messages delivered twice:\n" + details
    assert s["out_of_order"] == 0, "order of a publisher's messages broken:\n" + details
    assert s["sessions_lost"] == 0 and s["pid_reuse"] == 0, details
    assert s["drain_complete"], details
    assert result.ok, json.dumps(result.summary)
