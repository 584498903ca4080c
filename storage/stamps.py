"""Stamps of retained messages: who wrote a topic's retained message last, and when.

Every retained message (and every delete of one) carries a stamp: a hybrid logical clock
value (``core/hlc.py``) and the ID of the node that wrote it. The nodes of a cluster keep
the retained message of a topic with the greatest ``(stamp, node)`` pair: last writer wins,
the node ID breaking a tie, so that every node that has seen the same writes holds the same
message whatever order they came in.

What it does:

* ``RetainedOp``: one write of the retained store, local (a publish of this node: always
  applied, its stamp raised above the one held if need be) or remote (another node's: applied
  only when its pair is greater than the one held; between two pairs alike, ``tie_rank``).
* ``pack``/``unpack``: a stamps row, ``stamp (u64, big-endian)``, the node ID's length in
  bytes (u16) and the node ID in UTF-8, then the topic in UTF-8 when the row's key is a digest
  (a topic over 400 bytes; else nothing: the key is the topic), so that a tombstone names its
  topic.
* ``shared``: whether a topic's retained message is the cluster's. Topics that start with
  ``$`` (the ``$SYS`` tree every node publishes about itself) are each node's own: stamped
  like the others, but neither sent to other nodes, nor taken from them, nor in the digest.
* ``entry_digest``: what one live entry adds to the digest of a retained set, a sum modulo
  2**64 of BLAKE2b-64 values over (topic, stamp, node, BLAKE2b-64 of the payload). A sum does
  not depend on the order of a scan, so two nodes compare their sets by one number.

What it does not do: no I/O (``lmdb_store.RetainedStore`` keeps the table), no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final

from shardbroker.storage.records import StoreCorrupt, StoredMessage

__all__ = ["DIGEST_MOD", "NO_STAMP", "RetainedOp", "entry_digest", "pack", "shared", "tie_rank", "unpack"]

NO_STAMP: Final = (0, "")
"""The pair of a topic that has no stamps row (every row a schema 1 store held)."""
DIGEST_MOD: Final = 1 << 64
_U64: Final = struct.Struct(">Q")
_HEAD: Final = struct.Struct(">QH")


@dataclass(slots=True)
class RetainedOp:
    """Set (``msg``) or delete (None) the retained message of ``topic``, stamped
    ``(stamp, node)``; ``remote``: another node's write (applied only if newer)."""

    topic: str
    msg: StoredMessage | None
    stamp: int
    node: str
    remote: bool = False


def shared(topic: str) -> bool:
    """Whether the retained message of ``topic`` is the same on every node (not ``$...``)."""
    return not topic.startswith("$")


def pack(stamp: int, node: str, topic: str | None = None) -> bytes:
    """A stamps row; ``topic`` only when the row's key does not spell it (a digest key)."""
    n = node.encode("utf-8", "surrogatepass")
    t = b"" if topic is None else topic.encode("utf-8", "surrogatepass")
    return _HEAD.pack(stamp, len(n)) + n + t


def unpack(row: bytes) -> tuple[int, str, str | None]:
    """The (stamp, node, topic or None) of a stamps row; ``StoreCorrupt`` if it is not one."""
    if len(row) < _HEAD.size:
        raise StoreCorrupt(f"stamps row of {len(row)} bytes (at least {_HEAD.size})")
    stamp, size = _HEAD.unpack_from(row)
    end = _HEAD.size + size
    if len(row) < end:
        raise StoreCorrupt(f"stamps row: node ID of {size} bytes in a row of {len(row)}")
    try:
        node = row[_HEAD.size:end].decode("utf-8", "surrogatepass")
        topic = row[end:].decode("utf-8", "surrogatepass") if len(row) > end else None
    except UnicodeDecodeError:
        raise StoreCorrupt("stamps row: not UTF-8") from None
    return stamp, node, topic


def _h64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def tie_rank(payload: bytes) -> int:
    """What decides between two writes of one topic stamped alike (which only stores migrated
    from schema 1 hold: every message there is (0, "")): the greater BLAKE2b-64 of the payload
    (a delete's is the empty payload's), the same on every node."""
    return _h64(payload)


def entry_digest(topic: str, stamp: int, node: str, payload: bytes) -> int:
    """The term one live retained entry adds (mod 2**64) to its set's digest: the BLAKE2b-64 of
    the topic's length (u64) and UTF-8, the stamp (u64), the node ID's length (u64) and UTF-8,
    and the BLAKE2b-64 of the payload."""
    t = topic.encode("utf-8", "surrogatepass")
    n = node.encode("utf-8", "surrogatepass")
    return _h64(b"".join((_U64.pack(len(t)), t, _U64.pack(stamp), _U64.pack(len(n)), n,
                          blake2b(payload, digest_size=8).digest())))
