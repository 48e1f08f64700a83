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

    Workers beyond the core count share cores. What was timed with at most one worker per core
    (matrix multiplies, the cost per operator and bandwidth) is stretched by world / cores; what
    was timed with all `world` workers at once (block profiles, DTensor and FSDP costs,
    collectives) carries the sharing already.
    Gloo's collectives copy and reduce on the same cores the workers
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

    def compute_seconds(self, count: OpCount, dtensor_ops: int = 0, tp_linears: float = 0,
                        dtensor_kind: str = "fsdp", optimizer: bool = False) -> float:
        """`dtensor_kind`: whose DTensors the `dtensor_ops` run on, "fsdp" or "tp" (calibrated apart);
        `optimizer`: the count is an optimizer step's (no autograd: its own cost per operator)."""
        key = str(self.threads)
        new = ensure_compute(self.cal, self.threads, {tuple(s) for s in count.matmuls})
        if new:
            self.measured_shapes.extend(new)
            save_calibration(self.cal)
        # matrix multiplies were timed alone: workers beyond the cores wait their turn
        matmul = self.oversubscribed * sum(n * 2 * m * k * c / self.cal.matmul[f"{key}:{m},{k},{c}"]
                                           for (m, k, c), n in count.matmuls.items())
        if self.world > 1 and self.cal.concurrent:
            # operator cost and bandwidth timed with as many workers at once as there are cores
            # (shared caches and memory); workers beyond the cores then take turns on them
            sharing = min(self.world, self.cal.cores)
            overhead, bandwidth = self.cal.concurrent[str(min((int(w) for w in self.cal.concurrent),
                                                              key=lambda w: (abs(w - sharing), -w)))]
            if optimizer and self.cal.optimizer_op:
                overhead = self.cal.optimizer_op[str(min((int(w) for w in self.cal.optimizer_op),
                                                         key=lambda w: (abs(w - sharing), -w)))]
            overhead, bandwidth = overhead * self.oversubscribed, bandwidth / self.oversubscribed
        else:
            overhead, bandwidth = self.cal.op_overhead[key], self.cal.bandwidth[key]
        seconds = count.ops * overhead + count.bytes / bandwidth + matmul
        if self.world > 1:
            per_op = self.cal.tp_dtensor_op if dtensor_kind == "tp" else self.cal.dtensor_op
            seconds += dtensor_ops * self._nearest(per_op) + tp_linears * self._nearest(self.cal.tp_linear)
        return seconds

    def compression_seconds(self, method: str, numel: int, dp: int) -> float:
        """What a compressed all-reduce hook adds to one bucket of `numel` gradients beyond its
        collective: its own arithmetic, timed per gradient element on `dp` ranks at once at a
        bucket's size (shoal/plan/overheads.py). Counting its bytes against the `add_` bandwidth
        under-priced it ~5x here: rounding, casts to small integers and back run far slower per
        byte, and the hook makes passes (error feedback, the payload's copy) a count misses."""
        per_dp = {int(key.split(":")[1]): value for key, value in self.cal.hook_element.items()
                  if key.split(":")[0] == method}
        measured = min(per_dp, key=lambda w: (abs(w - dp), -w))
        return numel * per_dp[measured]

    def ddp_seconds(self, tensors: int, grad_bytes: float = 0.0) -> float:
        """What DDP adds to one forward+backward beyond its all-reduces, for `tensors` parameter
        tensors holding `grad_bytes` of gradients (calibrated with this many workers: forward
        bookkeeping, a hook per gradient and finalisation per step and tensor; bucket copies and
        the division by the world per byte)."""
        if not self.cal.ddp_step:
            return 0.0
        per_step, per_tensor, per_byte = self._nearest(self.cal.ddp_step)
        return per_step + tensors * per_tensor + grad_bytes * per_byte

    def fsdp_seconds(self, units: int, tensors: float, group: int | None = None, sync: str = "full",
                     sharded_bytes: float = 0.0) -> float:
        """What FSDP2 adds to one forward+backward beyond its collectives, for `units`
        fully_shard'ed modules holding `tensors` parameter tensors on a data-parallel group of
        `group` ranks (hooks and unshard per module; copy-in, copy-out and DTensor views per
        tensor). Calibrated on groups of 2 and 4 workers, each group alone on the host: a group
        smaller than the world (pp 2 x dp 2) is priced at its own size, stretched by world / cores
        as its workers share the cores with the other groups'. `sync`: "full" for a pass that
        reduces its gradients; "pipeline" for a pipeline stage's micro-batch and "accumulating"
        for an accumulation micro-step, which do not (their calibrated fraction of a full pass).
        `sharded_bytes`: the unsharded bytes of the parameters it gathers (none when it only
        replicates), each copied into and out of the collectives' buffers."""
        group = group or self.world
        at = str(min((int(w) for w in self.cal.fsdp_unit), key=lambda w: (abs(w - group), -w)))
        seconds = units * self.cal.fsdp_unit[at] + tensors * self.cal.fsdp_param[at] + \
            sharded_bytes * self.cal.fsdp_byte[at]
        if sync != "full":
            seconds *= self.cal.fsdp_nosync[at][("pipeline", "accumulating").index(sync)]
        return seconds if group >= self.world else seconds * self.oversubscribed

    def profile_blocks(self, cfg, model, shapes: set[tuple[int, int, int]]) -> None:
        """Profile, in one start of `world` workers, every (micro-batch, tp, depth) not yet cached."""
        from shoal.plan.profile import can_profile, profile_blocks, profile_key
        missing = sorted(s for s in shapes if len(self.cal.blocks.get(profile_key(cfg, *s, self.world), [])) < 3)
        if not missing or not can_profile(model):
            return
        from shoal.plan.overheads import CLIP_NORM_BYTES, CLIP_NORM_REDUCES
        norms = {tp: CLIP_NORM_REDUCES["tp"] * self.collective("all_reduce", tp).seconds(CLIP_NORM_BYTES)
                 for _, tp, _ in missing if tp > 1}
        for shape, times in profile_blocks(cfg, self.world, missing, norms).items():
            key = profile_key(cfg, *shape, self.world)
            self.cal.blocks[key] = list(times)
            self.measured_blocks.append(key)
        save_calibration(self.cal)

    def block_seconds(self, cfg, model, micro: int, tp: int, depth: int) -> tuple[float, float]:
        """(one block, the rest of the model) forward+backward at this micro-batch and tp, in a
        stage of `depth` blocks, with `world` workers at once, profiled on first use and cached
        (shoal/plan/profile.py)."""
        from shoal.plan.profile import profile_key
        self.profile_blocks(cfg, model, {(micro, tp, depth)})
        block, rest = self.cal.blocks[profile_key(cfg, micro, tp, depth, self.world)][:2]
        # profiled with all `world` workers at once: the cores' sharing is in the profile (not
        # scaled again: doing so over-predicted 4 workers' FSDP and TP steps here by 1.5-2.3x)
        return block, rest

    def optimizer_per_op(self, cfg, model, micro: int, tp: int, depth: int) -> float:
        """The profiled seconds per optimizer operator (clipping and AdamW) on the stage's own
        parameters at this tp, with `world` workers at once."""
        from shoal.plan.profile import profile_key
        self.profile_blocks(cfg, model, {(micro, tp, depth)})
        return self.cal.blocks[profile_key(cfg, micro, tp, depth, self.world)][2]

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

    def compute_seconds(self, count: OpCount, dtensor_ops: int = 0, tp_linears: float = 0,
                        dtensor_kind: str = "fsdp", optimizer: bool = False) -> float:
        matmul_flops = sum(n * 2 * m * k * c for (m, k, c), n in count.matmuls.items())
        work = matmul_flops / (self.peak_flops * self.efficiency) + count.bytes / (self.memory_bandwidth *
                                                                                     self.efficiency)
        # kernels launch asynchronously: the launch cost shows only where kernels are shorter than it
        return max(work, count.ops * self.kernel_launch) + (dtensor_ops + 10 * tp_linears) * 20e-6  # DTensor dispatch runs on the host

    def compression_seconds(self, method: str, numel: int, dp: int) -> float:
        from shoal.plan.steptime import count_compression
        return self.compute_seconds(count_compression(method, numel, dp))

    def collective(self, op: str, k: int, stride: int = 1) -> CollectiveCost:
        """A ring over k ranks `stride` apart: inside a node when it fits, else its slowest link
        is the inter-node one."""
        inside = stride * k <= self.per_node
        return CollectiveCost.from_link(op, k, self.intra_bandwidth if inside else self.inter_bandwidth,
                                        self.intra_latency if inside else self.inter_latency)

    def disk_write(self) -> float:
        return self.checkpoint_bandwidth
