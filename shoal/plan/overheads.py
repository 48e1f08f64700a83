"""What the framework's layers add to a step beyond arithmetic and collectives, timed on the
calibration's Gloo ranks (shoal/plan/calibrate.py runs these in each of its worlds): FSDP2's and
DDP's own work, the optimizer on plain and DTensor parameters, a tensor-parallel Linear pair, a
pipeline schedule's slot and the compressed hooks' arithmetic. Each is a difference against the
same work without the layer, less the collectives the step-time model prices on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.plan.timing import fixed_quiet, paired_difference

CLIP_NORM_BYTES = 8
CLIP_NORM_REDUCES = {"fsdp": 1, "tp": 2}
"""Gradient clipping's scalar all-reduces (ParallelModel.clip_grad_norm_: one per kind of sharded
gradient): FSDP's Shard(0); tensor parallel's Shard(0) and Shard(1). The step-time model prices
them as collectives, so the DTensor optimizer costs timed here (and in profile.py) leave them out."""
HOOK_NUMEL = 1 << 21  # 8 MB of gradients: a bucket of the size DDP hands a hook (1 MB first, then 25 MB)


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Gradient clipping as training runs it (ParallelModel.clip_grad_norm_, with a bound so small
    that every gradient is scaled), then the optimizer step."""
    from shoal.parallel.compose import ParallelModel
    ParallelModel(module=model, model_parts=[model]).clip_grad_norm_(1e-9)
    optimizer.step()


def _stack(blocks: int, width: int, linears: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(*[nn.Linear(width, width) for _ in range(linears)]) for _ in range(blocks)])


def _sharded_as_trained(blocks: int, width: int, mesh) -> nn.Sequential:
    """`_stack` sharded as shoal/parallel/shard.py shards a model: each block, all but the last
    resharded after forward, then the root."""
    from torch.distributed.fsdp import fully_shard
    model = _stack(blocks, width)
    for i, block in enumerate(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=i < blocks - 1)
    return fully_shard(model, mesh=mesh)


