"""The connect and disconnect lines: one INFO line when a client is connected (its CONNACK
sent) and one when that connection ends, whatever ends it.

Each line names the client ID, its address, the protocol version and, for a disconnect, the
reason (the client's DISCONNECT and its reason code, keepalive expiry, a protocol error and
what it was, taken over, a server-side close, server shutdown, the connection lost). The same
facts go with the record as structured fields (``client_id``, ``address``, ``version``,
``reason``), which the JSON log format writes as such (``process/runtime.py``); nothing a
client sent is written raw (both formats escape control characters).

Below INFO (``--log-level warning``) a line costs one level check: neither its fields nor the
client's address (a system call the first time) are looked up.

``Client.closing`` is what makes the disconnect line once: every path that ends a connected
client logs before it sets it, and ``Broker.lost`` logs only a client not yet closing.
"""

from __future__ import annotations

import logging

from shardbroker.core.client import Client

log = logging.getLogger("shardbroker.clients")

VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}


def _fields(client: Client, reason: str | None = None) -> dict[str, object]:
    out: dict[str, object] = {"client_id": client.client_id, "address": client.peer,
                              "version": VERSIONS.get(client.version, str(client.version))}
    if reason is not None:
        out["reason"] = reason
    return out


def connected(client: Client, shard: int, present: bool) -> None:
    """The CONNACK (success) is on its way to ``client``. Nothing is done below INFO: the
    address would cost a ``getpeername`` and a string kept with every connection."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = _fields(client)
    log.info("client %s connected from %s (MQTT %s, shard %d, %s)", client.client_id, client.peer,
             fields["version"], shard, "session present" if present else "new session", extra=fields)


def disconnected(client: Client, reason: str) -> None:
    """The connection of ``client``, connected before, ends for ``reason``."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = _fields(client, reason)
    log.info("client %s disconnected from %s (MQTT %s): %s", client.client_id, client.peer,
             fields["version"], reason, extra=fields)
