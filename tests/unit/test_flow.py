"""Flow control and back-pressure decisions (``core.flow``, ``core.backpressure``), loop-free,
with fake connections and time."""

from __future__ import annotations

import math

from shardbroker.config import load_config
from shardbroker.core.backpressure import MAX_ACK_WAIT, QUEUE, WRITE, Backlogs, Holds, ack_timeout
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


# --------------------------------------------------------------------------- flow


def test_a_backed_up_client_is_a_backlog_and_holds_nobody_else_itself() -> None:
    flow: Flow[FakeConn] = Flow()
    sub, pub = FakeConn(), FakeConn()
    assert flow.backed_up_at(sub, 10.0)
    assert flow.update(10.0, bus_congested=False) == (10.0 + SLOW_CONSUMER_GRACE, [])
    assert not flow.holding  # the shard goes on reading everyone: only the backlog's publishers wait
    flow.received(pub)
    assert pub.reading
    flow.drained(sub)
    assert flow.update(10.1, bus_congested=False) == (None, [])


def test_a_client_that_reads_too_slowly_is_cut_loose_after_the_grace() -> None:
    flow: Flow[FakeConn] = Flow()
    sub = FakeConn()
    flow.backed_up_at(sub, 0.0)
    recheck, slow = flow.update(0.0, bus_congested=False)
    assert recheck == SLOW_CONSUMER_GRACE and slow == []
    sub.bytes_sent += int(SLOW_CONSUMER_RATE * SLOW_CONSUMER_GRACE) // 10  # a tenth of the rate
    assert flow.update(SLOW_CONSUMER_GRACE, bus_congested=False) == (None, [sub])
    assert sub in flow.slow
    assert not flow.backed_up_at(sub, 2.0)  # still slow: no backlog until it has drained
    assert flow.update(2.0, bus_congested=False) == (None, [])
    flow.drained(sub)
    assert flow.backed_up_at(sub, 3.0)


def test_a_client_that_keeps_reading_fast_stays_a_backlog() -> None:
    flow: Flow[FakeConn] = Flow()
    sub = FakeConn()
    flow.backed_up_at(sub, 0.0)
    flow.update(0.0, bus_congested=False)
    sub.bytes_sent += SLOW_CONSUMER_RATE * 2
    assert flow.update(SLOW_CONSUMER_GRACE, bus_congested=False) == (2 * SLOW_CONSUMER_GRACE, [])
    assert sub in flow.backed_up


def test_bus_congestion_holds_the_clients_that_send() -> None:
    flow: Flow[FakeConn] = Flow()
    pub, idle, backed = FakeConn(), FakeConn(), FakeConn()
    flow.backed_up_at(backed, 0.0)
    flow.update(0.0, bus_congested=True)
    assert flow.holding and flow.holds == 1
    flow.received(pub)
    flow.received(backed)  # a backed-up client itself is never held (it may be blocked writing to us)
    assert not pub.reading and idle.reading and backed.reading
    flow.update(0.01, bus_congested=False)
    assert not flow.holding and pub.reading and flow.held_for == 0.01


def test_forgotten_connection_is_neither_held_nor_resumed() -> None:
    flow: Flow[FakeConn] = Flow()
    pub = FakeConn()
    flow.update(0.0, bus_congested=True)
    flow.received(pub)
    flow.forget(pub)
    flow.update(0.1, bus_congested=False)
    assert not flow.holding and not pub.reading  # closed: nobody touches it again


# --------------------------------------------------------------------------- backlogs


def test_a_publisher_is_held_once_and_released_when_its_last_backlog_ends() -> None:
    b: Backlogs[str] = Backlogs()
    b.start("s1", QUEUE, 1.0)
    b.start("s2", WRITE, 1.0)
    assert b.feed("s1", "p")  # its hold starts
    assert not b.feed("s1", "p")  # already held for s1
    assert not b.feed("s2", "p")  # held already: nothing to tell anyone
    assert b.feed("s2", "q")
    assert b.end("s1") == [] and b.holds("p")  # s2 still holds it
    assert sorted(b.end("s2")) == ["p", "q"]
    assert not b.holds("p") and b.held() == []


def test_a_message_for_a_subscriber_without_a_backlog_holds_no_one() -> None:
    b: Backlogs[str] = Backlogs()
    assert not b.feed("s", "p")
    assert b.held() == []


def test_a_backlog_of_two_kinds_ends_when_both_are_over() -> None:
    b: Backlogs[str] = Backlogs()
    b.start("s", QUEUE, 5.0)
    b.start("s", WRITE, 6.0)
    b.start("s", QUEUE, 7.0)  # still the same queue backlog: its start time stays
    assert b.since == {"s": 5.0}
    b.feed("s", "p")
    assert b.stop("s", QUEUE) == [] and "s" in b and b.since == {}
    assert b.stop("s", WRITE) == ["p"] and "s" not in b
    assert b.stop("s", WRITE) == []  # no longer a backlog: nothing to stop


def test_holds_by_several_shards_last_until_the_last_one_releases() -> None:
    h = Holds()
    assert h.add("p", 1, 10.0)
    assert not h.add("p", 0, math.inf)
    assert not h.remove("p", 1) and "p" in h
    assert not h.remove("p", 7)  # a shard that never held it
    assert h.remove("p", 0) and "p" not in h and len(h) == 0


def test_a_hold_from_another_shard_runs_out_unless_renewed() -> None:
    h = Holds()
    h.add("p", 1, 10.0)
    h.add("q", 1, 10.0)
    h.add("q", 0, math.inf)
    assert h.expire(9.9) == []
    h.add("p", 1, 12.0)  # renewed
    assert h.expire(10.0) == []  # q's other hold is this shard's own: it stays held
    assert "q" in h
    assert h.expire(12.0) == ["p"]


def test_a_restarted_shard_holds_nothing_any_more() -> None:
    h = Holds()
    h.add("p", 1, 10.0)
    h.add("q", 1, 10.0)
    h.add("q", 2, 10.0)
    assert h.drop_shard(1) == ["p"]
    assert "q" in h


def test_ack_timeout_is_the_keepalive_capped_or_the_setting() -> None:
    limits = load_config(None, {}).limits
    assert ack_timeout(limits, 30) == 30.0
    assert ack_timeout(limits, 600) == MAX_ACK_WAIT
    assert ack_timeout(limits, 0) == MAX_ACK_WAIT
    assert ack_timeout(load_config(None, {"limits.ack_timeout": 2.5}).limits, 30) == 2.5
