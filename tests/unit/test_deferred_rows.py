"""Deferred inflight rows: a QoS 1 copy to a persistent session whose message is kept durable
elsewhere (the origin shard's outbox, or the session's queue row) is sent without an inflight
row, which is written only if the copy is still unacknowledged ``DEFER_FOR`` seconds later.

Driven through the broker core (``core_harness``) on a real LMDB store; "crashes" are restarts
on the store as the last commit left it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from core_harness import Harness

from shardbroker.config import load_config
from shardbroker.core.delivery import DEFER_FOR
from shardbroker.peer.messages import DurableForward, Forward, ForwardAck
from shardbroker.protocol.packets import PubAck, Publish, PubRec, PubRel, Subscribe, Subscription

MakeHarness = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def build(*args: Any, **kwargs: Any) -> Harness:
        made.append(Harness(tmp_path, *args, **kwargs))
        return made[-1]

    yield build
    for harness in made:
        harness.close()


def _publishes(packets: list[object]) -> list[Publish]:
    return [p for p in packets if isinstance(p, Publish)]


def _acks(h: Harness) -> list[ForwardAck]:
    return [m for _, m in h.link.take() if isinstance(m, ForwardAck)]


def _subscriber(h: Harness, qos: int = 1) -> Any:
    """A persistent session subscribed to ``t``."""
    s = h.connect("s", clean=False)
    s.send(Subscribe(1, (Subscription("t", qos),)))
    s.packets()
    h.link.take()
    return s


def test_a_forward_acknowledged_in_time_never_writes_an_inflight_row(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 1, False))])
    [pub] = _publishes(s.packets())
    assert pub.payload == b"v" and pub.qos == 1
    assert h.store.inflight("s") == []
    assert _acks(h) == []  # the origin's outbox keeps the message until the copy is settled
    assert h.store.get_meta("handover.inbox.1") is None
    s.send(PubAck(pub.packet_id))
    h.advance(DEFER_FOR)  # the flush the deferral asked for (a PUBACK alone wakes none)
    assert _acks(h) == [ForwardAck(0, 1)]
    assert h.store.get_meta("handover.inbox.1") == 1
    assert h.store.inflight("s") == []
    assert h.broker.stats["deferred_rows"] == 1 and h.broker.stats["deferred_rows_written"] == 0


def test_an_unacknowledged_copy_gets_its_row_and_survives_a_restart(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 1, False))])
    [pub] = _publishes(s.packets())
    h.advance(DEFER_FOR / 2)
    assert h.store.inflight("s") == [] and _acks(h) == []
    h.advance(DEFER_FOR)
    [(pid, rec, msg)] = h.store.inflight("s")
    assert rec.qos == 1 and rec.msg_id is not None
    assert pid == pub.packet_id and msg is not None and msg.payload == b"v"
    assert _acks(h) == [ForwardAck(0, 1)]
    assert h.broker.stats["deferred_rows_written"] == 1
    h2 = h.restart()
    s2 = h2.connect("s", clean=False)
    [again] = _publishes(s2.packets())
    assert again.dup and again.packet_id == pub.packet_id and again.payload == b"v"


def test_a_crash_before_the_row_leaves_the_item_to_the_origin(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 1, False)),
                     DurableForward(1, 2, Forward("t", b"w", 1, False))])
    assert [p.payload for p in _publishes(s.packets())] == [b"v", b"w"]
    assert _acks(h) == []
    h2 = h.restart()  # nothing acknowledged to the origin, nothing stored for the copies
    assert h2.broker.peers.outbox.mark(1) == 0
    s2 = h2.connect("s", clean=False)
    s2.packets()
    h2.link.take()
    h2.peer_messages([DurableForward(1, 1, Forward("t", b"v", 1, False)),
                      DurableForward(1, 2, Forward("t", b"w", 1, False))])  # the origin resends
    assert [p.payload for p in _publishes(s2.packets())] == [b"v", b"w"]


def test_a_qos2_item_writes_the_deferred_rows_before_it(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h, qos=2)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"one", 1, False)),
                     DurableForward(1, 2, Forward("t", b"two", 2, False))])
    assert [(p.payload, p.qos) for p in _publishes(s.packets())] == [(b"one", 1), (b"two", 2)]
    assert sorted(msg.payload for _, _, msg in h.store.inflight("s") if msg is not None) == [b"one", b"two"]
    assert h.store.get_meta("handover.inbox.1") == 2  # QoS 2 is never applied past an unstored mark
    assert _acks(h) == [ForwardAck(0, 2)]


def test_a_held_item_holds_back_the_mark_of_later_ones(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"a", 1, False)),
                     DurableForward(1, 2, Forward("t", b"b", 1, False))])
    first, second = _publishes(s.packets())
    s.send(PubAck(second.packet_id))
    h.advance(DEFER_FOR / 2)
    assert _acks(h) == [] and h.store.get_meta("handover.inbox.1") is None  # item 1 is still held
    s.send(PubAck(first.packet_id))
    h.advance(DEFER_FOR)
    assert _acks(h) == [ForwardAck(0, 2)] and h.store.get_meta("handover.inbox.1") == 2


def test_a_copy_out_of_the_queue_keeps_its_queue_row_until_acknowledged(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_inflight": 1})
    h = make(config)
    s = _subscriber(h)
    p = h.connect("p")
    p.packets()
    p.send(Publish("t", b"a", qos=1, packet_id=1))
    p.send(Publish("t", b"b", qos=1, packet_id=2))
    [a] = _publishes(s.packets())
    assert [msg.payload for _, _, _, msg in h.store.queue("s")] == [b"b"]
    s.send(PubAck(a.packet_id))
    [b] = _publishes(s.packets())
    assert b.payload == b"b"
    assert h.store.inflight("s") == []  # a's row deleted; b's never written ...
    assert [msg.payload for _, _, _, msg in h.store.queue("s")] == [b"b"]  # ... its queue row keeps it
    s.send(PubAck(b.packet_id))
    h.advance(DEFER_FOR)
    assert h.store.inflight("s") == [] and h.store.queue("s") == []
    assert h.broker.stats["deferred_rows"] == 1 and h.broker.stats["deferred_rows_written"] == 0


def test_a_copy_out_of_the_queue_is_resent_after_a_crash(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_inflight": 1})
    h = make(config)
    s = _subscriber(h)
    p = h.connect("p")
    p.packets()
    p.send(Publish("t", b"a", qos=1, packet_id=1))
    p.send(Publish("t", b"b", qos=1, packet_id=2))
    [a] = _publishes(s.packets())
    s.send(PubAck(a.packet_id))
    assert [x.payload for x in _publishes(s.packets())] == [b"b"]
    h2 = h.restart()
    s2 = h2.connect("s", clean=False)
    assert [x.payload for x in _publishes(s2.packets())] == [b"b"]
    h2.advance(DEFER_FOR * 2)  # unacknowledged: its row is written, moving it out of the queue row
    assert h2.store.queue("s") == []
    [(_, _, msg)] = h2.store.inflight("s")
    assert msg is not None and msg.payload == b"b"


def test_qos2_to_a_persistent_session_is_never_deferred(make: MakeHarness) -> None:
    h = make(peers=[1], shards=2)
    s = _subscriber(h, qos=2)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 2, False))])
    [pub] = _publishes(s.packets())
    assert len(h.store.inflight("s")) == 1 and _acks(h) == [ForwardAck(0, 1)]
    s.send(PubRec(pub.packet_id))
    assert s.packets() == [PubRel(pub.packet_id)]
    assert h.broker.stats["deferred_rows"] == 0


def test_copies_queued_behind_a_full_window_are_held_too(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_inflight": 1})
    h = make(config, peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"a", 1, False)),
                     DurableForward(1, 2, Forward("t", b"b", 1, False))])  # b waits in the queue
    [a] = _publishes(s.packets())
    assert h.store.inflight("s") == [] and h.store.queue("s") == []
    s.send(PubAck(a.packet_id))
    [b] = _publishes(s.packets())
    assert b.payload == b"b"
    h.advance(DEFER_FOR / 2)
    assert _acks(h) == [ForwardAck(0, 1)]  # b is still held
    s.send(PubAck(b.packet_id))
    h.advance(DEFER_FOR)
    assert _acks(h) == [ForwardAck(0, 2)]
    assert h.store.inflight("s") == [] and h.store.queue("s") == []
    assert h.broker.stats["deferred_rows"] == 2 and h.broker.stats["deferred_rows_written"] == 0


def test_a_queued_copy_of_a_held_item_gets_its_queue_row_when_due(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_inflight": 1})
    h = make(config, peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"a", 1, False)),
                     DurableForward(1, 2, Forward("t", b"b", 1, False))])
    s.packets()
    h.advance(DEFER_FOR * 1.5)
    assert [m.payload for _, _, m in h.store.inflight("s") if m is not None] == [b"a"]
    assert [m.payload for _, _, _, m in h.store.queue("s")] == [b"b"]
    assert _acks(h) == [ForwardAck(0, 2)] and h.store.get_meta("handover.inbox.1") == 2
    h2 = h.restart()
    s2 = h2.connect("s", clean=False)
    [again] = _publishes(s2.packets())
    assert (again.payload, again.dup) == (b"a", True)
    s2.send(PubAck(again.packet_id))
    assert [p.payload for p in _publishes(s2.packets())] == [b"b"]


def test_a_later_row_of_the_session_writes_its_held_copies_first(tmp_path: Path, make: MakeHarness) -> None:
    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_inflight": 1})
    h = make(config, peers=[1], shards=2)
    s = _subscriber(h)
    p = h.connect("p")
    p.packets()
    h.peer_messages([DurableForward(1, 1, Forward("t", b"a", 1, False)),
                     DurableForward(1, 2, Forward("t", b"b", 1, False))])  # b waits in the queue
    assert [x.payload for x in _publishes(s.packets())] == [b"a"]
    p.send(Publish("t", b"c", qos=1, packet_id=1))  # a local message: its queue row is written at once ...
    assert [m.payload for _, _, m in h.store.inflight("s") if m is not None] == [b"a"]  # ... after a's
    assert [m.payload for _, _, _, m in h.store.queue("s")] == [b"b", b"c"]  # and b's, in order
    assert h.store.get_meta("handover.inbox.1") == 2 and _acks(h) == [ForwardAck(0, 2)]
    h2 = h.restart()  # a crash: the copies come again in the order they were first sent
    s2 = h2.connect("s", clean=False)
    got = _publishes(s2.packets())
    assert [(x.payload, x.dup) for x in got] == [(b"a", True)]
    for payload in (b"b", b"c"):
        s2.send(PubAck(got[0].packet_id))
        got = _publishes(s2.packets())
        assert [x.payload for x in got] == [payload]


def test_a_qos2_item_downgraded_to_qos1_is_not_deferred(make: MakeHarness) -> None:
    """Its QoS 2 copies must not be delivered again after a crash: its mark is stored with it."""
    h = make(peers=[1], shards=2)
    s = _subscriber(h, qos=1)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 2, False))])
    [pub] = _publishes(s.packets())
    assert pub.qos == 1 and len(h.store.inflight("s")) == 1
    assert h.store.get_meta("handover.inbox.1") == 1 and _acks(h) == [ForwardAck(0, 1)]
    assert h.broker.stats["deferred_rows"] == 0


def test_the_deferral_asks_for_its_own_flush(make: MakeHarness) -> None:
    """Nothing else happens on the shard: the timer the deferral set writes the row and acks."""
    h = make(peers=[1], shards=2)
    s = _subscriber(h)
    h.peer_messages([DurableForward(1, 1, Forward("t", b"v", 1, False)),
                     DurableForward(1, 2, Forward("t", b"w", 1, False))])
    assert len(_publishes(s.packets())) == 2
    h.advance(DEFER_FOR, tick=False)
    assert len(h.store.inflight("s")) == 2 and _acks(h) == [ForwardAck(0, 2)]
    h.peer_messages([DurableForward(1, 3, Forward("t", b"x", 1, False))])
    assert _acks(h) == [ForwardAck(0, 2)]  # item 3 is held
    [x] = _publishes(s.packets())
    s.send(PubAck(x.packet_id))
    h.advance(DEFER_FOR, tick=False)
    assert _acks(h) == [ForwardAck(0, 3)] and h.store.get_meta("handover.inbox.1") == 3
