"""`shoal plan --calibrate`: what this machine achieves, measured once and cached.

Measured, each as a physical quantity the step-time model multiplies by a count:
- the cost of one operator under autograd (dispatch + autograd bookkeeping), from a deep
  stack of tiny layers whose matrix multiplies take next to nothing;
- memory bandwidth of elementwise work, the slope of `add_` time over sizes;
- matrix-multiply FLOP/s at the model's own shapes (a new shape is measured on first use
  and added to the cache);
- the process group's all-reduce, all-gather, reduce-scatter and send/recv as
  latency + size/bandwidth, fitted over a few sizes on 2 and 4 Gloo ranks of this host;
- a pipeline schedule's own cost per slot, on stages of no arithmetic;
- the compressed all-reduce hooks' own arithmetic (quantise, dequantise, casts) per gradient
  element, at 2 and 4 ranks' payloads;
- disk write bandwidth (fsync'd), for the cost of a checkpoint.

What the framework's layers add (FSDP2, DDP, DTensor optimizers, a tensor-parallel Linear pair,
a pipeline slot, the compressed hooks) is timed on the same Gloo ranks by shoal/plan/overheads.py.

The cache file is keyed by host name, torch version and thread count, under the Shoal
cache folder (~/.cache/shoal/plan, or $SHOAL_CACHE/plan), and carries its format's version:
a cache of an older format is not read (`shoal plan` says so and measures again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from shoal.plan.collectives import OPS, CollectiveCost, fit_cost
from shoal.plan.timing import fixed_quiet, quiet_seconds, quiet_seconds_of

log = logging.getLogger(__name__)

COLLECTIVE_WORLDS = (2, 4)
COLLECTIVE_SIZES = (16_384, 262_144, 2_097_152, 8_388_608)
CALIBRATION_VERSION = 6
"""1: the first format; 2: + the compressed hooks' arithmetic per element (hook_element), the
optimizer's cost per operator on plain tensors (optimizer_op) and on FSDP2 and tensor-parallel
DTensors (dtensor_op, tp_dtensor_op), FSDP2's cost per module and per parameter tensor
(fsdp_unit, fsdp_param); 3: + DDP's cost per step and per parameter tensor (ddp_step); 4: + DDP's
cost per gradient byte (ddp_step's third value); 5: dtensor_op, tp_dtensor_op and the profiled
tensor-parallel optimizer cost without the clipping's norm all-reduces (priced as collectives);
6: + FSDP2's work in passes that do not reduce gradients (fsdp_nosync: pipeline micro-batches,
gradient accumulation) and per byte of unsharded parameters (fsdp_byte)."""
HOOK_METHODS = ("fp16", "bf16", "int8", "int4")


@dataclass
class Calibration:
    host: str
    torch_version: str
    threads: int
    """Torch threads of the process that calibrated (the host's usable cores by default)."""
    cores: int
    op_overhead: dict[str, float] = field(default_factory=dict)
    """Worker threads -> seconds per operator in a forward+backward."""
    bandwidth: dict[str, float] = field(default_factory=dict)
    """Worker threads -> bytes/s of elementwise work."""
    matmul: dict[str, float] = field(default_factory=dict)
    """'threads:m,k,n' -> FLOP/s achieved."""
    collectives: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Group size -> op -> [latency s, bandwidth bytes/s], Gloo on this host."""
    dtensor_op: dict[str, float] = field(default_factory=dict)
    """Group size -> extra seconds per operator of the optimizer step and gradient clipping on
    FSDP2's sharded (DTensor) parameters, beyond the same step on plain tensors."""
    optimizer_op: dict[str, float] = field(default_factory=dict)
    """Group size -> seconds per operator of gradient clipping and the AdamW step on plain tensors
    with that many workers at once: no autograd runs there, so an operator costs a fraction of
    `concurrent`'s (timed in a forward+backward)."""
    tp_dtensor_op: dict[str, float] = field(default_factory=dict)
    """Group size -> the same on tensor-parallel parameters (column- and row-parallel Linears:
    Shard(0), Shard(1) and Replicate DTensors), whose sharding propagation costs more."""
    fsdp_unit: dict[str, float] = field(default_factory=dict)
    """Group size -> seconds FSDP2 adds per fully_shard'ed module to a forward+backward beyond its
    collectives' latency (pre/post hooks, the unshard and reshard of its parameter group)."""
    ddp_step: dict[str, list[float]] = field(default_factory=dict)
    """Group size -> [seconds per step, seconds per parameter tensor] DDP adds to a
    forward+backward beyond its all-reduce (its forward's bookkeeping, one autograd hook per
    gradient, copies into and out of the buckets, the reducer's finalisation)."""
    fsdp_param: dict[str, float] = field(default_factory=dict)
    """Group size -> seconds it adds per parameter tensor (copy-in and copy-out, DTensor views,
    gradient shards)."""
    fsdp_byte: dict[str, float] = field(default_factory=dict)
    """Group size -> seconds it adds per byte of unsharded parameters (the copies around each
    gather and reduce-scatter), beyond its collectives, per module and per tensor."""
    fsdp_nosync: dict[str, list[float]] = field(default_factory=dict)
    """Group size -> [pipeline micro-batch, accumulation micro-step]: FSDP2's work in a
    forward+backward that does not reduce gradients, as a fraction of one that does."""
    tp_linear: dict[str, float] = field(default_factory=dict)
    """Group size -> extra seconds a tensor-parallel Linear adds to a forward+backward, beyond
    its arithmetic and its collectives (DTensor dispatch, sharding propagation)."""
    concurrent: dict[str, list[float]] = field(default_factory=dict)
    """Workers at once -> [seconds per operator, bandwidth bytes/s] of each, 1 thread each."""
    pp_slot: dict[str, float] = field(default_factory=dict)
    """Workers -> seconds a pipeline schedule adds per slot beyond its stages' work and messages."""
    hook_element: dict[str, float] = field(default_factory=dict)
    """'method:dp' -> seconds per gradient element a compressed all-reduce hook adds beyond its
    collective (quantise, error feedback, dequantise and sum dp payloads; casts), timed on
    dp ranks at once at a gradient bucket's size."""
    blocks: dict[str, list[float]] = field(default_factory=dict)
    """Profile key -> [seconds of one block, seconds of the rest of the model], forward+backward
    (shoal/plan/profile.py); measured when a plan first needs a shape."""
    disk_write: float = 0.0
    """Bytes/s written and fsync'd to the cache folder's disk."""
    seconds: float = 0.0
    calibrated_at: str = ""
    """When it was measured (UTC); empty in a cache written before this was recorded."""
    version: int = 1
    """The cache's format: a cache of another format is measured again (CALIBRATION_VERSION)."""

    def collective(self, op: str, k: int) -> CollectiveCost:
        """Cost of `op` on k ranks of this host: the fit at the nearest measured size, ring-scaled."""
        if k <= 1:
            return CollectiveCost(0.0, float("inf"))
        measured = min((int(w) for w in self.collectives), key=lambda w: (abs(w - k), -w))
        latency, bandwidth = self.collectives[str(measured)][op]
        return CollectiveCost(latency, bandwidth).to_group(op, measured, k)


def cache_path(threads: int | None = None) -> Path:
    from shoal.data.datasets import cache_dir
    threads = threads or torch.get_num_threads()
    version = torch.__version__.replace("+", "_")
    return cache_dir() / "plan" / f"calibration-{socket.gethostname()}-torch{version}-threads{threads}.json"


def load_calibration(path: Path | None = None) -> Calibration | None:
    """The cached calibration of this host; None when there is none, or when it was written in
    another format (it lacks what this version's model multiplies by: `stale_calibration` says so)."""
    path = path or cache_path()
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    if raw.get("version", 1) != CALIBRATION_VERSION:
        return None
    return Calibration(**raw)


def stale_calibration(path: Path | None = None) -> str | None:
    """Why the cached calibration cannot be used (an older format), or None."""
    path = path or cache_path()
    if not path.exists():
        return None
    found = json.loads(path.read_text()).get("version", 1)
    if found == CALIBRATION_VERSION:
        return None
    return (f"the cached calibration {path} is format {found}, this Shoal reads format {CALIBRATION_VERSION} "
            "(it measures more): calibrating again")


def save_calibration(cal: Calibration, path: Path | None = None) -> Path:
    path = path or cache_path(cal.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cal), indent=1))
    tmp.replace(path)
    return path


