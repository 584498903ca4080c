"""Flow control: a shard stops reading its inputs while its outputs are backed up.

A broker that reads publishes faster than it can deliver them only moves the
backlog into its own memory, and then drops it. So a shard *holds* its inputs
(stops reading client sockets, and stops draining the bus) while

* a client connection's write buffer is above its high-water mark, as long as
  the client reads at least ``SLOW_CONSUMER_RATE`` bytes/s (judged over each
  ``SLOW_CONSUMER_GRACE`` seconds): one that reads less is a slow consumer and no
  longer holds anyone back (QoS 0 beyond the transport's ``write_buffer_full`` is
  dropped for it, counted); it holds again only after it has drained below the
  low-water mark. So a stuck client stalls the others for at most the grace; or
* the bus toward a peer shard is full and the peer is still taking batches
  (``Bus.congested``); a peer that took nothing for ``bus.PEER_STALL`` seconds is
  down, and its batches wait in memory until it is back.

While a client is backed up the shard also stops draining the bus (``hold_bus``),
so that peers feel the back-pressure too. Bus congestion alone never stops the
drain: two shards full toward each other would wait for each other for ever.

TCP then pushes back on the publishers, as it does for a broker whose single loop
is busy, and the shard delivers what it reads. A connection that is itself backed
up is never held: a client blocked writing to us would otherwise never read.
Only connections that sent something while the hold lasts are paused, so the
cost is proportional to the active clients, not to all of them.

No sockets here: connections and the bus are driven through the small
interfaces below; time comes in as an argument.
"""

from __future__ import annotations

from typing import Protocol

SLOW_CONSUMER_GRACE = 1.0  # seconds over which a backed-up client's reading rate is judged
SLOW_CONSUMER_RATE = 1 << 20  # bytes/s below which a backed-up client is a slow consumer


class Reader(Protocol):
    @property
    def bytes_sent(self) -> int:
        """Bytes the client has taken so far."""
        ...

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Flow:
    def __init__(self) -> None:
        self.backed_up: dict[Reader, tuple[float, int]] = {}  # connection -> (since, bytes_sent then)
        self.slow: set[Reader] = set()  # backed up past the grace: they hold nothing
        self.held: set[Reader] = set()  # connections whose reading is paused
        self.holding = False
        self.holds = 0  # times the shard started holding (statistics)
        self.held_for = 0.0  # seconds spent holding, over all holds (statistics)
        self._held_since = 0.0

    # ---- events

    def backed_up_at(self, conn: Reader, now: float) -> None:
        """``conn``'s write buffer went above its high-water mark."""
        if conn not in self.slow:
            self.backed_up.setdefault(conn, (now, conn.bytes_sent))
        self.held.discard(conn)
        conn.resume_reading()

    def drained(self, conn: Reader) -> None:
        """``conn``'s write buffer went below its low-water mark."""
        self.backed_up.pop(conn, None)
        self.slow.discard(conn)

    def forget(self, conn: Reader) -> None:
        """``conn`` is closed."""
        self.backed_up.pop(conn, None)
        self.slow.discard(conn)
        self.held.discard(conn)

    def received(self, conn: Reader) -> None:
        """``conn`` delivered data: while holding, it is paused after this read."""
        if self.holding and conn not in self.backed_up and conn not in self.held:
            self.held.add(conn)
            conn.pause_reading()

    # ---- the decision

    @property
    def hold_bus(self) -> bool:
        """Whether the bus drain waits: only for a backed-up client (see the module docstring)."""
        return bool(self.backed_up)

    def update(self, now: float, bus_congested: bool) -> float | None:
        """Start or end the hold; returns when to look again (a grace running out), or None."""
        recheck: float | None = None
        for conn, (since, sent) in list(self.backed_up.items()) if self.backed_up else ():
            if now - since >= SLOW_CONSUMER_GRACE:
                if (conn.bytes_sent - sent) / (now - since) < SLOW_CONSUMER_RATE:
                    del self.backed_up[conn]
                    self.slow.add(conn)
                    continue
                since = now  # it keeps reading: judge it again over the next period
                self.backed_up[conn] = (now, conn.bytes_sent)
            due = since + SLOW_CONSUMER_GRACE
            recheck = due if recheck is None else min(recheck, due)
        hold = bus_congested or bool(self.backed_up)
        if hold and not self.holding:
            self.holding = True
            self.holds += 1
            self._held_since = now
        elif not hold and self.holding:
            self.holding = False
            self.held_for += now - self._held_since
            held, self.held = self.held, set()
            for conn in held:
                conn.resume_reading()
        return recheck
