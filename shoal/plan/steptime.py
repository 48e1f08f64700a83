"""Predicted step time of a layout: counted work, calibrated (or specified) hardware, and
the communication each technique adds.

Per step, on the busiest rank:
- compute: the rank's forward+backward (FLOPs from FlopCounterMode, operators and bytes
  from a dispatch log, shoal/plan/opcount.py), its share under tensor parallelism, its
  stage under pipelining, recomputation under activation checkpointing;
- pipeline bubble: (m + p - 1) stage-slots for m micro-batches on p ranks (GPipe, 1F1B), and
  (m v + p - 1) slots of 1/v of a stage with v stages per rank (interleaved; Narayanan et
  al., "Efficient Large-Scale Language Model Training on GPU Clusters", SC 2021);
- communication as latency + size/bandwidth (shoal/plan/collectives.py): DDP's bucketed
  all-reduce (hidden behind backward where the hardware overlaps it, all but its last
  bucket), FSDP's all-gathers and reduce-scatters per block, HSDP's all-reduce across
  replicas, tensor parallel's per-block all-gathers and reduce-scatters (sequence parallel),
  pipeline send/recv, compressed hooks' smaller messages, DiLoCo's outer all-reduce once
  every H steps;
- the optimizer step (and gradient clipping) on the rank's parameter shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from shoal.config import Config
from shoal.plan.opcount import OpCount, count_forward_backward, count_optimizer_step
from shoal.plan.overheads import CLIP_NORM_BYTES, CLIP_NORM_REDUCES
from shoal.runtime.mesh import ParallelDims

DDP_BUCKET_BYTES = 25 * 2**20
# bytes sent per fp32 gradient byte by each compressed all-reduce (shoal/sync/compress.py)
HOOK_RATIO = {"fp16": 0.5, "bf16": 0.5, "int8": 0.25, "int4": 0.125}


@dataclass
class StepTime:
    compute: float
    """Forward, backward, recomputation and pipeline bubble, seconds."""
    optimizer: float
    comm: float
    """Seconds of communication in total (per step, amortised for DiLoCo)."""
    exposed: float
    """Seconds of communication not hidden behind compute."""
    notes: list[str] = field(default_factory=list)
    clip_comm: float = 0.0
    """Seconds of `exposed` spent after backward, in the gradient norm's all-reduces."""

    @property
    def total(self) -> float:
        return self.compute + self.optimizer + self.exposed


def _sample(cfg: Config, model: nn.Module, batch: int):
    """Meta inputs and targets of one micro-batch of `batch` samples."""
    from shoal.plan.memory import data_spec
    spec = data_spec(cfg)
    if spec.kind == "tokens":
        return (torch.zeros(batch, spec.seq_len, dtype=torch.long, device="meta"),
                torch.zeros(batch, spec.seq_len, dtype=torch.long, device="meta"))
    x = torch.zeros(batch, spec.in_features, device="meta")
    if spec.kind == "regression":
        return x, torch.zeros(batch, spec.num_classes, device="meta")
    return x, torch.zeros(batch, dtype=torch.long, device="meta")


class WorkCounter:
    """Counts of the whole model and of one block, per micro-batch size, cached."""

    def __init__(self, cfg: Config, model: nn.Module):
        self.cfg, self.model = cfg, model
        self.blocks = len(model.layers) if hasattr(model, "layers") else 0
        self._cache: dict = {}

    def whole(self, batch: int) -> OpCount:
        if ("whole", batch) not in self._cache:
            self._cache[("whole", batch)] = count_forward_backward(self.model, *_sample(self.cfg, self.model, batch))
        return self._cache[("whole", batch)]

    def block(self, batch: int, forward_only: bool = False) -> OpCount:
        key = ("block", batch, forward_only)
        if key not in self._cache:
            block = next(iter(self.model.layers.values()))
            x = torch.zeros(batch, self.cfg.data.seq_len, self.model.args.dim, device="meta", requires_grad=True)
            if forward_only:
                from shoal.plan.opcount import OpCount as Count, _OperatorLog
                count = Count()
                with torch.no_grad(), _OperatorLog(count):
                    block(x)
            else:
                count = count_forward_backward(block, x, None, lambda out, _: out.sum())
            self._cache[key] = count
        return self._cache[key]


