"""Profiles of the model's own transformer block on this host, at the shapes a layout gives it.

Counting operators and FLOPs (shoal/plan/opcount.py) and pricing each from a microbenchmark
misses what only the real block shows on a CPU: the DTensor dispatch, sharding propagation
and redistributions of a tensor-parallel block (several times a plain Linear pair's), the
caches and cores that several workers share (four workers on two cores run each operator
slower than one alone, and not by a fixed factor), and the allocator. So, as layer-level
profilers do (vTrain, Bang et al., arXiv 2312.12391: each layer profiled once at its shapes,
the iteration composed from the profiles), the block is run here at the micro-batch, the
tensor-parallel degree and the number of workers a layout gives it, and its time is cached
beside the rest of the calibration.

One profile is three numbers, each from the lower-quartile forward+backward of the slowest worker
while all `world` workers run it at once (one thread each beyond the cores, as `shoal run` gives
them; the median with more workers than cores):
- `block`: one block (under tensor parallelism, the block as shoal/parallel/tensor.py splits
  it, its all-gathers and reduce-scatters included), in a stage as deep as the layout's: a
  model of `depth` blocks (the whole model, or one pipeline stage's blocks) less a one-block
  model, per block, and never less than the block alone. With more workers than cores a long
  forward+backward is stretched more than a short one (here 4 workers on 2 cores ran the
  4-block model 30-40% slower than four times its block alone; 2 workers within 4%), so the
  block is timed at the stage's length;
- `rest`: a one-block model with its embeddings, final norm, head and loss, less `block`;
- `optimizer`: what gradient clipping and the AdamW step cost per counted operator on that
  stage's parameters (under tensor parallelism DTensors, whose sharding propagation costs
  several times FSDP's Shard(0) per operator; the step-time model prices a tensor-parallel
  layout's optimizer from it), less the clipping's norm all-reduces at the calibrated latency
  (the model prices them once a step).

Nothing else of the layout is run: no data parallel exchange, no sharding, no pipeline. The
step-time model (shoal/plan/steptime.py) composes those from the
collectives' and operators' own calibration.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from shoal.plan.timing import quiet_seconds

WARMUP, REPS = 3, 12


def profile_key(cfg, micro: int, tp: int, depth: int, world: int) -> str:
    """What a block's time depends on: the model's shapes, the micro-batch, tp, the stage's depth
    and the workers at once."""
    m = cfg.model
    return (f"{m.name}/{m.flavour}/dim{m.dim}/heads{m.n_heads}/seq{cfg.data.seq_len}/src{cfg.data.source}"
            f"/b{micro}/tp{tp}/d{depth}/w{world}")


def can_profile(model) -> bool:
    """The reference GPT: its block and its tensor-parallel plan are Shoal's own."""
    return type(model).__name__ == "GPT"


def _stage_config(cfg, tp: int, depth: int = 1):
    one = copy.deepcopy(cfg)
    one.model.n_layers = depth
    one.parallel.tp, one.parallel.pp, one.parallel.dp_shard, one.parallel.dp_replicate = tp, 1, 1, 1
    one.parallel.pp_schedule = "1f1b"
    return one


def _timed(fn) -> float:
    import torch.distributed as dist
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):  # the same count on every rank: tensor-parallel blocks hold collectives
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # the lower quartile shuts out other jobs' interference; with more workers than cores it
    # would also shut out the workers' own sharing (the repeats that found a core free, seen
    # here: 4 workers' block within 10% of 2 workers'), which a step does pay: the median then
    import torch.distributed as dist
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return statistics.median(times) if dist.get_world_size() > cores else quiet_seconds(times)


def _profile_worker(rank: int, world: int, cfg, requests: list[tuple[int, int, int]], norm_seconds: dict[int, float],
                    store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from shoal.models import build_model, compute_loss
    from shoal.plan.memory import data_spec
    from shoal.runtime.env import end_distributed
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    meshes = {}

    def built(config, tp: int):
        torch.manual_seed(0)
        model = build_model(config.model, data_spec(config))
        if tp > 1:
            from shoal.parallel.tensor import apply_tp
            if tp not in meshes:
                meshes[tp] = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
            model = apply_tp(model, meshes[tp]["tp"])  # one stage
        return model

    def model_step(model, tokens):
        return lambda: compute_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for micro, tp, depth in requests:
        one = _stage_config(cfg, tp)
        spec = data_spec(one)
        model = built(one, tp)
        seq, dim = one.data.seq_len, model.args.dim
        tokens = torch.randint(0, spec.vocab_size, (micro, seq + 1))
        hidden = torch.randn(micro, seq, dim, requires_grad=True)
        block = model.layers["0"]

        def block_step():
            block(hidden).sum().backward()
        one_model, alone = _timed(model_step(model, tokens)), _timed(block_step)
        block_s, stage = alone, model
        if depth > 1:  # per block of a stage this deep, less the one-block model
            stage = built(_stage_config(cfg, tp, depth), tp)
            # a difference of two timings: its noise can only be trusted upwards (a deeper stage
            # is never cheaper per block than the block alone)
            block_s = max(alone, (_timed(model_step(stage, tokens)) - one_model) / (depth - 1))
        # the optimizer on the stage's own parameters: their mix of kinds (a tensor-parallel
        # block's sharded Linears, the replicated norms and embeddings) sets the cost per operator
        results[f"{micro},{tp},{depth}"] = [block_s, max(0.0, one_model - alone),
                                            _optimizer_per_op(stage, norm_seconds.get(tp, 0.0))]
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:  # the slowest worker decides
        Path(out).write_text(json.dumps({k: [max(r[k][i] for r in gathered) for i in range(3)] for k in results}))
    dist.barrier()
    end_distributed()
    # as in calibrate.py: DeviceMesh's registry holds a group into interpreter shutdown, which can abort
    os._exit(0)


def _optimizer_per_op(model, norm_seconds: float) -> float:
    """Seconds per counted operator of gradient clipping and the AdamW step on this stage's
    parameters (tensor-parallel DTensors when tp > 1), less `norm_seconds`: the clipping's norm
    all-reduces as the step-time model prices them."""
    from shoal.plan.overheads import clip_and_step
    from shoal.plan.opcount import count_optimizer_step
    params = list(model.parameters())
    counted = [torch.nn.Parameter(torch.empty(tuple(p.shape), device="meta")) for p in params]
    ops = count_optimizer_step(counted, "adamw").ops + 2 * len(params)
    optimizer = torch.optim.AdamW(params)  # AdamW and the clipping both pass over parameters without a gradient
    return max(0.0, _timed(lambda: clip_and_step(model, optimizer)) - norm_seconds) / ops


def profile_blocks(cfg, world: int, requests: list[tuple[int, int, int]],
                   norm_seconds: dict[int, float] | None = None) -> dict[tuple[int, int, int], tuple[float, ...]]:
    """(micro-batch, tp, depth) -> (block seconds, rest seconds, the optimizer's seconds per
    operator) with `world` workers at once; `norm_seconds[tp]`: what the step-time model adds for
    the clipping's norm all-reduces at that tp, left out of the optimizer's per-operator cost."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "profile.json")
        mp.spawn(_profile_worker, args=(world, cfg, requests, norm_seconds or {}, os.path.join(tmp, "store"), out), nprocs=world)
        raw = json.loads(Path(out).read_text())
    return {tuple(int(part) for part in key.split(",")): tuple(times) for key, times in raw.items()}
