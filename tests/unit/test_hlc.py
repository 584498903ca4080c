"""The hybrid logical clock of ``core/hlc.py``: wall time in the high bits, never backwards,
above every stamp it observed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardbroker.core.hlc import MAX_STAMP, SHIFT, HybridClock

WALL = 1_800_000_000.0


def test_a_stamp_is_the_wall_time_in_milliseconds_shifted() -> None:
    clock = HybridClock()
    assert clock.stamp(WALL) == 1_800_000_000_000 << SHIFT
    assert clock.stamp(WALL + 0.0015) == 1_800_000_000_001 << SHIFT


def test_stamps_in_one_millisecond_count_up() -> None:
    clock = HybridClock()
    first = clock.stamp(WALL)
    assert [clock.stamp(WALL) for _ in range(3)] == [first + 1, first + 2, first + 3]


def test_a_wall_clock_that_steps_back_does_not_take_the_stamps_back() -> None:
    clock = HybridClock()
    ahead = clock.stamp(WALL + 10)
    assert clock.stamp(WALL) == ahead + 1  # the wall clock went back 10 s
    assert clock.stamp(WALL + 11) == int((WALL + 11) * 1000) << SHIFT  # and caught up


def test_an_observed_stamp_from_a_clock_ahead_is_passed() -> None:
    clock = HybridClock()
    mine = clock.stamp(WALL)
    theirs = int((WALL + 60) * 1000) << SHIFT  # another node's clock, a minute ahead
    clock.observe(theirs)
    assert clock.stamp(WALL + 0.001) == theirs + 1
    clock.observe(mine)  # an older one changes nothing
    assert clock.stamp(WALL) == theirs + 2


def test_a_stamp_beyond_64_bits_is_refused() -> None:
    clock = HybridClock(MAX_STAMP)
    with pytest.raises(OverflowError):
        clock.stamp(WALL)


@given(st.lists(st.one_of(st.tuples(st.just("stamp"), st.floats(0, 4e9)),
                          st.tuples(st.just("observe"), st.integers(0, 2**62))), max_size=50))
def test_every_stamp_is_above_everything_before_it(events: list[tuple[str, float]]) -> None:
    clock = HybridClock()
    highest = 0
    for kind, value in events:
        if kind == "observe":
            clock.observe(int(value))
            highest = max(highest, int(value))
        else:
            stamp = clock.stamp(value)
            assert stamp > highest and stamp >= int(value * 1000) << SHIFT
            highest = stamp
