"""`parallel.auto = true`: the run takes the layout `shoal plan` would recommend.

Before any worker starts, the launcher asks `choose_layout` for the degrees of the world it
is about to start; the choice replaces the config's `dp_replicate`, `dp_shard`, `tp` and `pp`
(the run directory's config.toml holds the chosen ones), and the planner's table row and
its reason are logged. With a calibration of this host cached (`shoal plan --calibrate`)
the choice is the fastest predicted layout that fits; without one it is the memory-only
rule (fewest model-parallel splits, then least sharding), and the log says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.config import Config


@dataclass(frozen=True)
class AutoChoice:
    degrees: dict[str, int]
    row: str
    """The planner's table row of the chosen layout."""
    reason: str


def choose_layout(cfg: Config, world: int, cap_bytes: int | None = None) -> AutoChoice:
    """The layout `shoal plan CONFIG --world world` recommends, with its row and reason."""
    from shoal.config import ConfigError
    from shoal.parallel.compose import check_layout
    from shoal.plan.calibrate import load_calibration
    from shoal.plan.layouts import format_size, plan_layouts, recommend, with_degrees
    from shoal.plan.memory import meta_model

    model = meta_model(cfg)
    plans = plan_layouts(cfg, world, cap_bytes, model)
    if not any(p.estimate is not None for p in plans):
        reasons = "; ".join(f"{p.name}: {p.error}" for p in plans)
        raise ConfigError(f"parallel.auto = true: no layout of {world} workers is possible for this model "
                          f"({reasons}); change the worker count or the field named")
    usable = [p for p in plans if p.estimate is not None and p.fits is not False]
    if not usable:
        raise ConfigError(f"parallel.auto = true: no layout of {world} workers fits this model "
                          f"(`shoal plan CONFIG --world {world} --all` says why); set the [parallel] degrees")
    # the calibration is of this host's CPU workers; GPU workers are not calibrated by it
    cal = load_calibration() if cfg.launch.device != "cuda" else None
    if cal is None:
        best = recommend(plans)
        from shoal.plan.calibrate import stale_calibration
        stale = stale_calibration() if cfg.launch.device != "cuda" else None
        missing = ("step times of GPU workers are not calibrated here" if cfg.launch.device == "cuda" else
                   "the cached calibration of this host is of an older format (`shoal plan --calibrate` measures "
                   "it again)" if stale else
                   "no calibration of this host is cached (`shoal plan --calibrate` measures one)")
        why = f"{missing}, so by the memory rule: fewest model-parallel splits, then least sharding, then least memory"
        row = f"{best.name}: {format_size(best.estimate.total)} per worker"
        return AutoChoice(best.degrees, row, why)
    from shoal.plan.hardware import LocalHost
    from shoal.plan.steptime import WorkCounter, block_shape, predict_step
    hw, counter = LocalHost(cal, world), WorkCounter(cfg, model)
    # blocks not yet profiled at these shapes are measured now, in one start of `world` workers
    hw.profile_blocks(cfg, model, {block_shape(c, check_layout(c, world), model) for c in
                                   (with_degrees(cfg, p.degrees) for p in usable)})
    times = {}
    for p in usable:
        layout_cfg = with_degrees(cfg, p.degrees)
        times[p.name] = predict_step(layout_cfg, check_layout(layout_cfg, world), model, hw, counter,
                                     param_bytes_per_rank=p.estimate.params)
    ranked = sorted(usable, key=lambda p: times[p.name].total)
    best, t = ranked[0], times[ranked[0].name]
    row = (f"{best.name}: {format_size(best.estimate.total)} per worker, predicted {t.total * 1e3:.3g} ms a step "
           f"(compute {t.compute * 1e3:.3g}, optimizer {t.optimizer * 1e3:.3g}, exposed communication "
           f"{t.exposed * 1e3:.3g})")
    runner_up = (f"; next {ranked[1].name} at {times[ranked[1].name].total * 1e3:.3g} ms" if len(ranked) > 1 else "")
    why = f"the fastest predicted of {len(usable)} layouts that fit on this host (calibrated {cal.host}){runner_up}"
    return AutoChoice(best.degrees, row, why)
