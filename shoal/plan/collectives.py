"""Collective costs as latency + size / bandwidth (the alpha-beta model), fitted or from specs.

A collective of `n` bytes on a group of `k` ranks costs `latency + n / bandwidth`, where both
depend on the operation and on `k`. Measured fits come from `shoal plan --calibrate` at 2
and 4 ranks; other group sizes follow the ring algorithm's scaling (Thakur, Rabenseifner
and Gropp, "Optimization of Collective Communication Operations in MPICH", 2005): an
all-reduce sends 2(k-1)/k of the buffer over each link in 2(k-1) steps, an all-gather or a
reduce-scatter (k-1)/k in k-1 steps, a send one message in one step.
"""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


def ring_volume(op: str, k: int) -> float:
    """Bytes each link carries per byte of the (whole) buffer, for a ring of k ranks."""
    if k <= 1:
        return 0.0
    return {"all_reduce": 2 * (k - 1) / k, "all_gather": (k - 1) / k, "reduce_scatter": (k - 1) / k,
            "send_recv": 1.0}[op]


def ring_steps(op: str, k: int) -> int:
    if k <= 1:
        return 0
    return {"all_reduce": 2 * (k - 1), "all_gather": k - 1, "reduce_scatter": k - 1, "send_recv": 1}[op]


@dataclass(frozen=True)
class CollectiveCost:
    """One operation on one group size: seconds = latency + bytes / bandwidth."""

    latency: float
    """Seconds of a message of no size."""
    bandwidth: float
    """Bytes of the whole buffer per second (the 'algorithm bandwidth')."""

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth

    def to_group(self, op: str, measured_k: int, k: int) -> CollectiveCost:
        """The same links used by a ring of k ranks instead of `measured_k`."""
        if k == measured_k:
            return self
        if k <= 1:
            return CollectiveCost(0.0, float("inf"))
        link_bandwidth = self.bandwidth * ring_volume(op, measured_k)
        step_latency = self.latency / ring_steps(op, measured_k)
        return CollectiveCost(step_latency * ring_steps(op, k), link_bandwidth / ring_volume(op, k))

    @classmethod
    def from_link(cls, op: str, k: int, link_bandwidth: float, link_latency: float) -> CollectiveCost:
        """A ring of k ranks over links of the given bandwidth (bytes/s) and latency (s)."""
        if k <= 1:
            return cls(0.0, float("inf"))
        return cls(link_latency * ring_steps(op, k), link_bandwidth / ring_volume(op, k))


def fit_cost(sizes: list[float], seconds: list[float]) -> CollectiveCost:
    """Least-squares line through (bytes, seconds), latency and slope kept non-negative."""
    if len(sizes) < 2 or len(sizes) != len(seconds):
        raise ValueError("fit_cost needs at least two (size, seconds) pairs of equal length")
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    var = sum((x - mean_x) ** 2 for x in sizes)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / var if var else 0.0
    slope = max(slope, 1e-15)
    latency = max(mean_y - slope * mean_x, 0.0)
    return CollectiveCost(latency, 1.0 / slope)
