"""Where the bytes of a subscription and of an idle connection go, object by object.

Run from the repository root (no sockets, no broker processes)::

    .venv/bin/python -m loadtests.core_memory                      # 200 clients x 100 filters, 5,000 idle clients
    .venv/bin/python -m loadtests.core_memory --clients 1000 --filters 10

Subscriptions: two shards' broker cores (``tests/unit/core_harness.py``: real LMDB
stores, a fake clock, a fake link), shard 0 taking the SUBSCRIBEs of ``--clients``
clean-session clients, ``--filters`` filters each, 10 per SUBSCRIBE, the filters of the
bench's ``subscriptions`` scenario (a device's own topics, every other one with ``+`` or
``#``); the route announcements cross to shard 1 through the real peer encoding. Idle
connections: ``--idle`` clients connect to one core. ``tracemalloc`` compares the heap
before and after and prints the bytes per subscription (both shards) and per connection
(the core's part: the worker's socket and ``TcpConnection`` come on top), by the line that
allocated them. RSS, what ``loadtests.bench`` measures, also counts the allocator's
free space, so it differs by some per cent.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from core_harness import FakeTransport, Harness

from loadtests.bench import subscription_filter
from shardbroker.peer import messages
from shardbroker.protocol import codec
from shardbroker.protocol.packets import MQTT_3_1_1, Connect, Subscribe, Subscription


def _report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, what: str) -> None:
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{total / count:.0f} bytes per {what} ({count:,})")
    for s in stats[:8]:
        if abs(s.size_diff) / count < 1:
            break
        frame = s.traceback[0]
        print(f"  {s.size_diff / count:7.1f} B  {s.count_diff / count:5.2f} objects  "
              f"{Path(frame.filename).name}:{frame.lineno}")


def subscriptions(root: Path, clients: int, filters: int) -> None:
    (root / "a").mkdir()
    (root / "b").mkdir()
    h0 = Harness(root / "a", peers=[1], shard=0, shards=2)
    h1 = Harness(root / "b", peers=[0], shard=1, shards=2)

    def exchange() -> None:
        for _ in range(10):
            out0, out1 = h0.link.take(), h1.link.take()
            if not out0 and not out1:
                return
            for h, out, peer in ((h1, out0, 1), (h0, out1, 0)):
                batch = [m for p, m in out if p == peer]
                if batch:
                    h.peer_messages(messages.decode_batch(messages.encode_batch(batch)))

    conns = [h0.connect(f"idle-{i}") for i in range(clients)]
    exchange()
    gc.collect()
    before = tracemalloc.take_snapshot()
    pid = 1
    for i, c in enumerate(conns):
        flts = [subscription_filter(i, k) for k in range(filters)]
        for j in range(0, filters, 10):
            pkt = Subscribe(pid, tuple(Subscription(f, 1) for f in flts[j:j + 10]))
            h0.broker.received(c.client, codec.encode(pkt, MQTT_3_1_1), h0.now)
            h0.run()
            exchange()
            pid = pid % 65535 + 1
        c.transport.written.clear()
        c.packets()
    for h in (h0, h1):  # the harness keeps cancelled timers; a loop drops them
        h.scheduler.timers = [t for t in h.scheduler.timers if not t.cancelled]
    gc.collect()
    _report(before, tracemalloc.take_snapshot(), clients * filters, "subscription, both shards")
    h0.close()
    h1.close()


def idle(root: Path, count: int) -> None:
    (root / "c").mkdir()
    h = Harness(root / "c", peers=[1], shard=0, shards=2)
    transports = [FakeTransport(f"c{i}") for i in range(count)]
    packets = [codec.encode(Connect(protocol_version=MQTT_3_1_1, client_id=f"idle-{i:06d}", keepalive=60),
                            MQTT_3_1_1) for i in range(count)]
    gc.collect()
    before = tracemalloc.take_snapshot()
    for t, data in zip(transports, packets, strict=True):
        h.broker.received(h.broker.open_client(t, None, h.now), data, h.now)
        h.run()
    for t in transports:
        t.written.clear()
    gc.collect()
    _report(before, tracemalloc.take_snapshot(), count, "idle connection, the core's part")
    h.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200, help="subscribing clients (default 200)")
    ap.add_argument("--filters", type=int, default=100, help="filters each (default 100)")
    ap.add_argument("--idle", type=int, default=5000, help="idle clients (default 5000)")
    args = ap.parse_args()
    tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="core-memory-") as tmp:
        subscriptions(Path(tmp), args.clients, args.filters)
        idle(Path(tmp), args.idle)


if __name__ == "__main__":
    main()
