"""Which shard owns a client: a stable hash of the client ID.

The hash must be the same in every process and across restarts, so Python's
salted ``hash()`` is never used. BLAKE2b is in the standard library and fast
enough for one call per CONNECT.
"""

from __future__ import annotations

import hashlib


def shard_for(client_id: str, shards: int) -> int:
    """The shard (0..shards-1) that owns ``client_id``."""
    if shards <= 1:
        return 0
    digest = hashlib.blake2b(client_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
