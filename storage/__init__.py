"""Durable storage of ShardBroker: records (``records``) and the LMDB store (``lmdb_store``).

What it does: re-exports the public API so callers write ``from storage import ShardStore``.
Invariants: ``lmdb`` is imported only by ``storage.lmdb_store``; ``storage.records`` has
no LMDB dependency and holds the exception classes both modules raise.
What it does not do: no logic of its own.
"""

from shardbroker.storage.lmdb_store import (
    SCHEMA_VERSION,
    Batch,
    RetainedStore,
    ShardStore,
    data_dir_shards,
    shard_dir_name,
)
from shardbroker.storage.records import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    EXPIRY_NEVER,
    InflightRecord,
    SessionRecord,
    StoreCorrupt,
    StoredMessage,
    StoredSubscription,
    StoredWill,
    StoreError,
    StoreFull,
)

__all__ = [
    "AWAIT_PUBACK",
    "AWAIT_PUBCOMP",
    "AWAIT_PUBREC",
    "EXPIRY_NEVER",
    "SCHEMA_VERSION",
    "Batch",
    "InflightRecord",
    "RetainedStore",
    "SessionRecord",
    "ShardStore",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoredMessage",
    "StoredSubscription",
    "StoredWill",
    "data_dir_shards",
    "shard_dir_name",
]