def _with_threads(threads: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def measure_op_overhead(timings: int = 1) -> float:
    """Seconds per operator of a forward+backward whose arithmetic is negligible (the median of
    `timings` quiet timings)."""
    from shoal.plan.opcount import count_forward_backward
    layers = [m for _ in range(40) for m in (nn.Linear(4, 4), nn.GELU())]
    model = nn.Sequential(*layers, nn.Linear(4, 2))
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with torch.device("meta"):
        meta = nn.Sequential(*[m for _ in range(40) for m in (nn.Linear(4, 4), nn.GELU())], nn.Linear(4, 2))
    ops = count_forward_backward(meta, x.to("meta"), y.to("meta"), nn.functional.cross_entropy).ops

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
    return statistics.median(quiet_seconds_of(step, 0.2) for _ in range(timings)) / ops


def measure_bandwidth() -> float:
    """Bytes/s of `a.add_(b)` (reads two, writes one) from the slope over sizes."""
    sizes, seconds = [], []
    for numel in (1 << 18, 1 << 20, 1 << 22, 1 << 24):
        a, b = torch.ones(numel), torch.ones(numel)
        seconds.append(quiet_seconds_of(lambda: a.add_(b), 0.05))
        sizes.append(3 * numel * 4)
    return fit_cost(sizes, seconds).bandwidth


def measure_matmul(shape: tuple[int, int, int]) -> float:
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / quiet_seconds_of(lambda: torch.mm(a, b), 0.02)


def measure_disk_write(folder: Path, nbytes: int = 64 << 20) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        start = time.perf_counter()
        for _ in range(nbytes >> 20):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - start)


