"""Flow control: slow consumers by bytes, and a shard that stops reading while the bus is full.

Two decisions, both taken here without any socket or clock:

* **Which backed-up connections count.** A client connection whose write buffer is above
  its high-water mark is a backlog (``backpressure.WRITE``): the publishers that feed it
  are held back (``backpressure.py``), nobody else. That lasts as long as the client reads
  at least ``SLOW_CONSUMER_RATE`` bytes/s (judged over each ``SLOW_CONSUMER_GRACE``
  seconds). One that reads less is a *slow consumer* and no longer holds anyone back (QoS 0
  beyond the transport's ``write_buffer_full`` is dropped for it, counted); it counts again
  only after it has drained below the low-water mark. So a stuck client holds its own
  publishers for at most the grace, and unrelated clients not at all.
* **A full bus.** While the bus toward a peer shard is full and the peer is still taking
  batches (``Bus.congested``: the peer is busy, not down), the shard *holds* its inputs:
  it stops reading every client connection that sends something, until the pipe has room.
  This is the back-pressure of a busy process, as a single-loop broker has it through its
  own sockets. The bus drain itself never stops: two shards full toward each other would
  wait for each other for ever.

A connection that is itself backed up is never paused: a client blocked writing to us
would otherwise never read. Only connections that sent something while the hold lasts
are paused, so the cost is proportional to the active clients, not to all of them.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

SLOW_CONSUMER_GRACE = 1.0  # seconds over which a backed-up client's reading rate is judged
SLOW_CONSUMER_RATE = 1 << 20  # bytes/s below which a backed-up client is a slow consumer


class Reader(Protocol):
    @property
    def bytes_sent(self) -> int:
        """Bytes the client has taken so far."""
        ...

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


R = TypeVar("R", bound=Reader)


class Flow(Generic[R]):
    def __init__(self) -> None:
        self.backed_up: dict[R, tuple[float, int]] = {}  # connection -> (since, bytes_sent then)
        self.slow: set[R] = set()  # backed up past the grace: they hold nothing
        self.held: set[R] = set()  # connections whose reading is paused by the bus hold
        self.holding = False
        self.holds = 0  # times the shard started holding (statistics)
        self.held_for = 0.0  # seconds spent holding, over all holds (statistics)
        self._held_since = 0.0

    # ---- events

    def backed_up_at(self, conn: R, now: float) -> bool:
        """``conn``'s write buffer went above its high-water mark: True if it counts as a backlog
        (it is not a slow consumer)."""
        self.held.discard(conn)
        conn.resume_reading()
        if conn in self.slow:
            return False
        self.backed_up.setdefault(conn, (now, conn.bytes_sent))
        return True

    def drained(self, conn: R) -> None:
        """``conn``'s write buffer went below its low-water mark."""
        self.backed_up.pop(conn, None)
        self.slow.discard(conn)

    def forget(self, conn: R) -> None:
        """``conn`` is closed."""
        self.backed_up.pop(conn, None)
        self.slow.discard(conn)
        self.held.discard(conn)

    def received(self, conn: R) -> None:
        """``conn`` delivered data: while holding, it is paused after this read."""
        if self.holding and conn not in self.backed_up and conn not in self.held:
            self.held.add(conn)
            conn.pause_reading()

    # ---- the decisions

    def update(self, now: float, bus_congested: bool) -> tuple[float | None, list[R]]:
        """Judge the backed-up connections and start or end the bus hold.

        Returns when to look again (a grace running out) or None, and the connections that
        have just become slow consumers (they are backlogs no more).
        """
        recheck: float | None = None
        slow: list[R] = []
        for conn, (since, sent) in list(self.backed_up.items()) if self.backed_up else ():
            if now - since >= SLOW_CONSUMER_GRACE:
                if (conn.bytes_sent - sent) / (now - since) < SLOW_CONSUMER_RATE:
                    del self.backed_up[conn]
                    self.slow.add(conn)
                    slow.append(conn)
                    continue
                since = now  # it keeps reading: judge it again over the next period
                self.backed_up[conn] = (now, conn.bytes_sent)
            due = since + SLOW_CONSUMER_GRACE
            recheck = due if recheck is None else min(recheck, due)
        if bus_congested and not self.holding:
            self.holding = True
            self.holds += 1
            self._held_since = now
        elif not bus_congested and self.holding:
            self.holding = False
            self.held_for += now - self._held_since
            held, self.held = self.held, set()
            for conn in held:
                conn.resume_reading()
        return recheck, slow
