"""Open connections, in total and per address: ``limits.max_connections`` and
``limits.max_connections_per_address``, decided in the acceptor.

``ConnectionCounts`` counts every connection from its accept to its close, wherever it is:
still in the acceptor (before CONNECT, in a TLS or WebSocket handshake), relayed by it, or
handed to a worker. A connection is counted under an address key, or under ``None`` while
its address is not known yet (a PROXY protocol listener before the header) or when no
per-address limit is set (then no key is kept at all).

``HandedOff`` is what one hand-off link owes: the connections given to a worker over it (a
relayed TLS or WebSocket client too: the worker's end of its socket pair closes with it), by
hand-off number, until the worker says they closed (``fd_passing``'s close notices) or the
link breaks (the worker died, and its connections with it). Without a per-address limit it
keeps a count, not an entry per connection: the worker's clients cost the acceptor nothing.

Pure: no sockets, no clock, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable

TOTAL = "limits.max_connections"
PER_ADDRESS = "limits.max_connections_per_address"

_NOT_COUNTED = "\x00"  # no address is this

__all__ = ["PER_ADDRESS", "TOTAL", "ConnectionCounts", "HandedOff"]


class ConnectionCounts:
    __slots__ = ("_by_address", "max_per_address", "max_total", "refused_address", "refused_total", "total")

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total  # 0: no limit
        self.max_per_address = max_per_address  # 0: no limit
        self.total = 0
        self._by_address: dict[str, int] = {}
        self.refused_total = 0
        self.refused_address = 0

    @property
    def per_address(self) -> bool:
        """Whether addresses are counted at all."""
        return self.max_per_address > 0

    def at(self, address: str) -> int:
        """Connections open from ``address``."""
        return self._by_address.get(address, 0)

    def admit(self, address: str | None) -> str | None:
        """Count a new connection; None when admitted, else the name of the limit it is over
        (and it is not counted)."""
        if self.max_total and self.total >= self.max_total:
            self.refused_total += 1
            return TOTAL
        if address is not None and self.max_per_address:
            n = self._by_address.get(address, 0)
            if n >= self.max_per_address:
                self.refused_address += 1
                return PER_ADDRESS
            self._by_address[address] = n + 1
        self.total += 1
        return None

    def move(self, old: str | None, new: str) -> bool:
        """A counted connection turns out to come from ``new`` (a PROXY header, a trusted
        proxy's X-Forwarded-For). False when ``new`` is at its limit: it stays counted under
        ``old`` (the caller closes it and releases ``old``)."""
        if not self.max_per_address or old == new:
            return True
        n = self._by_address.get(new, 0)
        if n >= self.max_per_address:
            self.refused_address += 1
            return False
        self._by_address[new] = n + 1
        self._forget(old)
        return True

    def release(self, address: str | None) -> None:
        """A counted connection closed."""
        self.total -= 1
        self._forget(address)

    def release_all(self, addresses: Iterable[str | None]) -> None:
        for address in addresses:
            self.release(address)

    def _forget(self, address: str | None) -> None:
        if address is None:
            return
        n = self._by_address.get(address, 0) - 1
        if n > 0:
            self._by_address[address] = n
        else:
            self._by_address.pop(address, None)


class HandedOff:
    """The connections handed over one link, by hand-off number (``u32``, wrapping; both ends
    number every hand-off on the link in order, from 0). ``keyed``: their addresses are kept
    (a per-address limit is set); else every address is None and only their number is."""

    __slots__ = ("_next", "_open", "_unkeyed")

    def __init__(self, keyed: bool = True) -> None:
        self._next = 0
        self._open: dict[int, str | None] | None = {} if keyed else None
        self._unkeyed = 0

    def __len__(self) -> int:
        return self._unkeyed if self._open is None else len(self._open)

    def handed(self, address: str | None) -> None:
        """The next hand-off on the link."""
        if self._open is None:
            self._unkeyed += 1
        else:
            self._open[self._next] = address
        self._next = (self._next + 1) & 0xFFFFFFFF

    def closed(self, numbers: Iterable[int]) -> list[str | None]:
        """The addresses of the connections among ``numbers`` (each released once; an unknown
        number is not released)."""
        if self._open is None:
            n = min(self._unkeyed, sum(1 for _ in numbers))
            self._unkeyed -= n
            return [None] * n
        out: list[str | None] = []
        pop = self._open.pop
        for number in numbers:
            address = pop(number, _NOT_COUNTED)
            if address is not _NOT_COUNTED:
                out.append(address)
        return out

    def gone(self) -> list[str | None]:
        """The link broke: every connection still counted on it."""
        if self._open is None:
            n, self._unkeyed = self._unkeyed, 0
            return [None] * n
        out = list(self._open.values())
        self._open.clear()
        return out