def ensure_compute(cal: Calibration, threads: int, shapes: set[tuple[int, int, int]] = frozenset()) -> list:
    """Measure what is missing for workers of `threads` threads; returns the shapes measured."""
    key = str(threads)
    if key not in cal.op_overhead:
        cal.op_overhead[key] = _with_threads(threads, measure_op_overhead)
        cal.bandwidth[key] = _with_threads(threads, measure_bandwidth)
    missing = [s for s in sorted(shapes) if f"{threads}:{s[0]},{s[1]},{s[2]}" not in cal.matmul]
    for shape in missing:
        cal.matmul[f"{threads}:{shape[0]},{shape[1]},{shape[2]}"] = _with_threads(threads,
                                                                                 lambda: measure_matmul(shape))
    return missing


def _collective_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from shoal.runtime.env import end_distributed
    torch.set_num_threads(1)
    # a bounded wait: a rank that fails leaves the others an error, not a hang
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results: dict[str, list[float]] = {op: [] for op in OPS}
    for nbytes in COLLECTIVE_SIZES:
        numel = nbytes // 4
        full, part = torch.ones(numel), torch.ones(numel // world)
        peer = rank ^ 1  # pairs (0,1), (2,3): each pair ping-pongs one message

        def ping_pong():
            if rank % 2 == 0:
                dist.send(full, peer)
                dist.recv(full, peer)
            else:
                dist.recv(full, peer)
                dist.send(full, peer)
        runs = {"all_reduce": lambda: dist.all_reduce(full),
                "all_gather": lambda: dist.all_gather_single(full, part),
                "reduce_scatter": lambda: dist.reduce_scatter_single(part, full),
                "send_recv": ping_pong}
        for op, run in runs.items():
            times = []
            for _ in range(10):  # the fit's intercept (latency) moved 3x between runs with 6
                dist.barrier()
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            seconds = quiet_seconds(times[1:])
            results[op].append(seconds / 2 if op == "send_recv" else seconds)
    from shoal.plan import overheads  # it times with this module's helpers
    results["tp_linear"] = [overheads.tp_linear(world, results)]
    results.update(overheads.dtensor_step(world, results))
    results.update(overheads.hooks(world))
    results["pp_slot"] = [overheads.pipeline_slot(world, results)]
    dist.barrier()  # every worker computes at once, as in training
    results["concurrent"] = [measure_op_overhead(), measure_bandwidth()]
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        # the slowest rank decides when a collective is over for everyone
        slowest = {op: [max(r[op][i] for r in gathered) for i in range(len(values))]
                   for op, values in results.items()}
        slowest["concurrent"][1] = min(r["concurrent"][1] for r in gathered)  # a bandwidth: the lowest
        Path(out).write_text(json.dumps(slowest))
    dist.barrier()
    end_distributed()
    # DeviceMesh's registry keeps a reference to the group past end_distributed; freeing it
    # during interpreter shutdown aborts the process ("terminate called without an active
    # exception", seen here 1 run in 3). The results are written: leave without the teardown.
    os._exit(0)


def measure_collectives(world: int) -> tuple[dict[str, list[float]], float]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        mp.spawn(_collective_worker, args=(world, os.path.join(tmp, "store"), out), nprocs=world)
        seconds = json.loads(Path(out).read_text())
    fits = {}
    for op in OPS:
        cost = fit_cost(list(COLLECTIVE_SIZES), seconds[op])
        fits[op] = [cost.latency, cost.bandwidth]
    return fits, seconds


def calibrate(shapes_by_threads: dict[int, set] | None = None, say=print) -> Calibration:
    """Measure this machine (about 30-60 s on 2 cores) and cache the result."""
    start = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cal = Calibration(host=socket.gethostname(), torch_version=torch.__version__, threads=torch.get_num_threads(),
                      cores=cores, version=CALIBRATION_VERSION)
    thread_counts = sorted({1, cores} | set(shapes_by_threads or {}))
    for threads in thread_counts:
        say(f"calibrating compute at {threads} thread(s): operator overhead, bandwidth, matrix multiplies")
        ensure_compute(cal, threads, (shapes_by_threads or {}).get(threads, set()))
    for world in COLLECTIVE_WORLDS:
        say(f"calibrating collectives on {world} Gloo ranks")
        fits, seconds = measure_collectives(world)
        cal.collectives[str(world)] = fits
        cal.dtensor_op[str(world)], cal.tp_linear[str(world)] = seconds["dtensor_op"][0], seconds["tp_linear"][0]
        cal.tp_dtensor_op[str(world)], cal.fsdp_param[str(world)] = seconds["tp_dtensor_op"][0], seconds["fsdp_param"][0]
        cal.fsdp_unit[str(world)], cal.optimizer_op[str(world)] = seconds["fsdp_unit"][0], seconds["optimizer_op"][0]
        cal.ddp_step[str(world)], cal.fsdp_nosync[str(world)] = seconds["ddp_step"], seconds["fsdp_nosync"]
        cal.fsdp_byte[str(world)] = seconds["fsdp_byte"][0]
        for method in HOOK_METHODS:
            cal.hook_element[f"{method}:{world}"] = seconds[f"hook_{method}"][0]
        cal.pp_slot[str(world)] = seconds["pp_slot"][0]
        cal.concurrent[str(world)] = seconds["concurrent"]
    say("calibrating disk write bandwidth")
    cal.disk_write = measure_disk_write(cache_path().parent)
    cal.seconds = time.perf_counter() - start
    cal.calibrated_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return cal


DRIFT = 0.25
"""A host whose operators run this much slower than its calibration's is warned about; one faster
only beyond twice as fast: the short timing of a fresh process came out 10-40% faster than the
calibration's on the same idle host here, never slower."""


def speed_drift(cal: Calibration) -> float:
    """This host's seconds per operator now over the calibration's (> 1: slower now), timed again at
    the calibration's thread count (a fraction of a second). A shared or throttled host moves:
    the same rows here ran 40-60% slower one day than the day before, and a calibration is a
    snapshot of one moment's speed."""
    key = str(cal.threads) if str(cal.threads) in cal.op_overhead else min(cal.op_overhead, default=None)
    if key is None:
        return 1.0
    return _with_threads(int(key), lambda: measure_op_overhead(timings=3)) / cal.op_overhead[key]


def drift_warning(cal: Calibration, ratio: float) -> str | None:
    """One line telling the user the host's speed moved since `cal` (None within DRIFT)."""
    if 0.5 <= ratio <= 1.0 + DRIFT:
        return None
    when = f" ({cal.calibrated_at})" if cal.calibrated_at else ""
    factor, word = (ratio, "slower") if ratio > 1 else (1 / ratio, "faster")
    return (f"warning: this host runs operators {factor:.1f}x {word} now than when it was calibrated{when}; "
            "the step times below assume the calibration's speed: `shoal plan --calibrate` measures again")
