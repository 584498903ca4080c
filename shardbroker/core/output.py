"""What the broker has to say to its clients, held until the flush.

Handlers queue bytes on a client with ``send``; ``Broker.flush`` commits the store
batch first and only then hands each client's due bytes to its transport in one
write. So an acknowledgement never leaves before the state it promises is on disk.
``close`` ends a client the same way: after what is queued has been written. A client that
ended its side itself (DISCONNECT) is closed without the transport's linger, which is for
clients that may still be sending.
"""

from __future__ import annotations

from collections.abc import Callable

from shardbroker.core.client import Client


class Output:
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake  # asks for a flush soon
        self._due: list[Client] = []  # clients with bytes (or a close) due at the flush
        self._ended: set[Client] = set()  # closing ones that send nothing more (no linger)

    def send(self, client: Client, data: bytes) -> None:
        out = client.out
        if out is None:  # an idle client keeps no empty list
            client.out = [data]
        else:
            out.append(data)
        if not client.output_due:
            self._mark_due(client)

    def mark(self, client: Client) -> None:
        """List ``client`` at the flush with nothing to write (so a failed commit closes it)."""
        if not client.output_due:
            self._mark_due(client)

    def close(self, client: Client, reason: str, *, ended: bool = False) -> None:
        """Close the client once what is queued for it has been written; ``ended``: it said it
        sends nothing more (DISCONNECT), so its input need not be drained."""
        client.closing = True
        client.close_reason = reason
        if ended:
            self._ended.add(client)
        elif self._ended:
            self._ended.discard(client)
        if not client.output_due:
            self._mark_due(client)

    def forget(self, client: Client) -> None:
        """The client's transport is gone (whether or not its close was written)."""
        if self._ended:
            self._ended.discard(client)

    def _mark_due(self, client: Client) -> None:
        client.output_due = True
        self._due.append(client)
        self._wake()

    def take(self) -> list[Client]:
        """The clients due to be written, once (the flush)."""
        due, self._due = self._due, []
        return due

    def write(self, client: Client) -> None:
        """Hand the client's queued bytes to its transport (the flush, after the commit)."""
        client.output_due = False
        client.unacked_in = 0
        out, client.out = client.out, None
        linger = True
        if self._ended and client in self._ended:
            self._ended.discard(client)
            linger = False
        if client.gone:
            return
        if out:
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        reason = client.close_reason
        if reason is not None:
            client.close_reason = None
            client.transport.close(reason, linger)
