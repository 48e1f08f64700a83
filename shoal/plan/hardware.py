"""What one rank's hardware does with counted work: this host from its calibration, or an
accelerator from its published specs (shoal/plan/cluster.py).

Both answer the same two questions the step-time model asks: how long a counted piece of
work (`OpCount`) takes on one rank, and what a collective of a given group costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.plan.calibrate import Calibration, ensure_compute, save_calibration
from shoal.plan.collectives import CollectiveCost
from shoal.plan.opcount import OpCount


@dataclass
class LocalHost:
    """`world` workers on this host, each with its share of the cores (as `shoal run` gives them).

    Workers beyond the core count share cores: their compute is stretched by the
    oversubscription. Gloo's collectives copy and reduce on the same cores the workers
    compute on, so on this host communication is not hidden behind backward.
    """

    cal: Calibration
    world: int
    measured_shapes: list | None = None

    def __post_init__(self):
        self.threads = max(1, self.cal.cores // self.world)
        self.oversubscribed = max(1.0, self.world * self.threads / self.cal.cores)
        self.measured_shapes = []
        self.measured_blocks: list[str] = []

    overlaps_backward = False
    spec_only = False

    def _nearest(self, table: dict):
        return table[str(min((int(w) for w in table), key=lambda w: (abs(w - self.world), -w)))]

    def compute_seconds(self, count: OpCount, dtensor_ops: int = 0, tp_linears: float = 0) -> float:
        key = str(self.threads)
        new = ensure_compute(self.cal, self.threads, {tuple(s) for s in count.matmuls})
        if new:
            self.measured_shapes.extend(new)
            save_calibration(self.cal)
        # matrix multiplies were timed alone: workers beyond the cores wait their turn
        matmul = self.oversubscribed * sum(n * 2 * m * k * c / self.cal.matmul[f"{key}:{m},{k},{c}"]
                                           for (m, k, c), n in count.matmuls.items())
        if self.world > 1 and self.cal.concurrent:
            # operator cost and bandwidth timed with `world` workers at once (shared caches, cores)
            overhead, bandwidth = self._nearest(self.cal.concurrent)
            scale = self.world / int(min(self.cal.concurrent, key=lambda w: abs(int(w) - self.world)))
            overhead, bandwidth = overhead * max(1.0, scale), bandwidth / max(1.0, scale)
        else:
            overhead, bandwidth = self.cal.op_overhead[key], self.cal.bandwidth[key]
        seconds = count.ops * overhead + count.bytes / bandwidth + matmul
        if self.world > 1:
            seconds += dtensor_ops * self._nearest(self.cal.dtensor_op) + tp_linears * self._nearest(self.cal.tp_linear)
        return seconds

    def profile_blocks(self, cfg, model, shapes: set[tuple[int, int]]) -> None:
        """Profile, in one start of `world` workers, every (micro-batch, tp) not yet cached."""
        from shoal.plan.profile import can_profile, profile_blocks, profile_key
        missing = sorted(s for s in shapes if profile_key(cfg, *s, self.world) not in self.cal.blocks)
        if not missing or not can_profile(model):
            return
        for (micro, tp), times in profile_blocks(cfg, self.world, missing).items():
            key = profile_key(cfg, micro, tp, self.world)
            self.cal.blocks[key] = list(times)
            self.measured_blocks.append(key)
        save_calibration(self.cal)

    def block_seconds(self, cfg, model, micro: int, tp: int) -> tuple[float, float]:
        """(one block, the rest of the model) forward+backward at this micro-batch and tp, with
        `world` workers at once, profiled on first use and cached (shoal/plan/profile.py)."""
        from shoal.plan.profile import profile_key
        self.profile_blocks(cfg, model, {(micro, tp)})
        return tuple(self.cal.blocks[profile_key(cfg, micro, tp, self.world)])

    def pipeline_slot(self) -> float:
        """Seconds the pipeline schedule itself adds per slot (calibrated with this many workers)."""
        return self._nearest(self.cal.pp_slot) if self.cal.pp_slot else 0.0

    def collective(self, op: str, k: int, stride: int = 1) -> CollectiveCost:
        return self.cal.collective(op, k)

    def disk_write(self) -> float:
        return self.cal.disk_write


@dataclass
class Accelerators:
    """`world` accelerators of a cluster spec, `per_node` to a node, at `efficiency` of peak."""

    peak_flops: float
    """FLOP/s at the training dtype, dense, from the spec sheet."""
    memory_bandwidth: float
    """HBM bytes/s."""
    efficiency: float
    """Share of peak FLOP/s and bandwidth reached in practice (calibrate on one node)."""
    per_node: int
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    kernel_launch: float = 5e-6
    """Seconds per operator when the operator itself is tiny (CUDA launch, ~5 us)."""
    checkpoint_bandwidth: float = 2e9
    overlaps_backward = True
    spec_only = True
    foreach_optimizer = True

    def compute_seconds(self, count: OpCount, dtensor_ops: int = 0, tp_linears: float = 0) -> float:
        matmul_flops = sum(n * 2 * m * k * c for (m, k, c), n in count.matmuls.items())
        work = matmul_flops / (self.peak_flops * self.efficiency) + count.bytes / (self.memory_bandwidth *
                                                                                     self.efficiency)
        # kernels launch asynchronously: the launch cost shows only where kernels are shorter than it
        return max(work, count.ops * self.kernel_launch) + (dtensor_ops + 10 * tp_linears) * 20e-6  # DTensor dispatch runs on the host

    def collective(self, op: str, k: int, stride: int = 1) -> CollectiveCost:
        """A ring over k ranks `stride` apart: inside a node when it fits, else its slowest link
        is the inter-node one."""
        inside = stride * k <= self.per_node
        return CollectiveCost.from_link(op, k, self.intra_bandwidth if inside else self.inter_bandwidth,
                                        self.intra_latency if inside else self.inter_latency)

    def disk_write(self) -> float:
        return self.checkpoint_bandwidth
