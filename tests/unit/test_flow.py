"""Flow control decisions (``shardbroker.core.flow``), loop-free, with fake connections and time."""

from __future__ import annotations

from shardbroker.core.flow import SLOW_CONSUMER_GRACE, SLOW_CONSUMER_RATE, Flow


class FakeConn:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.reading = True
        self.pauses = 0

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True


def test_backed_up_client_holds_active_readers_until_it_drains() -> None:
    flow = Flow()
    sub, pub, idle = FakeConn(), FakeConn(), FakeConn()
    flow.backed_up_at(sub, 10.0)
    flow.update(10.0, bus_congested=False)
    assert flow.holding and flow.hold_bus and flow.holds == 1
    flow.received(pub)  # an active reader is paused after its read; the idle one is left alone
    assert not pub.reading and idle.reading
    flow.received(sub)  # a backed-up client itself is never held (it may be blocked writing to us)
    assert sub.reading
    flow.drained(sub)
    flow.update(10.1, bus_congested=False)
    assert not flow.holding and not flow.hold_bus and pub.reading


def test_a_client_that_reads_too_slowly_is_cut_loose_after_the_grace() -> None:
    flow = Flow()
    sub, pub = FakeConn(), FakeConn()
    flow.backed_up_at(sub, 0.0)
    recheck = flow.update(0.0, bus_congested=False)
    assert recheck == SLOW_CONSUMER_GRACE
    flow.received(pub)
    sub.bytes_sent += int(SLOW_CONSUMER_RATE * SLOW_CONSUMER_GRACE) // 10  # a tenth of the rate
    assert flow.update(SLOW_CONSUMER_GRACE, bus_congested=False) is None
    assert not flow.holding and pub.reading and sub in flow.slow
    flow.backed_up_at(sub, 2.0)  # still slow: it holds nothing until it has drained
    flow.update(2.0, bus_congested=False)
    assert not flow.holding
    flow.drained(sub)
    flow.backed_up_at(sub, 3.0)
    flow.update(3.0, bus_congested=False)
    assert flow.holding


def test_a_client_that_keeps_reading_fast_keeps_holding() -> None:
    flow = Flow()
    sub = FakeConn()
    flow.backed_up_at(sub, 0.0)
    flow.update(0.0, bus_congested=False)
    sub.bytes_sent += SLOW_CONSUMER_RATE * 2
    recheck = flow.update(SLOW_CONSUMER_GRACE, bus_congested=False)
    assert flow.holding and recheck == 2 * SLOW_CONSUMER_GRACE


def test_bus_congestion_holds_clients_but_not_the_bus_drain() -> None:
    flow = Flow()
    pub = FakeConn()
    flow.update(0.0, bus_congested=True)
    assert flow.holding and not flow.hold_bus  # two full shards must not wait for each other
    flow.received(pub)
    assert not pub.reading
    flow.update(0.01, bus_congested=False)
    assert not flow.holding and pub.reading


def test_forgotten_connection_is_neither_held_nor_resumed() -> None:
    flow = Flow()
    sub, pub = FakeConn(), FakeConn()
    flow.backed_up_at(sub, 0.0)
    flow.update(0.0, bus_congested=False)
    flow.received(pub)
    flow.forget(pub)
    flow.forget(sub)
    flow.update(0.1, bus_congested=False)
    assert not flow.holding and not pub.reading  # closed: nobody touches it again
