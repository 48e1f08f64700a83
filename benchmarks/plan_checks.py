"""`shoal plan --mtbf` and `--link` beside what benchmarks/chaos.py and benchmarks/slow_links.py measured.

Reads the JSON those benchmarks wrote (benchmarks/out/chaos.json, benchmarks/out/slow_links.json),
rebuilds the config each ran, and predicts the same quantities with shoal/plan (the step time
from this host's cached calibration, `shoal plan --calibrate`; goodput and links in closed
form, shoal/plan/goodput.py; Shoal's per-step recovery with the step of workers - 1 for the
--restart-seconds a replacement takes). Nothing is fitted to the measured rows: the regroup seconds
and a replacement's start are `shoal plan`'s defaults (--regroup-seconds 0.13, --restart-seconds 10);
torchrun's restart is given as chaos.py measured it (its median from a kill to the next step, the
model's input R, not the goodput it predicts), with the default's row beside it; the link is
the rate the benchmark set, with no delay (this kernel has no netem).

    .venv/bin/python benchmarks/chaos.py --duration 120 --every 15 --workers 4
    .venv/bin/python benchmarks/slow_links.py --workers 2 --methods ddp,diloco-default --steps 300 --batch-size 16
    .venv/bin/python benchmarks/plan_checks.py        # table + benchmarks/out/plan_checks.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoal import config as config_module  # noqa: E402
from shoal.parallel.compose import check_layout  # noqa: E402
from shoal.plan.calibrate import load_calibration  # noqa: E402
from shoal.plan.goodput import link_rows, parse_rate, per_step_goodput, restart_goodput  # noqa: E402
from shoal.plan.hardware import LocalHost  # noqa: E402
from shoal.plan.memory import estimate_memory, meta_model  # noqa: E402
from shoal.plan.report import short_step  # noqa: E402
from shoal.plan.steptime import block_shape, predict_step  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
RESTART_S, REGROUP_S = 10.0, 0.13  # shoal plan's defaults (--restart-seconds, --regroup-seconds)


def predicted_step(overrides: list[str], world: int):
    cfg = config_module.load(None, overrides)
    dims = check_layout(cfg, world)
    model = meta_model(cfg)
    hw = LocalHost(CAL, world)
    hw.profile_blocks(cfg, model, {block_shape(cfg, dims, model)})
    est = estimate_memory(cfg, dims, model)
    return cfg, est, hw, predict_step(cfg, dims, model, hw, param_bytes_per_rank=est.params)


def measured(benchmark: str) -> dict | None:
    """What `benchmarks/<benchmark>.py` wrote to benchmarks/out/, whose module (its workload) is then
    importable; None, said so, when it has not run."""
    path = OUT / f"{benchmark}.json"
    if not path.exists():
        print(f"{path} is missing: run benchmarks/{benchmark}.py first")
        return None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return json.loads(path.read_text())


def chaos_rows() -> list[dict]:
    data = measured("chaos")
    if data is None:
        return []
    from chaos import WORKLOAD
    workers, every = data["args"]["workers"], data["args"]["every"]
    rows = []
    for result in data["results"]:
        torchrun = result["launcher"].startswith("torchrun")
        # chaos.py's torchrun runs save a checkpoint every 10 steps; Shoal's fault-tolerant run saves none
        overrides = [*WORKLOAD, f"launch.nproc={workers}", f"parallel.dp_replicate={workers}"]
        overrides += ["checkpoint.every=10", "fault.enabled=false"] if torchrun else []
        cfg, est, hw, step = predicted_step(overrides, workers)
        where = f"goodput, {result['launcher']}, kill every {every:g}s, {workers} workers"
        common = {"measured": result["goodput"], "step_s": step.total}
        if torchrun:
            # R, the seconds a restart takes, is the model's input: shoal plan's default, and the run's own
            # median (kill to the next step) where it has one
            save_s = est.state * workers / hw.disk_write()
            restarts = [(RESTART_S, f"R = {RESTART_S:g} s")]
            if result["median_recovery_s"]:
                restarts.append((result["median_recovery_s"], f"R = {result['median_recovery_s']:.2g} s (measured)"))
            rows += [{"check": f"{where}, {label}", "predicted": restart_goodput(step.total, 10, save_s, r, every),
                      "restart_s": r, **common} for r, label in restarts]
        else:  # after a kill the survivors train the same batch on workers - 1 until the replacement joins
            short_s, _ = short_step(cfg, {"dp_replicate": workers}, workers, meta_model(cfg), hw)
            rows.append({"check": where, "predicted": per_step_goodput(step.total, 1, 0.0, REGROUP_S, every, short_s,
                                                                       RESTART_S),
                         "short_step_s": short_s, "restart_s": RESTART_S, **common})
    return rows


def link_check_rows() -> list[dict]:
    data = measured("slow_links")
    if data is None:
        return []
    from slow_links import METHODS
    rate = parse_rate(data["rate"])
    rows = []
    for result in data["results"]:
        method, workers, steps = result["method"], result["workers"], data["steps"]
        if method not in ("ddp", "diloco-default"):
            continue  # the plan's link table has DDP's all-reduce and DiLoCo's encodings
        model = ["model.name=gpt", f"model.flavour={data['flavour']}", f"model.dim={data['dim']}",
                 f"model.n_layers={data['layers']}", "data.seq_len=64", f"train.batch_size={data['batch_size']}"]
        cfg, est, hw, step = predicted_step([*model, *METHODS[method], f"parallel.dp_replicate={workers}"], workers)
        compute = step.compute + step.optimizer  # the link replaces this host's own collectives
        grad_bytes = sum(p.numel() for p in meta_model(cfg).parameters()) * 4
        table = {r.method: r for r in link_rows(compute, grad_bytes, workers, rate, 0.0, cfg.sync.inner_steps)}
        encoding = cfg.sync.compression if cfg.sync.compression != "auto" else "int8"
        row = table["ddp (all-reduce every step)"] if method == "ddp" else \
            table[f"diloco H={cfg.sync.inner_steps} {encoding}"]
        # the plan's rows average DiLoCo's outer sync over H steps; a run of `steps` steps holds steps // H of them
        h = cfg.sync.inner_steps if method != "ddp" else 1
        syncs = steps // h
        seconds = compute * steps + (row.step_s - compute) * h * syncs
        sent = row.bytes_per_step * h * syncs
        where = f"{method}, {workers} workers, {data['rate']}, {steps} steps"
        rows.append({"check": f"training seconds, {where}", "predicted": seconds, "measured": result["train_seconds"]})
        rows.append({"check": f"MB sent per worker, {where}", "predicted": sent / 1e6,
                     "measured": (result["bytes_sent_per_worker"] - result["startup_bytes_per_worker"]) / 1e6})
    return rows


def main() -> None:
    rows = chaos_rows() + link_check_rows()
    print(f"\n{'check':<84}{'predicted':>11}{'measured':>10}{'error':>8}")
    for r in rows:
        r["error"] = (r["predicted"] - r["measured"]) / r["measured"]
        print(f"{r['check']:<84}{r['predicted']:>11.3g}{r['measured']:>10.3g}{r['error']:>+8.0%}")
    OUT.mkdir(exist_ok=True)
    (OUT / "plan_checks.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {OUT / 'plan_checks.json'}")


CAL = load_calibration()
if __name__ == "__main__":
    if CAL is None:
        sys.exit("no calibration cached: run `shoal plan --calibrate` first")
    main()
