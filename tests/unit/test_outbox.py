"""The durable outbox between shards: numbering, marks, resends, and the records it stores."""

from __future__ import annotations

import cbor2
import pytest

from shardbroker.core.outbox import APPLY, DUPLICATE, GAP, Outbox, _decode_record, _decode_row
from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    RouteAck,
    encode_batch,
    encode_message,
)
from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.storage.records import StoreCorrupt, encode_properties


class Batch:
    def __init__(self) -> None:
        self.outbox: dict[tuple[int, int], bytes] = {}
        self.meta: dict[str, object] = {}

    def put_outbox(self, peer: int, seq: int, item: bytes) -> None:
        self.outbox[(peer, seq)] = item

    def delete_outbox(self, peer: int, seq: int) -> None:
        del self.outbox[(peer, seq)]

    def set_meta(self, key: str, value: object) -> None:
        self.meta[key] = value


def test_numbering_acknowledgement_and_reload() -> None:
    box, batch = Outbox(0), Batch()
    first = box.send(1, Forward("t", b"a", 1, False), batch, 10.0)
    second = box.send(1, Forward("t", b"b", 1, False), batch, 10.0)
    assert (first.seq, second.seq) == (1, 2) and first.origin_shard == 0
    assert batch.outbox == {} and box.has_dirty()
    box.persist(batch)  # one row for both, keyed by the first
    assert batch.meta == {"handover.next.1": 3} and list(batch.outbox) == [(1, 1)]
    assert not box.has_dirty()
    box.acknowledged(1, 1, batch, 11.0)  # the row stays until its last item is acknowledged
    assert list(batch.outbox) == [(1, 1)] and box.resend(1, 11.5) == [second]
    again = Outbox(0)
    again.load([(peer, seq, data) for (peer, seq), data in batch.outbox.items()], batch.meta.items())
    assert again.resend(1, 12.0) == [first, second]  # the peer drops what it has as duplicates
    third = again.send(1, Forward("t", b"c", 1, False), Batch(), 12.0)
    assert third.seq == 3
    again.persist(batch)
    assert sorted(batch.outbox) == [(1, 1), (1, 3)]
    again.acknowledged(1, 2, batch, 13.0)
    assert list(batch.outbox) == [(1, 3)] and again.resend(1, 13.0) == [third]
    again.acknowledged(1, 3, batch, 14.0)
    assert batch.outbox == {} and again.pending_count() == 0


def test_an_acknowledgement_deletes_what_it_covers_and_nothing_more() -> None:
    box, batch = Outbox(0), Batch()
    for i in range(50):
        box.send(1, Forward("t", bytes([i]), 1, False), batch, 10.0)
        if i % 10 == 9:
            box.persist(batch)  # rows of 10: 1-10, 11-20, ...
    box.send(2, Forward("t", b"other peer", 1, False), batch, 10.0)
    box.persist(batch)
    box.acknowledged(1, 30, batch, 11.0)
    assert sorted(batch.outbox) == [(1, 31), (1, 41), (2, 1)]
    assert [item.seq for item in box.resend(1, 12.0)] == list(range(31, 51))
    box.acknowledged(1, 35, batch, 13.0)
    assert sorted(batch.outbox) == [(1, 31), (1, 41), (2, 1)]
    assert [item.seq for item in box.resend(1, 12.0)] == list(range(36, 51))
    box.acknowledged(1, 30, batch, 13.0)  # an old mark again: nothing to delete
    box.acknowledged(1, 99, batch, 13.0)
    assert list(batch.outbox) == [(2, 1)] and box.pending_count() == 1
    stored = Batch()
    single = encode_message(DurableForward(0, 4, Forward("t", b"old row", 1, False)))
    stored.outbox = {(2, 1): batch.outbox[(2, 1)], (3, 4): single,
                     (3, 5): encode_message(DurableForward(0, 5, Forward("t", b"old row", 1, False)))}
    reloaded = Outbox(0)
    reloaded.load([(peer, seq, data) for (peer, seq), data in stored.outbox.items()], ())
    reloaded.acknowledged(3, 4, stored, 14.0)
    assert sorted(stored.outbox) == [(2, 1), (3, 5)]
    assert {peer: list(items) for peer, items in reloaded.pending.items()} == {2: [1], 3: [5]}


def test_a_row_must_hold_consecutive_durable_forwards() -> None:
    items = [DurableForward(0, seq, Forward("t", b"x", 1, False)) for seq in (4, 5, 7)]
    with pytest.raises(StoreCorrupt):
        _decode_row(encode_batch(items), 4)
    with pytest.raises(StoreCorrupt):
        _decode_row(encode_batch([RouteAck(1, 1)]), 1)
    assert [i.seq for i in _decode_row(encode_batch(items[:2]), 4)] == [4, 5]


def test_inbox_marks_apply_in_order_only() -> None:
    box = Outbox(1)
    assert box.accept(0, 1) == APPLY
    assert box.accept(0, 1) == DUPLICATE
    assert box.accept(0, 3) == GAP
    assert box.mark(0) == 1 and box.acks_due == {0: 1}


def test_overdue_after_the_resend_delay() -> None:
    box = Outbox(0)
    box.send(2, Forward("t", b"a", 1, False), Batch(), 0.0)
    assert box.overdue(4.0) == [] and box.overdue(6.0) == [2]


def test_records_written_before_the_peer_encoding_are_still_read() -> None:
    props = Properties(content_type="text/plain", user_properties=(("k", "v"),))
    legacy = cbor2.dumps(["P", 3, 7, ["a/b", b"payload", 1, True, encode_properties(props), 1.5e9, "pub"],
                          True, [["g", "a/+"]], 1])
    assert _decode_record(legacy) == DurableForward(
        3, 7, Forward("a/b", b"payload", 1, True, props, 1.5e9, "pub", True, (("g", "a/+"),), 1))
    plain = cbor2.dumps(["P", 3, 8, ["a", b"", 0, False, None, None, None], False, [], 0])
    assert _decode_record(plain).forward.properties is NO_PROPERTIES


@pytest.mark.parametrize("data", [b"", b"\x00\x01", cbor2.dumps(["P", 1]), cbor2.dumps({"x": 1}),
                                  encode_message(RouteAck(1, 1))])
def test_a_corrupt_record_is_reported_as_such(data: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        _decode_record(data)
