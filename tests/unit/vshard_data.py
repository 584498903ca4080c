"""Shard stores filled for the tests of moving virtual shards, and what they should hold.

``populate`` writes, through the real ``Batch`` API, sessions in many virtual shards of one
shard store: queues (messages shared within and across virtual shards, small ones held by
their row), inflight rows in every state, incoming QoS 2 ids, a client ID longer than an
LMDB key. ``model`` reads every store of a data directory back as plain values, by client,
failing on a client stored twice, so that a move is checked as "the same model, the
clients of the moved virtual shards in the other store".
"""

from __future__ import annotations

import random
from pathlib import Path

from shardbroker.protocol.packets import NO_PROPERTIES
from shardbroker.storage.lmdb_store import ShardStore
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    InflightRecord,
    SessionRecord,
    StoredMessage,
    StoredSubscription,
)

LONG_ID = "long-" + "é" * 300  # 605 UTF-8 bytes: its key is a digest


def message(topic: str, payload: bytes, qos: int = 1) -> StoredMessage:
    return StoredMessage(topic, payload, qos, False, NO_PROPERTIES)


def populate(data_dir: Path, sessions: int = 120, shards: int = 2, seed: int = 7,
             sync: bool = True) -> list[str]:
    """Fill shard 0 of ``shards``; create the others empty. Returns the client ids."""
    rng = random.Random(seed)
    cids = [f"client-{i}" for i in range(sessions - 1)] + [LONG_ID]
    stores = [ShardStore.open(data_dir, i, shards, sync=sync) for i in range(shards)]
    try:
        with stores[0].batch() as b:
            shared = b.add_message(message("t/shared", b"shared-by-many" * 3))
            big = b.add_message(message("t/big", bytes(2000), 2))  # too big to be held
            for n, cid in enumerate(cids):
                b.put_session(SessionRecord(
                    cid, 4 if n % 2 else 5, 3600, None if n % 3 == 0 else 1.75e9 + n,
                    (StoredSubscription(f"t/{n}/#", n % 3),), None))
                for q in range(rng.randrange(0, 5)):
                    if q == 1:
                        b.enqueue(cid, shared, 1)
                    else:
                        b.enqueue(cid, b.add_message(message(f"t/{n}", f"{cid}-q{q}".encode())),
                                  1 + q % 2)
                if n % 4 == 0:
                    b.enqueue(cid, big, 2)
                if n % 5 == 0:
                    b.put_inflight(cid, 1, InflightRecord(
                        b.add_message(message(f"t/{n}", f"{cid}-in".encode())), 1, AWAIT_PUBACK))
                    b.put_inflight(cid, 2, InflightRecord(shared, 2, AWAIT_PUBREC))
                    b.put_inflight(cid, 3, InflightRecord(None, 2, AWAIT_PUBCOMP))
                if n % 7 == 0:
                    b.add_qos2_incoming(cid, 10 + n % 3)
                    b.add_qos2_incoming(cid, 300)
    finally:
        for s in stores:
            s.close()
    return cids


Model = dict[str, tuple[object, ...]]


def model(stores: list[ShardStore]) -> tuple[Model, dict[str, int]]:
    """Every client's state as plain values (message ids left out: a move renumbers them),
    and the shard holding it. A client in two stores fails here."""
    out: Model = {}
    where: dict[str, int] = {}
    for s in stores:
        for rec in s.sessions():
            cid = rec.client_id
            assert cid not in where, f"{cid} is in shard {where[cid]} and in shard {s.shard}"
            where[cid] = s.shard
            queue = tuple((qos, msg.topic, msg.payload) for _, _, qos, msg in s.queue(cid))
            inflight = tuple((pid, rec_.qos, rec_.state, None if m is None else m.payload)
                             for pid, rec_, m in s.inflight(cid))
            out[cid] = (rec, queue, inflight, tuple(s.qos2_incoming(cid)))
    return out, where
