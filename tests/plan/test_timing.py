"""The planner's timing helpers (shoal/plan/timing.py)."""

from __future__ import annotations

import time

from shoal.plan.timing import paired_difference


def test_paired_difference_alternates_its_pairs_and_measures_the_extra():
    """Each pair runs both functions back to back, in alternating order, so that whatever else
    the machine does falls on both sides; the result is the extra time of the first."""
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.003)

    def fast():
        calls.append("fast")
    extra = paired_difference(slow, fast, 6)
    assert calls[:2] == ["slow", "fast"]  # the warm-up
    pairs = [calls[i:i + 2] for i in range(2, len(calls), 2)]
    assert pairs == [["slow", "fast"], ["fast", "slow"]] * 3
    assert extra >= 0.003  # a sleep lasts at least as long as asked, on any machine
    assert paired_difference(fast, slow, 4) <= -0.003
