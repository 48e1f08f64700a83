"""What `shoal plan` prints: the table of layouts (memory, fit, step time, throughput, cost), the
recommendation and why, and the failure and slow-link predictions for it."""

from __future__ import annotations

import argparse
import re

from shoal.config import ConfigError


def parse_tokens(text: str) -> float:
    """'20e9', '300B', '1.5T', '500M' -> tokens."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise ConfigError(f"--tokens {text!r} is not a token count like 20e9, 300B or 1.5T")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


def model_label(cfg, model) -> str:
    """The model the plan is for, as the config names it: a Hugging Face folder's architecture, a
    factory, or a reference model and its flavour; with its parameter count."""
    count = sum(p.numel() for p in model.parameters())
    if cfg.model.hf:  # the class built from the folder's `architectures` (its config is not read again)
        name = f"{type(model).__name__} ({cfg.model.hf})"
    elif cfg.model.factory:
        name = cfg.model.factory
    else:
        name = f"{cfg.model.name} ({cfg.model.flavour})"
    return f"{name}, {count:,} parameters"


def plan_report(args: argparse.Namespace, calibrate_now) -> int:
    from shoal import config
    from shoal.parallel.compose import check_layout
    from shoal.plan.layouts import format_size, parse_size, plan_layouts, recommend, with_degrees
    from shoal.plan.memory import data_spec, meta_model
    from shoal.plan.steptime import WorkCounter, block_shape, predict_step

    cfg = config.load(args.config, args.overrides)
    cluster = None
    if args.cluster:
        from shoal.plan.cluster import check_world, load_cluster
        cluster = load_cluster(args.cluster)
        check_world(cluster, args.world)
    budget = parse_tokens(args.tokens) if args.tokens else None
    cap = parse_size(args.memory_per_worker) if args.memory_per_worker else (int(cluster.hbm_bytes) if cluster else None)
    model = meta_model(cfg)
    plans = plan_layouts(cfg, args.world, cap, model)

    hw, where = None, ""
    if cluster:
        hw = cluster.hardware(cfg.train.precision)
        where = (f"on {args.world} x {cluster.accelerator} ({cluster.name}; SPEC-ONLY: published peak x efficiency "
                 f"{cluster.efficiency}, not measured)")
    else:
        from shoal.plan.calibrate import load_calibration, stale_calibration
        from shoal.plan.hardware import LocalHost
        cal = calibrate_now(None) if calibrate_now else load_calibration()
        stale = stale_calibration() if cal is None else None  # an older format lacks quantities the model needs
        if stale:
            from shoal.plan.calibrate import calibrate, save_calibration
            print(stale, flush=True)
            cal = calibrate(None, say=lambda line: print(line, flush=True))
            print(f"calibrated in {cal.seconds:.0f} s; cached in {save_calibration(cal)}")
        if cal is not None and not calibrate_now and not stale:
            from shoal.plan.calibrate import drift_warning, speed_drift
            warning = drift_warning(cal, speed_drift(cal))
            if warning:
                print(warning, flush=True)
        if cal is not None:
            hw = LocalHost(cal, args.world)
            at = f" {cal.calibrated_at}" if cal.calibrated_at else ""
            where = (f"on this host ({cal.host}, {cal.cores} cores, {hw.threads} thread(s) per worker; "
                     f"calibrated{at}, torch {cal.torch_version})")
    if (args.link or args.sites) and not (args.link and args.sites):
        raise ConfigError("--link and --sites go together, e.g. --link 20mbit --rtt 100ms --sites 3")
    if hw is None and (args.mtbf or args.link):  # both are priced from the step time
        raise ConfigError(f"{'--mtbf' if args.mtbf else '--link'} needs a step time: calibrate this host "
                          "(shoal plan --calibrate, under a minute) or give --cluster")
    seq = cfg.data.seq_len if data_spec(cfg).kind == "tokens" else 1
    unit = "tokens/s" if seq > 1 else "samples/s"
    per_step = cfg.train.batch_size * seq

    counter = WorkCounter(cfg, model)
    times = {}
    if hw is not None and not cluster:  # every layout's block shapes profiled in one start of the workers
        hw.profile_blocks(cfg, model, {block_shape(cfg_, check_layout(cfg_, args.world), model) for cfg_ in
                                       (with_degrees(cfg, p.degrees) for p in plans if p.estimate is not None)})
    if hw is not None:
        for p in plans:
            if p.estimate is not None:
                layout_cfg = with_degrees(cfg, p.degrees)
                times[p.name] = predict_step(layout_cfg, check_layout(layout_cfg, args.world), model, hw, counter,
                                             param_bytes_per_rank=p.estimate.params)
    if hw is not None and not cluster and (hw.measured_shapes or hw.measured_blocks):
        print(f"(measured {len(hw.measured_shapes)} new matrix-multiply shapes and {len(hw.measured_blocks)} block "
              "profiles of this model; cached)")

    valid = [p for p in plans if p.estimate]
    valid.sort(key=lambda p: (times[p.name].total if times else p.estimate.total))
    if times:
        usable = [p for p in valid if p.fits is not False]
        best = usable[0] if usable else None
    else:
        best = recommend(plans)

    print(f"{model_label(cfg, model)} on {args.world} workers"
          + (f", cap {format_size(cap)} per worker" if cap else "") + (f"; step time {where}" if hw else ""))
    invalid = [p for p in plans if not p.estimate]
    if not valid:
        print(f"no layout of {args.world} workers is possible for this model:")
        for p in invalid:
            print(f"  {p.name:<36}{p.error}")
        print("\nchange --world, or the field each line names")
        return 1
    header = f"  {'layout':<34}{'memory':>10}" + ("  fits" if cap else "")
    if times:
        header += f"{'step ms':>10}{'comm ms':>9}{unit:>12}"
        if cluster and budget:
            header += f"{'time':>10}{'$':>12}{'$/1B tok':>10}"
    print(header)
    for p in valid:
        mark = "*" if p is best else " "
        row = f"{mark} {p.name:<34}{format_size(p.estimate.total):>10}" + (("   yes" if p.fits else "    no") if cap else "")
        if times:
            t = times[p.name]
            rate = per_step / t.total
            row += f"{t.total * 1e3:>10.3g}{t.exposed * 1e3:>9.3g}{rate:>12,.0f}"
            if cluster and budget:
                from shoal.plan.cluster import run_cost
                cost = run_cost(cluster, args.world, rate, budget)
                row += f"{_hours(cost.hours):>10}{cost.dollars:>12,.0f}{cost.dollars_per_billion_tokens:>10,.2f}"
            if t.notes:
                row += "  " + "; ".join(t.notes)
        print(row)
    if invalid and args.all:
        print("\nnot possible for this model:")
        for p in invalid:
            print(f"  {p.name:<36}{p.error}")
    elif invalid:
        print(f"({len(invalid)} more layouts are not possible for this model; --all lists them with the reason)")
    if hw is None:
        print("\nstep time: no calibration of this host is cached; `shoal plan --calibrate` measures it "
              "(under a minute), or --cluster predicts from a cluster's specs")
    if best is None:
        print("\nno layout fits: add workers, lower --memory-per-worker's demand (train.batch_size, "
              "parallel.activation_checkpointing) or use a smaller model")
        return 1
    if times:
        t = times[best.name]
        why = (f"the fastest that fits: {t.total * 1e3:.3g} ms a step (compute {t.compute * 1e3:.3g}, optimizer "
               f"{t.optimizer * 1e3:.3g}, exposed communication {t.exposed * 1e3:.3g})")
    else:
        why = "fewest model-parallel splits, then least sharding, then least memory (no step times)"
    print(f"\nrecommended: {best.name}  ({format_size(best.estimate.total)} per worker; {why})")
    print("[parallel]\n" + "\n".join(f"{axis} = {d}" for axis, d in best.degrees.items()))
    if cluster and budget and times:
        from shoal.plan.cluster import run_cost
        from shoal.plan.goodput import per_step_goodput
        rate = per_step / times[best.name].total
        if cluster.spot_dollars_per_hour and cluster.spot_preemptions_per_hour:
            nodes = max(1, -(-args.world // cluster.per_node))
            mtbf = 3600 / (cluster.spot_preemptions_per_hour * nodes)
            goodput = per_step_goodput(times[best.name].total, 1, 0.0, args.regroup_seconds, mtbf)
            cost = run_cost(cluster, args.world, rate, budget, goodput)
            print(f"spot: ${cost.spot_dollars:,.0f} for {budget:.3g} tokens (a preemption every {_hours(mtbf / 3600)}"
                  f" over {nodes} node(s), per-step recovery: goodput {goodput:.1%}) against ${cost.dollars:,.0f} "
                  "on demand")
    if args.mtbf:  # both checked before the table: they come with --link and --sites, and a step time
        _failures(args, cfg, best, times[best.name], hw, cluster, model)
    if args.link:
        _links(args, cfg, model, times[best.name])
    return 0


def short_step(cfg, degrees: dict[str, int], world: int, model, hw) -> tuple[float, int] | None:
    """(seconds a step, workers) of the layout after losing a worker, before its replacement joins
    (`short_of_a_replica`), on `hw`'s kind of hardware; None where fault.enabled restarts every
    worker instead."""
    from shoal.parallel.compose import check_layout
    from shoal.plan.hardware import LocalHost
    from shoal.plan.layouts import short_of_a_replica
    from shoal.plan.memory import estimate_memory
    from shoal.plan.steptime import block_shape, predict_step
    short = short_of_a_replica(cfg, degrees, world)
    if short is None:
        return None
    short_cfg, workers = short
    dims = check_layout(short_cfg, workers)
    if isinstance(hw, LocalHost):  # this host: its workers share its cores, so the count changes the step
        hw = LocalHost(hw.cal, workers)
        hw.profile_blocks(short_cfg, model, {block_shape(short_cfg, dims, model)})
    params = estimate_memory(short_cfg, dims, model).params
    return predict_step(short_cfg, dims, model, hw, param_bytes_per_rank=params).total, workers


def _failures(args, cfg, best, step, hw, cluster, model) -> None:
    from shoal.plan.goodput import best_interval, parse_duration, per_step_goodput, restart_goodput
    mtbf = parse_duration(args.mtbf, "--mtbf")
    # every rank writes its shards at once: on one host they share the disk, on a cluster each has its own
    written = best.estimate.state * (1 if cluster else args.world)
    save_s = written / hw.disk_write()
    every = args.checkpoint_every or cfg.checkpoint.every or best_interval(step.total, save_s, mtbf)
    restart = restart_goodput(step.total, every, save_s, args.restart_seconds, mtbf)
    short = short_step(cfg, best.degrees, args.world, model, hw)
    per_step = per_step_goodput(step.total, every, save_s, args.regroup_seconds, mtbf,
                                short[0] if short else None, args.restart_seconds)
    print(f"\nfailures every {args.mtbf} (whole job), checkpoint every {every} steps "
          f"({save_s * 1e3:.3g} ms to save {best.estimate.state * (1 if cluster else args.world) / 1e6:.3g} MB):")
    print(f"  restart from checkpoint ({args.restart_seconds:g} s to restart)  goodput {restart:.1%}")
    print(f"  per-step recovery ({args.regroup_seconds:g} s to regroup)        goodput {per_step:.1%}"
          "   [fault] enabled = true")
    if short:
        print(f"    (after a failure the run trains on {short[1]} workers at {short[0] * 1e3:.3g} ms a step, not "
              f"{step.total * 1e3:.3g}, until the replacement has started, --restart-seconds {args.restart_seconds:g})")
    else:
        print("    (not for this layout: it has no replica to drop, so fault.enabled restarts every worker from "
              "the last checkpoint, the row above)")


def _links(args, cfg, model, step) -> None:
    from shoal.plan.goodput import link_rows, parse_duration, parse_rate
    rate = parse_rate(args.link)
    rtt = parse_duration(args.rtt, "--rtt")
    grad_bytes = sum(p.numel() for p in model.parameters()) * 4
    compute = step.compute + step.optimizer
    h = cfg.sync.inner_steps
    print(f"\n{args.sites} sites over {args.link} links, {args.rtt} round trip ({grad_bytes / 1e6:.3g} MB of "
          f"gradients; compute {compute * 1e3:.3g} ms a step):")
    print(f"  {'method':<30}{'step s':>10}{'MB/step/site':>14}{'x compute':>11}")
    for row in link_rows(compute, grad_bytes, args.sites, rate, rtt, h, cfg.sync.topk_fraction, cfg.sync.topk_bits):
        print(f"  {row.method:<30}{row.step_s:>10.3g}{row.bytes_per_step / 1e6:>14.3g}{row.step_s / compute:>11.2f}")