def dtensor_step(world: int, seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """What DTensor parameters add, on layers of negligible arithmetic:
    - fsdp_unit and fsdp_param: a forward+backward of 4 fully_shard'ed blocks against the same
      plain blocks, less the all-gathers and reduce-scatters' latency the step-time model
      already prices (the same count: each block gathered in forward and all but the last again
      in backward, each reduce-scattered once); blocks of 2 and of 6 Linears tell the cost per
      module from the cost per parameter tensor;
    - dtensor_op and tp_dtensor_op: the gradient clipping and AdamW step (as training runs them)
      on FSDP2 and on tensor-parallel parameters against plain ones, per counted operator."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from shoal.plan.opcount import count_optimizer_step
    mesh = init_device_mesh("cpu", (world,))
    blocks, width = 4, 8 * world
    x = torch.randn(2, width)

    def fully_sharded(linears: int) -> nn.Sequential:
        model = _stack(blocks, width, linears)
        for block in model:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    plain, sharded, wide = _stack(blocks, width), fully_sharded(2), fully_sharded(6)
    tp = parallelize_module(_stack(blocks, width), mesh, {f"{i}.{j}": (ColwiseParallel() if j == 0 else
                                                                       RowwiseParallel())
                                                          for i in range(blocks) for j in range(2)})

    def forward_backward_of(model, inputs):
        return lambda: model(inputs).sum().backward()

    def forward_backward(model):
        return forward_backward_of(model, x)
    params = list(plain.parameters())
    collectives = (2 * blocks - 1) * seconds["all_gather"][0] + blocks * seconds["reduce_scatter"][0]
    narrow = paired_difference(forward_backward(sharded), forward_backward(plain), 30) - collectives
    wide_extra = paired_difference(forward_backward(wide), forward_backward(_stack(blocks, width, 6)), 30) - collectives
    per_param = max(0.0, (wide_extra - narrow) / (blocks * 2 * (6 - 2)))  # weight and bias per Linear
    out = {"fsdp_param": [per_param], "fsdp_unit": [max(0.0, narrow - per_param * len(params)) / blocks],
           "fsdp_nosync": fsdp_without_sync(mesh, seconds, forward_backward(plain), x)}
    # DDP likewise, its one all-reduce (one bucket here) less at its latency
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    narrow = (fixed_quiet(forward_backward(DistributedDataParallel(_stack(blocks, width))), 20)
              - fixed_quiet(forward_backward(plain), 20) - seconds["all_reduce"][0])
    wide_extra = (fixed_quiet(forward_backward(DistributedDataParallel(_stack(blocks, width, 6))), 20)
                  - fixed_quiet(forward_backward(_stack(blocks, width, 6)), 20) - seconds["all_reduce"][0])
    per_tensor = max(0.0, (wide_extra - narrow) / (blocks * 2 * (6 - 2)))
    per_step = max(0.0, narrow - per_tensor * len(params))
    # and per gradient byte, on 8 MB of gradients: what DDP's reducer does beyond one all-reduce of them
    # all (copies into and out of its buckets, the division by the world, a first bucket of 1 MB
    # all-reduced apart); seen here as 0.5 ms per MB on 2 ranks and 1.6 on 4, a third of what DDP
    # steps of a 7 MB model measured above their profiled blocks and one all-reduce
    big_width = 512
    big_x = torch.randn(2, big_width)
    big, big_plain = DistributedDataParallel(_stack(blocks, big_width)), _stack(blocks, big_width)
    flat = torch.zeros(sum(p.numel() for p in big_plain.parameters()))
    whole = fixed_quiet(lambda: dist.all_reduce(flat), 10)
    big_extra = (fixed_quiet(forward_backward_of(big, big_x), 10)
                 - fixed_quiet(forward_backward_of(big_plain, big_x), 10) - whole
                 - per_step - per_tensor * len(params))
    out["ddp_step"] = [per_step, per_tensor, max(0.0, big_extra / (flat.numel() * 4))]
    out["fsdp_byte"] = [fsdp_per_byte(mesh, big_width, out["fsdp_unit"][0], out["fsdp_param"][0])]
    ops = count_optimizer_step(params, "adamw").ops + 2 * len(params)
    forward_backward(tp)()

    def step(model):
        optimizer = torch.optim.AdamW(model.parameters())
        return lambda: clip_and_step(model, optimizer)
    base = fixed_quiet(step(plain), 20)
    out["optimizer_op"] = [base / ops]
    # less the clipping's norm all-reduces, which the step-time model prices as collectives (one
    # for FSDP's Shard(0) gradients, one each for tensor parallel's Shard(0) and Shard(1)): on 4
    # workers sharing 2 cores their latency (3.5 ms) was a third of these steps and, spread over
    # the operators, priced again per operator
    norm = seconds["all_reduce"][0]
    out["dtensor_op"] = [max(0.0, fixed_quiet(step(sharded), 20) - base - CLIP_NORM_REDUCES["fsdp"] * norm) / ops]
    out["tp_dtensor_op"] = [max(0.0, fixed_quiet(step(tp), 20) - base - CLIP_NORM_REDUCES["tp"] * norm) / ops]
    return out


def fsdp_per_byte(mesh, width: int, per_unit: float, per_param: float) -> float:
    """Seconds FSDP2 adds per byte of unsharded parameters to a forward+backward beyond its
    collectives and its cost per module and per tensor: the copies into and out of each gather's
    and reduce-scatter's flat buffer, the gradient's chunking and division. Timed on 4 sharded
    blocks of 2 MB (2 Linears of `width`) against the same plain blocks, less their 7 gathers and
    4 reduce-scatters timed alone at a block's size."""
    import torch.distributed as dist
    blocks, x = 4, torch.randn(2, width)
    plain, sharded = _stack(blocks, width), _sharded_as_trained(blocks, width, mesh)
    world = dist.get_world_size()
    unit = sum(p.numel() for p in plain[0].parameters())
    whole, shard = torch.zeros(unit - unit % world), torch.zeros((unit - unit % world) // world)
    gather = fixed_quiet(lambda: dist.all_gather_single(whole, shard), 10)
    scatter = fixed_quiet(lambda: dist.reduce_scatter_single(shard, whole), 10)
    extra = (paired_difference(lambda: sharded(x).sum().backward(), lambda: plain(x).sum().backward(), 12)
             - (2 * blocks - 1) * gather - blocks * scatter - blocks * per_unit - blocks * 4 * per_param)
    return max(0.0, extra / (blocks * unit * 4))


def fsdp_without_sync(mesh, seconds: dict[str, list[float]], plain, x: torch.Tensor) -> list[float]:
    """FSDP2's own work in a forward+backward that does not reduce gradients, as a fraction of a
    pass that does: [a pipeline stage's micro-batch, a gradient-accumulation micro-step].

    A pipeline stage (torch.distributed.pipelining) runs every micro-batch's backward with
    gradient sync and the reshard after backward turned off and reduces once, after the last;
    the parameters stay unsharded, so a pass gathers only the blocks resharded after forward and
    skips the gradient shards' copy-out. Gradient accumulation (ParallelModel.no_sync) turns off
    only the sync: the gathers stay, the reduce-scatter and its copies go. Timed on blocks
    sharded as training shards them (shoal/parallel/shard.py: all but the last resharded after
    forward); each pass less its collectives' latency (a full pass: 2b - 1 gathers and b
    reduce-scatters of b blocks; a pipeline pass b - 1 gathers; an accumulating one 2b - 1)."""
    blocks = 4
    model = _sharded_as_trained(blocks, x.shape[1], mesh)

    def timed(synced: bool, resharded: bool) -> float:
        def step():
            model.set_is_last_backward(synced)
            model.set_requires_gradient_sync(synced)
            model.set_reshard_after_backward(resharded)
            model(x).sum().backward()
        return fixed_quiet(step, 20)
    gather, scatter, base = seconds["all_gather"][0], seconds["reduce_scatter"][0], fixed_quiet(plain, 20)
    full = timed(True, True) - base - (2 * blocks - 1) * gather - blocks * scatter
    pipeline = timed(False, False) - base - (blocks - 1) * gather
    accumulating = timed(False, True) - base - (2 * blocks - 1) * gather
    timed(True, True)  # leave no unsharded parameters or unreduced gradients behind
    return [min(1.0, max(0.0, part / full)) if full > 0 else 1.0 for part in (pipeline, accumulating)]


def hooks(world: int) -> dict[str, list[float]]:
    """Seconds per gradient element each compressed hook adds beyond its own collective, timed on
    every rank at once at a bucket's size: shoal/sync/compress.py's int8 and int4 all-reduce against
    the all-gather of its payload alone; torch's fp16 hook (and the bf16 one, built alike) as the
    casts, division and copy around an all-reduce of the half-size buffer, against that all-reduce."""
    import torch.distributed as dist
    from shoal.sync.compress import BLOCK, quantized_all_reduce
    grads, error = torch.randn(HOOK_NUMEL), torch.zeros(HOOK_NUMEL)
    out = {}
    for bits in (8, 4):
        hooked = fixed_quiet(lambda: quantized_all_reduce(grads, bits, error=error).wait(), 6)
        payload = torch.zeros(HOOK_NUMEL * bits // 8 + 4 * (-(-HOOK_NUMEL // BLOCK)), dtype=torch.uint8)
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8)
        alone = fixed_quiet(lambda: dist.all_gather_single(gathered, payload), 6)
        out[f"hook_int{bits}"] = [max(0.0, hooked - alone) / HOOK_NUMEL]
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = torch.zeros(HOOK_NUMEL, dtype=dtype)

        def hooked_half():
            compressed = grads.to(dtype).div_(world)
            dist.all_reduce(compressed)
            grads.copy_(compressed)
        hooked = fixed_quiet(hooked_half, 6)
        alone = fixed_quiet(lambda: dist.all_reduce(half), 6)
        out[f"hook_{name}"] = [max(0.0, hooked - alone) / HOOK_NUMEL]
    return out


def tp_linear(world: int, seconds: dict[str, list[float]]) -> float:
    """A tiny column- then row-parallel Linear pair, forward+backward, against the same plain
    pair: the difference, less the pair's two all-reduces (forward and backward) at the
    smallest measured size, over 2 Linears."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    plain = nn.Sequential(nn.Linear(8, 8 * world), nn.Linear(8 * world, 8))
    parallel = parallelize_module(nn.Sequential(nn.Linear(8, 8 * world), nn.Linear(8 * world, 8)), mesh,
                                  {"0": ColwiseParallel(), "1": RowwiseParallel()})
    x = torch.randn(2, 8)

    def step(model):
        return lambda: model(x).sum().backward()
    extra = fixed_quiet(step(parallel), 30) - fixed_quiet(step(plain), 30)
    return max(0.0, (extra - 2 * seconds["all_reduce"][0]) / 2)


def pipeline_slot(world: int, seconds: dict[str, list[float]]) -> float:
    """Seconds a pipeline schedule (torch.distributed.pipelining, 1F1B) spends per slot beyond
    its stages' arithmetic and its messages' latency: `world` stages of one tiny Linear, 4
    micro-batches, (m + p - 1) slots each a forward and a backward."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    rank, micro = dist.get_rank(), 4
    stage = PipelineStage(nn.Linear(8, 8), rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, micro, loss_fn=lambda out, target: (out - target).pow(2).mean())
    x, y = torch.randn(2 * micro, 8), torch.randn(2 * micro, 8)

    def step():
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
    slots = micro + world - 1
    return max(0.0, fixed_quiet(step, 12) / slots - 2 * seconds["send_recv"][0])