def _minus(a: OpCount, b: OpCount, times: int) -> OpCount:
    matmuls = dict(a.matmuls)
    for shape, n in b.matmuls.items():
        matmuls[shape] = matmuls.get(shape, 0) - n * times
    return OpCount(a.flops - b.flops * times, {s: n for s, n in matmuls.items() if n > 0},
                   max(0, a.ops - b.ops * times), max(0.0, a.bytes - b.bytes * times))


def _plus(*counts: tuple[OpCount, float]) -> OpCount:
    """Sum of counts, each taken `times` times (times may be fractional: a share of a block)."""
    out = OpCount()
    for c, times in counts:
        out.flops += c.flops * times
        out.ops += int(round(c.ops * times))
        out.bytes += c.bytes * times
        for shape, n in c.matmuls.items():
            out.matmuls[shape] = out.matmuls.get(shape, 0) + n * times
    return out


def _tp_split(count: OpCount, tp: int) -> OpCount:
    """A block's work on one of tp ranks: every matmul's output columns (or inner size) and
    every elementwise tensor (sequence parallel) cut tp ways; the same operators still run."""
    if tp == 1:
        return count
    return OpCount(count.flops / tp, {(m, k, max(1, n // tp)): c for (m, k, n), c in count.matmuls.items()},
                   count.ops, count.bytes / tp)


def compression_arithmetic(method: str, bucket: torch.Tensor, dp: int) -> None:
    """The arithmetic one rank's compressed all-reduce does on a bucket of gradients, as
    shoal/sync/compress.py (int8, int4) and torch's fp16 hook do it: run on the meta device to
    count it (on this host the real hooks are timed instead: shoal/plan/overheads.py)."""
    from shoal.sync.compress import dequantize, quantize
    numel = bucket.numel()
    if method in ("int8", "int4"):
        bits = int(method[3:])
        flat = bucket + bucket  # error feedback: the carried error is added, then replaced
        codes, scales = quantize(flat, bits)
        _ = flat - dequantize(codes, scales, bits, numel)
        total = torch.zeros_like(bucket)
        for _rank in range(dp):  # every rank's payload dequantised and summed
            total.add_(dequantize(codes, scales, bits, numel))
        total.div_(dp)
        bucket.copy_(total)
    else:
        half = bucket.div(dp).to(torch.float16)
        bucket.copy_(half)


def count_compression(method: str, numel: int, dp: int) -> OpCount:
    """The arithmetic of one compressed bucket of `numel` gradients, counted on the meta device."""
    from shoal.plan.opcount import _OperatorLog
    count = OpCount()
    bucket = torch.zeros(numel, device="meta")
    with _OperatorLog(count):
        compression_arithmetic(method, bucket, dp)
    return count


def block_shape(cfg: Config, dims: ParallelDims, model: nn.Module) -> tuple[int, int, int]:
    """(micro-batch of one block's forward+backward, tp degree, blocks a forward+backward runs in
    one go: the model's, or one pipeline stage's) a layout runs `model`'s blocks at."""
    from shoal.parallel.stages import STAGES_PER_RANK
    micro = max(1, cfg.train.batch_size // dims.dp // cfg.train.grad_accum)
    blocks = len(model.layers) if hasattr(model, "layers") else 1
    if dims.pp == 1:
        return micro, dims.tp, max(1, blocks)
    stages = dims.pp * STAGES_PER_RANK[cfg.parallel.pp_schedule]
    return max(1, micro // cfg.parallel.pp_microbatches), dims.tp, max(1, round(blocks / stages))


def predict_step(cfg: Config, dims: ParallelDims, model: nn.Module, hw, counter: WorkCounter | None = None,
                 param_bytes_per_rank: int | None = None) -> StepTime:
    """Seconds of one optimizer step of `cfg` under `dims` on hardware `hw` (LocalHost or Accelerators)."""
    from shoal.parallel.stages import STAGES_PER_RANK
    counter = counter or WorkCounter(cfg, model)
    notes: list[str] = []
    dp, tp, pp = dims.dp, dims.tp, dims.pp
    accum = cfg.train.grad_accum
    micro = max(1, cfg.train.batch_size // dp // accum)
    n_blocks = counter.blocks
    ac = cfg.parallel.activation_checkpointing
    fsdp = dims.dp_shard > 1 or (dp > 1 and (tp > 1 or pp > 1))
    total_param_bytes = sum(p.numel() for p in model.parameters()) * 4
    comm = exposed = 0.0

    def recomputed(batch: int) -> OpCount:
        """One block's forward again (activation checkpointing), or its non-matmul part (selective)."""
        fwd = counter.block(batch, forward_only=True)
        if ac == "selective":  # matmul outputs kept: the rest of the forward runs again
            fwd = OpCount(0.0, {}, fwd.ops - sum(fwd.matmuls.values()), fwd.bytes)
        return _tp_split(fwd, tp)

    def model_work(batch: int, blocks: float, with_rest: bool) -> OpCount:
        if not n_blocks:
            return counter.whole(batch)
        block, whole = counter.block(batch), counter.whole(batch)
        rest = _minus(whole, block, n_blocks)
        parts = [(_tp_split(block, tp), blocks)] + ([(rest, 1.0)] if with_rest else [])
        if ac != "none":
            parts.append((recomputed(batch), blocks))
        return _plus(*parts)

    # tensor parallel: each Linear in a block is a DTensor module (colwise or rowwise)
    linears = sum(1 for mod in next(iter(model.layers.values())).modules() if isinstance(mod, nn.Linear)) \
        if (tp > 1 and n_blocks) else 0

    def stage_seconds(batch: int, blocks: float) -> float:
        """Forward+backward of `blocks` blocks and the rest of the model on `batch` samples: from the
        block's profile where the hardware has one (this host), else from counted work."""
        if not profiled:
            return hw.compute_seconds(model_work(batch, blocks, True), tp_linears=linears * blocks)
        block_s, rest_s = hw.block_seconds(cfg, model, batch, tp, depth)
        extra = hw.compute_seconds(_plus((recomputed(batch), blocks))) if ac != "none" else 0.0
        return blocks * block_s + rest_s + extra

    from shoal.plan.profile import can_profile
    profiled = bool(n_blocks) and hasattr(hw, "block_seconds") and can_profile(model)
    shape = block_shape(cfg, dims, model)
    depth = shape[2]
    if pp == 1:
        compute = accum * stage_seconds(shape[0], n_blocks)
        backward = compute * 2 / 3
    else:
        v = STAGES_PER_RANK[cfg.parallel.pp_schedule]
        m = cfg.parallel.pp_microbatches
        stage_micro = shape[0]
        per_rank_blocks = n_blocks / pp
        # the last rank holds the head and loss as well as its blocks: the slowest slot
        slot = stage_seconds(stage_micro, per_rank_blocks / v)
        if hasattr(hw, "pipeline_slot"):  # the schedule's own bookkeeping per slot (calibrated)
            slot += hw.pipeline_slot()
        slots = m * v + pp - 1
        compute = accum * slots * slot
        send = hw.collective("send_recv", 2).seconds(stage_micro * cfg.data.seq_len * model.args.dim * 4)
        p2p = accum * 2 * slots * send
        comm += p2p
        exposed += p2p
        backward = compute * 2 / 3
        notes.append(f"bubble {(pp - 1) / (m * v + pp - 1):.0%}")

    # tensor parallel: per block, forward all-gathers the norm outputs and reduce-scatters the
    # attention and MLP outputs (2 + 2); backward the same again
    if tp > 1:
        ag, rs = hw.collective("all_gather", tp), hw.collective("reduce_scatter", tp)
        tp_micro, rounds = (max(1, micro // cfg.parallel.pp_microbatches), cfg.parallel.pp_microbatches) \
            if pp > 1 else (micro, 1)
        tp_bytes = tp_micro * cfg.data.seq_len * model.args.dim * 4
        tp_comm = accum * rounds * (n_blocks / pp) * 4 * (ag.seconds(tp_bytes) + rs.seconds(tp_bytes))
        comm += tp_comm
        if not profiled:  # a profiled block's time holds its own collectives
            exposed += tp_comm  # on the critical path: each block waits for its inputs

    method = cfg.sync.method
    local_bytes = param_bytes_per_rank if param_bytes_per_rank is not None else total_param_bytes // (tp * pp)
    grad_comm = 0.0
    if dp > 1 and method in ("local_sgd", "diloco"):
        h = cfg.sync.inner_steps
        ratio = {"none": 1.0, "fp4": 0.125 + 1 / 64, "topk": cfg.sync.topk_fraction * (cfg.sync.topk_bits + 12) / 32}
        sent = local_bytes * (ratio.get(cfg.sync.compression, 1.0) if method == "diloco" else 1.0)
        outer = hw.collective("all_reduce", dp, stride=tp).seconds(sent)
        grad_comm = outer / h
        notes.append(f"outer sync every {h} steps: {outer:.3g}s")
        comm += grad_comm
        exposed += grad_comm
    elif dp > 1 and not fsdp:
        # DDP: gradients all-reduced in buckets as backward produces them
        ar = hw.collective("all_reduce", dp, stride=tp)
        if method in HOOK_RATIO:
            ratio = HOOK_RATIO[method]
            op = "all_gather" if method in ("int8", "int4") else "all_reduce"
            gather = hw.collective(op, dp, stride=tp)
            per_bucket = (lambda b: gather.seconds(b * ratio * (dp if op == "all_gather" else 1)))
        elif method == "powersgd":
            r = cfg.sync.powersgd_rank
            low = sum((p.shape[0] + p.shape[1]) * r * 4 if p.dim() == 2 else p.numel() * 4 for p in model.parameters())
            per_bucket = (lambda b: 2 * ar.seconds(b * low / total_param_bytes))
        else:
            per_bucket = ar.seconds
        if hasattr(hw, "ddp_seconds"):  # DDP's own work around its all-reduces, on the cores that compute
            tensors = sum(1 for _ in model.parameters()) // (tp * pp)
            compute += (accum - 1) * hw.ddp_seconds(tensors) + hw.ddp_seconds(tensors, local_bytes)
        n_buckets = max(1, math.ceil(local_bytes / DDP_BUCKET_BYTES))
        bucket = local_bytes / n_buckets
        grad_comm = n_buckets * per_bucket(bucket)
        if method in HOOK_RATIO:  # the hook's own arithmetic, on the same cores
            compute += n_buckets * hw.compression_seconds(method, int(bucket // 4), dp)
        comm += grad_comm
        if hw.overlaps_backward:
            exposed += max(per_bucket(bucket), grad_comm - backward)
        else:
            exposed += grad_comm
    elif fsdp:
        units = max(1, round(n_blocks / pp)) + 1  # each block of this rank's stages, and the root
        unit_bytes = local_bytes * dims.dp_shard / units  # whole (unsharded) unit
        fsdp_comm = 0.0
        # the forward+backward passes of a step that do not reduce gradients: a pipeline stage
        # reduces once per schedule step, after its last micro-batch (its backwards keep the
        # parameters unsharded); gradient accumulation reduces after the last micro-step
        m = cfg.parallel.pp_microbatches if pp > 1 else 1
        unsynced = accum * (m - 1) if pp > 1 else accum - 1
        reductions = accum if pp > 1 else 1
        if dims.dp_shard > 1:
            ag = hw.collective("all_gather", dims.dp_shard, stride=tp)
            rs = hw.collective("reduce_scatter", dims.dp_shard, stride=tp)
            # a pass gathers every unit in forward, and in backward all but the last block and
            # the root (they stay unsharded after forward); a pipeline micro-batch after the first
            # finds them all unsharded and gathers in backward only
            gathers = units + max(0, units - 2)
            per_pass = max(0, units - 2) if pp > 1 else gathers
            fsdp_comm += ((reductions * gathers + unsynced * per_pass) * ag.seconds(unit_bytes)
                          + reductions * units * rs.seconds(unit_bytes))
        if dims.dp_replicate > 1:  # HSDP, or replicate-only FSDP beside tp/pp: shards all-reduced
            fsdp_comm += reductions * units * hw.collective("all_reduce", dims.dp_replicate, stride=tp * dims.dp_shard
                                               ).seconds(unit_bytes / dims.dp_shard)
        comm += fsdp_comm
        if hasattr(hw, "fsdp_seconds"):
            # FSDP2's own work each forward+backward, per module (hooks, unshard, reshard) and per
            # parameter tensor (copy-in and copy-out around each gather, DTensor views, gradient
            # shards), on the cores that compute; also when it only replicates (beside pp or tp),
            # and under a pipeline on every micro-batch (its hooks run on every stage call), a
            # calibrated fraction of it on the passes that do not reduce
            tensors = sum(1 for _ in model.parameters()) / pp
            gathered = local_bytes * dims.dp_shard if dims.dp_shard > 1 else 0.0
            compute += reductions * hw.fsdp_seconds(units, tensors, group=dp, sharded_bytes=gathered)
            if unsynced:
                compute += unsynced * hw.fsdp_seconds(units, tensors, group=dp, sharded_bytes=gathered,
                                                      sync="pipeline" if pp > 1 else "accumulating")
        first = unit_bytes / dims.dp_shard
        exposed += max(fsdp_comm - backward, first / 1e12) if hw.overlaps_backward else fsdp_comm

    # optimizer step and clipping over this rank's parameters
    params = list(model.parameters())
    opt = count_optimizer_step(params, cfg.train.optimizer, cfg.train.momentum)
    # on an accelerator torch's AdamW runs foreach kernels: one launch per operator for all tensors
    ops = opt.ops / len(params) if getattr(hw, "foreach_optimizer", False) else opt.ops / pp
    opt = OpCount(0.0, {}, int(ops), opt.bytes * local_bytes / total_param_bytes)
    if cfg.train.grad_clip:
        opt = _plus((opt, 1.0), (OpCount(0.0, {}, 2 * len(params) // pp, local_bytes), 1.0))
    # FSDP and tensor-parallel parameters are DTensors: every optimizer operator goes through DTensor dispatch
    # (tensor-parallel DTensors, Shard(0), Shard(1) and Replicate on one mesh, propagate their
    # sharding at a higher cost per operator than FSDP's Shard(0): calibrated apart)
    # Pure tensor parallelism's parameters are the profiled ones; FSDP over tensor parallelism
    # turns them into 2-D DTensors, whose step measured here costs what FSDP's does (4 workers,
    # gpt 192x4: clipping + AdamW 63 ms under dp 2 x tp 2, 364 ms under tp 4, 45 ms under FSDP)
    tp_params = tp > 1 and not fsdp
    if profiled and tp_params:  # the model's own tensor-parallel parameters, their step profiled beside its block
        optimizer = opt.ops * hw.optimizer_per_op(cfg, model, *shape)
    else:
        optimizer = hw.compute_seconds(opt, dtensor_ops=opt.ops if (fsdp or tp > 1) else 0,
                                       dtensor_kind="tp" if tp_params else "fsdp", optimizer=True)
    if cfg.train.grad_clip:
        # the global norm: its all-reduces per kind of sharded gradient, and one across stages
        clip = 0.0
        if fsdp:
            clip += CLIP_NORM_REDUCES["fsdp"] * hw.collective("all_reduce", dims.dp_shard * tp, stride=1).seconds(
                CLIP_NORM_BYTES)
        if tp > 1:
            clip += CLIP_NORM_REDUCES["tp"] * hw.collective("all_reduce", tp).seconds(CLIP_NORM_BYTES)
        if pp > 1:
            clip += hw.collective("all_reduce", pp, stride=dims.world_size // pp).seconds(CLIP_NORM_BYTES)
        comm += clip
        exposed += clip
    else:
        clip = 0.0
    return StepTime(compute=compute, optimizer=optimizer, comm=comm, exposed=exposed, notes=notes, clip_comm=clip)
