"""A client's stored state shipped as bytes (``storage/session_state.py``): what it carries,
that it is written back into a store as the same session under new message ids, and that
bytes it did not make are refused as ``StoreCorrupt``."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from shardbroker.protocol.packets import NO_PROPERTIES, Properties
from shardbroker.storage.lmdb_store import ShardStore
from shardbroker.storage.records import (
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    InflightRecord,
    SessionRecord,
    StoreCorrupt,
    StoredMessage,
    StoredSubscription,
    StoredWill,
)
from shardbroker.storage.session_state import ClientState, pack_state, put_state, unpack_state


def a_session(store: ShardStore) -> None:
    with store.batch() as b:
        b.put_session(SessionRecord("c1", 5, 3600, 1_900_000_000.5,
                                    (StoredSubscription("a/#", 2), StoredSubscription("$share/g/b", 1)),
                                    StoredWill("w", b"bye", 1, False, NO_PROPERTIES, 30)))
        m1 = b.add_message(StoredMessage("a/1", b"one", 2, False, Properties(content_type="x")))
        m2 = b.add_message(StoredMessage("a/2", b"two" * 400, 1, True, NO_PROPERTIES, 2_000_000_000.0))
        b.put_inflight("c1", 7, InflightRecord(m1, 2, AWAIT_PUBREC))
        b.put_inflight("c1", 9, InflightRecord(None, 2, AWAIT_PUBCOMP))
        b.enqueue("c1", m2, 1)
        b.enqueue("c1", m1, 2)
        b.add_qos2_incoming("c1", 3)


def test_a_state_travels_and_is_written_back_as_the_same_session(tmp_path: Path) -> None:
    with ShardStore.open(tmp_path / "a", 0, 1) as source, ShardStore.open(tmp_path / "b", 0, 1) as target:
        a_session(source)
        state = source.client_state("c1")
        assert state is not None
        shipped = unpack_state(pack_state(state))
        assert shipped.session == state.session
        assert [(p, r.qos, r.state, m) for p, r, m in shipped.inflight] == [
            (p, r.qos, r.state, m) for p, r, m in state.inflight]
        assert [(q, m) for _s, _i, q, m in shipped.queue] == [(q, m) for _s, _i, q, m in state.queue]
        assert shipped.qos2_incoming == [3]
        with target.batch() as b:
            b.put_session(SessionRecord("other", 4, 0, None))  # takes ids: new ones differ
            b.add_message(StoredMessage("x", b"x", 1, False, NO_PROPERTIES))
        b = target.batch()
        written = put_state(b, shipped)
        b.commit()
        back = target.client_state("c1")
        assert back is not None and back.session == state.session
        assert [(s, i, q) for s, i, q, _m in back.queue] == [(s, i, q) for s, i, q, _m in written.queue]
        assert [m for *_x, m in back.queue] == [m for *_x, m in state.queue]
        assert [(p, r, m) for p, r, m in back.inflight] == [(p, r, m) for p, r, m in written.inflight]
        assert back.qos2_incoming == [3]
        assert target.check() == []


@pytest.mark.parametrize("data", [
    b"", b"\xff", cbor2.dumps([]), cbor2.dumps({"a": 1}), cbor2.dumps([b"x", [], [], []]),
    cbor2.dumps([b"\xa0", [[0, b"\x01", None]], [], []]),
    cbor2.dumps([b"\xa0", [], [[3, b"\x01"]], []]),
    cbor2.dumps([b"\xa0", [], [], [70000]]),
    cbor2.dumps([b"\xa0", [], [], [], 0]),  # a next packet id out of range
    cbor2.dumps([b"\xa0", [], [], [], 1, 2]),
])
def test_bytes_it_did_not_make_are_refused(data: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        unpack_state(data)


def test_a_session_without_rows() -> None:
    state = ClientState(SessionRecord("c", 4, 0xFFFFFFFF, 5.0), [], [], [])
    assert unpack_state(pack_state(state)) == state


def test_a_copy_says_the_next_packet_id() -> None:
    state = ClientState(SessionRecord("c", 4, 0xFFFFFFFF, 5.0), [], [], [], 65535)
    assert unpack_state(pack_state(state)) == state
    assert len(cbor2.loads(pack_state(ClientState(SessionRecord("c", 4, 1, None), [], [], [])))) == 4
