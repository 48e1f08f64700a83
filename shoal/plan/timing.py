"""How the planner times things on a shared machine: the quiet runs of repeated timings."""

from __future__ import annotations

import statistics
import time


def quiet_seconds(times: list[float]) -> float:
    """The lower quartile of repeated timings: on a machine shared with other jobs, interference
    only ever adds time, so the quiet runs are the machine's own speed (the median of a busy
    minute here was seen 4x the quiet one)."""
    return statistics.quantiles(times, n=4)[0] if len(times) >= 4 else min(times)


def quiet_seconds_of(fn, min_total: float = 0.02, max_reps: int = 50) -> float:
    """The quiet timing of `fn`, run at least 3 times and for `min_total` seconds (at most `max_reps`)."""
    fn()  # warm-up: first-call allocations and thread pools
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_total and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return quiet_seconds(times)


def fixed_quiet(fn, reps: int) -> float:
    """The quiet timing of a fixed number of runs: every rank must run a collective the same number of times."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return quiet_seconds(times)


def paired_difference(fn, baseline, reps: int) -> float:
    """Seconds `fn` takes beyond `baseline`: the median of `reps` differences, each of one run of
    both back to back (their order alternating). A difference of two separate quiet timings moved
    by 1.7x between calibrations with 4 workers on 2 cores: the other workers' phases fall on
    one side's runs and not the other's; paired runs share them. Every rank runs the same
    sequence, so either side may hold collectives."""
    fn(), baseline()

    def seconds(call) -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    diffs = []
    for rep in range(reps):
        if rep % 2 == 0:
            diffs.append(seconds(fn) - seconds(baseline))
        else:
            diffs.append(-seconds(baseline) + seconds(fn))  # baseline first: left to right
    return statistics.median(diffs)
