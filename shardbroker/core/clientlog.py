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

At INFO (the default) these two lines are most of what logging costs a worker, so the process
may give a ``direct`` writer (``write_directly``; the worker gives ``process/runtime.py``'s
``TurnHandler.line_writer``): it takes the finished message and writes the very line the record
would have made, without making the record, and says False when it cannot (another handler, the
JSON format, another thread), and the line is logged as a record then.

``Client.closing`` is what makes the disconnect line once: every path that ends a connected
client logs before it sets it, and ``Broker.lost`` logs only a client not yet closing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shardbroker.core.client import Client
from shardbroker.protocol import reasons

log = logging.getLogger("shardbroker.clients")

VERSIONS = {3: "3.1", 4: "3.1.1", 5: "5.0"}
CONNECTED = "client %s connected from %s (MQTT %s, shard %d, %s)"
DISCONNECTED = "client %s disconnected from %s (MQTT %s): %s"

_direct: Callable[[str], bool] | None = None


def write_directly(writer: Callable[[str], bool] | None) -> None:
    """From now on, hand each line's message to ``writer`` first (None: log every line as a
    record). ``writer`` returns whether it wrote the line; it is called only when INFO is enabled."""
    global _direct
    _direct = writer


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
    version = VERSIONS.get(client.version, str(client.version))
    args = (client.client_id, client.peer, version, shard, "session present" if present else "new session")
    direct = _direct
    if direct is not None and direct(CONNECTED % args):
        return
    log.info(CONNECTED, *args, extra=_fields(client))


def disconnected(client: Client, reason: str) -> None:
    """The connection of ``client``, connected before, ends for ``reason``."""
    if not log.isEnabledFor(logging.INFO):
        return
    args = (client.client_id, client.peer, VERSIONS.get(client.version, str(client.version)), reason)
    direct = _direct
    if direct is not None and direct(DISCONNECTED % args):
        return
    log.info(DISCONNECTED, *args, extra=_fields(client, reason))


def sent_disconnect(client: Client, reason_code: int) -> None:
    """``client`` ended its connection with DISCONNECT and ``reason_code`` (whose name is looked
    up and written only at INFO)."""
    if log.isEnabledFor(logging.INFO):
        disconnected(client, f"client sent DISCONNECT [{reasons.name(reason_code)}]")
