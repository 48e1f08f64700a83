"""Every way to lay out N ranks, checked and sized, and the one to recommend."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import nn

from shoal.config import Config, ConfigError, per_step_unsupported
from shoal.plan.memory import MemoryEstimate, estimate_memory, meta_model
from shoal.runtime.mesh import ParallelDims

AXES = ("dp_replicate", "dp_shard", "tp", "pp")


@dataclass(frozen=True)
class LayoutPlan:
    degrees: dict[str, int]
    estimate: MemoryEstimate | None
    """None when the layout is invalid for this model (see `error`)."""
    error: str = ""
    fits: bool | None = None
    """Whether the estimate is within the per-worker cap; None when no cap was given."""

    @property
    def name(self) -> str:
        parts = [f"{a}={d}" for a, d in self.degrees.items() if d > 1]
        return " ".join(parts) or "single process"


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1.5G', '100000' -> bytes (decimal and binary units)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise ConfigError(f"--memory-per-worker {text!r} is not a size like 2GB, 512MiB or 1500000000")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def candidate_degrees(world: int) -> list[dict[str, int]]:
    """All (dp_replicate, dp_shard, tp, pp) whose product is `world`."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    out = []
    for pp in divisors:
        for tp in divisors:
            for shard in divisors:
                if (world // pp // tp) % shard == 0 and world % (pp * tp) == 0:
                    replicate = world // (pp * tp * shard)
                    if replicate * shard * tp * pp == world:
                        out.append({"dp_replicate": replicate, "dp_shard": shard, "tp": tp, "pp": pp})
    return out


def with_degrees(cfg: Config, degrees: dict[str, int]) -> Config:
    new = copy.deepcopy(cfg)
    for axis, d in degrees.items():
        setattr(new.parallel, axis, d)
    return new


def short_of_a_replica(cfg: Config, degrees: dict[str, int], world: int) -> tuple[Config, int] | None:
    """The layout per-step recovery trains with after losing one worker, until its replacement joins:
    one replica group fewer (the lost worker's; only that group leaves, shoal/fault), the same global
    batch split among the rest, rounded up to a whole share each, as the busiest survivor takes it.
    (config, world), or None where fault.enabled falls back to restarting every worker (a layout
    with no replica to drop, or a sync method per-step recovery does not cover)."""
    replicas = degrees.get("dp_replicate", 1)
    layout = with_degrees(cfg, degrees)
    layout.launch.nproc = world
    if replicas < 2 or per_step_unsupported(layout):
        return None
    short = with_degrees(cfg, {**degrees, "dp_replicate": replicas - 1})
    ranks = (replicas - 1) * degrees.get("dp_shard", 1) * short.train.grad_accum
    short.train.batch_size = -(-cfg.train.batch_size // ranks) * ranks
    return short, world - world // replicas


def plan_layouts(cfg: Config, world: int, cap_bytes: int | None = None,
                 model: nn.Module | None = None) -> list[LayoutPlan]:
    """Every candidate layout of `world` ranks: refused with the reason, or sized."""
    from shoal.parallel.compose import check_layout
    model = model if model is not None else meta_model(cfg)
    plans = []
    for degrees in candidate_degrees(world):
        layout_cfg = with_degrees(cfg, degrees)
        try:
            dims = check_layout(layout_cfg, world)
        except ConfigError as err:
            plans.append(LayoutPlan(degrees, None, str(err)))
            continue
        est = estimate_memory(layout_cfg, dims, model)
        plans.append(LayoutPlan(degrees, est, fits=None if cap_bytes is None else est.total <= cap_bytes))
    return plans


def recommend(plans: list[LayoutPlan]) -> LayoutPlan | None:
    """The valid layout that fits with the least communication: fewest model-parallel splits
    first (tensor parallelism talks inside every layer, pipelines idle in their bubble),
    then the least sharding (DDP's one all-reduce moves less than FSDP's all-gathers and
    reduce-scatters), then the least memory."""
    usable = [p for p in plans if p.estimate is not None and p.fits is not False]
    if not usable:
        return None
    return min(usable, key=lambda p: (p.degrees["tp"] * p.degrees["pp"], p.degrees["pp"], p.degrees["dp_shard"],
                                      p.estimate.total))


def require_fit(cfg: Config, world: int, cap_bytes: int, model: nn.Module | None = None) -> ParallelDims:
    """Refuse, before any worker starts, a layout whose estimated per-rank memory exceeds
    `cap_bytes`, naming the layouts that would fit. `model`: a meta-device model to size
    instead of the configured one."""
    from shoal.parallel.compose import check_layout
    dims = check_layout(cfg, world)
    est = estimate_memory(cfg, dims, model)
    if est.total > cap_bytes:
        fitting = [p.name for p in plan_layouts(cfg, world, cap_bytes, model) if p.fits]
        hint = (f"layouts that fit: {'; '.join(fitting)}" if fitting
                else "no layout of this world fits; add workers or use a smaller model")
        raise ConfigError(f"the [parallel] layout needs an estimated {format_size(est.total)} per worker "
                          f"(parameters {format_size(est.params)}, gradients {format_size(est.grads)}, optimizer "
                          f"{format_size(est.optimizer)}, activations {format_size(est.activations)}) but "
                          f"--memory-per-worker is {format_size(cap_bytes)}; {hint}")
    return dims
