"""`shoal plan`'s predicted step time and memory beside measured ones, on this host's Gloo ranks.

Each layout is built with Shoal's own composition (shoal.parallel.compose.parallelize, as a
worker does), trained a few steps (forward+backward, clipping, AdamW), and its median step
time taken on the slowest rank; the prediction comes from the cached calibration
(`shoal plan --calibrate`) and the counted work of the same config. Memory: the measured
state bytes (params + grads + optimizer) against the estimate, and the "fits" verdict at a
cap halfway between the two.

    .venv/bin/python benchmarks/plan_accuracy.py                      # every layout, table + JSON
    .venv/bin/python benchmarks/plan_accuracy.py --layouts w2 --append  # a chunk (names containing 'w2')

Measured rows accumulate in benchmarks/out/plan_accuracy.json with --append, so long runs can
be split into chunks (each under the shared CPU lock).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.config import Config
from shoal.models import build_model
from shoal.parallel.compose import check_layout, parallelize
from shoal.plan.measure import state_bytes
from shoal.plan.memory import data_spec
from shoal.runtime.env import end_distributed  # (importing it comes before any init_process_group)

MODELS = {"gpt-64x2": {"dim": 64, "n_layers": 2, "n_heads": 4, "seq": 64, "batch": 16},
          "gpt-192x4": {"dim": 192, "n_layers": 4, "n_heads": 4, "seq": 64, "batch": 16}}
LAYOUTS = {
    2: {"ddp": {"dp_replicate": 2}, "fsdp": {"dp_shard": 2}, "tp": {"tp": 2},
        "pp-gpipe": {"pp": 2, "pp_schedule": "gpipe"}, "pp-1f1b": {"pp": 2, "pp_schedule": "1f1b"},
        "ddp-fp16": {"dp_replicate": 2, "method": "fp16"}, "ddp-int8": {"dp_replicate": 2, "method": "int8"}},
    4: {"ddp": {"dp_replicate": 4}, "fsdp": {"dp_shard": 4}, "hsdp": {"dp_replicate": 2, "dp_shard": 2},
        "tp": {"tp": 4}, "dp2-tp2": {"dp_shard": 2, "tp": 2}, "pp-gpipe": {"pp": 2, "dp_shard": 2,
                                                                          "pp_schedule": "gpipe"},
        "pp-1f1b": {"pp": 2, "dp_replicate": 2, "pp_schedule": "1f1b"}, "ddp-fp16": {"dp_replicate": 4, "method": "fp16"}},
}
WARMUP, STEPS = 5, 10
MAX_ROUNDS = 2
PASSES = 2
"""Rounds of STEPS steps at most: a layout whose steps spread more than SPREAD (interquartile
range over median, on any rank) is measured again, as another job on the shared cores may
have run in between; the median is over every round's steps."""
SPREAD = 0.10
OUT = Path(__file__).parent / "out" / "plan_accuracy.json"


def config(model: str, layout: dict) -> Config:
    size = MODELS[model]
    cfg = Config()
    cfg.model.name, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = "gpt", size["dim"], size["n_layers"], \
        size["n_heads"]
    cfg.data.seq_len, cfg.train.batch_size = size["seq"], size["batch"]
    cfg.parallel.dp_replicate, cfg.parallel.pp_microbatches = 1, 4
    for key, value in layout.items():
        setattr(cfg.sync if key == "method" else cfg.parallel, key, value)
    return cfg


def worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    from shoal.sync import comm_hook_for
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows: dict[str, list[dict]] = {}
    # two passes, the second in reverse order: a layout measured while another job ran, or while
    # the process was still settling, gets a second chance at another time
    for name in [*names, *reversed(names)]:
        model_name, layout_name = name.split("/")[1:]
        cfg = config(model_name, LAYOUTS[world][layout_name])
        dims = check_layout(cfg, world)
        torch.manual_seed(0)
        pm = parallelize(build_model(cfg.model, data_spec(cfg)), dims, dims.build_mesh("cpu"), cfg,
                         torch.device("cpu"))
        if pm.ddp is not None and cfg.sync.method != "allreduce":
            pm.ddp.register_comm_hook(*comm_hook_for(cfg.sync, pm.ddp.process_group))
        opt = torch.optim.AdamW(pm.parameters())
        g = torch.Generator().manual_seed(dims.dp_rank if hasattr(dims, "dp_rank") else 0)
        tokens = torch.randint(0, 256, (cfg.train.batch_size // dims.dp, cfg.data.seq_len + 1), generator=g)
        times, parts, state = [], [], {}
        for step in range(WARMUP + STEPS * MAX_ROUNDS):
            dist.barrier()
            start = time.perf_counter()
            pm.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)
            backward_done = time.perf_counter()
            pm.clip_grad_norm_(cfg.train.grad_clip)
            clip_done = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            # where the step's time went on this rank (timestamps only: no extra synchronisation)
            parts.append((backward_done - start, clip_done - backward_done, start + times[-1] - clip_done))
            if not state:  # gradients still held: the steady state's peak
                state = state_bytes(pm.parameters(), opt)
            opt.zero_grad(set_to_none=True)
            done = step + 1 - WARMUP
            if done > 0 and done % STEPS == 0:
                # every rank agrees on another round: the worst spread among them decides
                spread = torch.tensor([_spread(times[WARMUP:])])
                dist.all_reduce(spread, op=dist.ReduceOp.MAX)
                if spread.item() <= SPREAD:
                    break
        steady = times[WARMUP:]
        steady_parts = parts[WARMUP:]
        rows.setdefault(name, []).append({"step_s": statistics.median(steady), "spread": _spread(steady), "steps": len(steady),
                      "load": os.getloadavg()[0], **state,
                      "parts_s": [statistics.median(p[i] for p in steady_parts) for i in range(3)]})
        dist.barrier()
        end_distributed_ddp = pm.ddp
        del pm, opt
        if end_distributed_ddp is not None:
            end_distributed_ddp.logger = None
            end_distributed_ddp.reducer = None
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    end_distributed()


def _spread(times: list[float]) -> float:
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)


def _state(row: dict) -> int:
    return row["params"] + row["grads"] + row["optimizer"]


def layout_dims(name: str):
    world, model_name, layout_name = name.split("/")
    return check_layout(config(model_name, LAYOUTS[int(world[1:])][layout_name]), int(world[1:]))


def measure(world: int, names: list[str]) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), tmp, names), nprocs=world)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    out = {}
    for name in names:
        # each pass's step is its slowest rank's median; the quieter pass is kept, both are shown
        passes = [max((r[name][i] for r in ranks), key=lambda row: row["step_s"]) for i in range(PASSES)]
        slowest = min(passes, key=lambda row: row["step_s"])
        pp = layout_dims(name).pp
        # state per pipeline rank (the mesh puts pp outermost): the estimate is checked rank by rank
        per_pp = [max(_state(r[name][0]) for i, r in enumerate(ranks) if i * pp // world == stage)
                  for stage in range(pp)]
        out[name] = {"measured_s": slowest["step_s"], "passes_s": [row["step_s"] for row in passes],
                     "spread": slowest["spread"], "steps": slowest["steps"], "load": slowest["load"],
                     "parts_s": slowest["parts_s"],
                     "measured_state_per_pp": per_pp}
    return out


def prepare_profiles(rows: dict) -> None:
    """Profile the blocks the rows need (shoal/plan/profile.py), one start of the workers per world and model."""
    from shoal.plan.calibrate import load_calibration
    from shoal.plan.hardware import LocalHost
    from shoal.plan.memory import meta_model
    from shoal.plan.steptime import block_shape
    cal = load_calibration()
    if cal is None:
        sys.exit("no calibration cached: run `shoal plan --calibrate` first")
    for world in LAYOUTS:
        for model_name in MODELS:
            names = [n for n in rows if n.startswith(f"w{world}/{model_name}/")]
            if names:
                cfg = config(model_name, {})
                model = meta_model(cfg)
                LocalHost(cal, world).profile_blocks(cfg, model, {
                    block_shape(config(model_name, LAYOUTS[world][n.split("/")[2]]), layout_dims(n), model) for n in names})


def predict(name: str) -> dict:
    from shoal.plan.calibrate import load_calibration
    from shoal.plan.hardware import LocalHost
    from shoal.plan.memory import estimate_memory, meta_model
    from shoal.plan.steptime import predict_step
    world = int(name.split("/")[0][1:])
    model_name, layout_name = name.split("/")[1:]
    cfg = config(model_name, LAYOUTS[world][layout_name])
    dims = check_layout(cfg, world)
    cal = load_calibration()
    if cal is None:
        sys.exit("no calibration cached: run `shoal plan --calibrate` first")
    model = meta_model(cfg)
    est = estimate_memory(cfg, dims, model)
    step = predict_step(cfg, dims, model, LocalHost(cal, world), param_bytes_per_rank=est.params)
    per_pp = [estimate_memory(cfg, dims, model, pp_rank=stage).state for stage in range(dims.pp)]
    return {"predicted_s": step.total, "compute_s": step.compute, "optimizer_s": step.optimizer,
            "comm_s": step.exposed, "estimated_state_per_pp": per_pp,
            # the same split as the measured parts_s: forward+backward, then clipping and the optimizer
            "predicted_parts_s": [step.compute + step.exposed - step.clip_comm, step.optimizer + step.clip_comm]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default="", help="measure only layouts whose name contains this (w2/gpt-64x2/ddp)")
    parser.add_argument("--append", action="store_true", help="add to the JSON of earlier chunks instead of replacing")
    parser.add_argument("--report", action="store_true", help="print the table of the JSON without measuring")
    args = parser.parse_args()
    rows = json.loads(OUT.read_text())["rows"] if (args.append or args.report) and OUT.exists() else {}
    if not args.report:
        for world, layouts in LAYOUTS.items():
            names = [f"w{world}/{m}/{lay}" for m in MODELS for lay in layouts]
            names = [n for n in names if args.layouts in n]
            if names:
                for name, row in measure(world, names).items():
                    rows[name] = row
        # the measurements are kept before anything is predicted (a prediction that fails loses none)
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}, indent=1))
    prepare_profiles(rows)
    for name in rows:  # predictions are recomputed from the current calibration and model each time
        rows[name].update(predict(name))
    report(rows)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}, indent=1))
    print(f"wrote {OUT}")


def report(rows: dict) -> None:
    print(f"{'layout':<24}{'measured ms':>12}{'passes ms':>14}{'predicted ms':>13}{'error':>8}{'state MB':>10}"
          f"{'est. MB':>9}{'mem err':>8}")
    errors, mem_errors, false_fits = [], [], 0
    for name, r in sorted(rows.items()):
        err = (r["predicted_s"] - r["measured_s"]) / r["measured_s"]
        errors.append(abs(err))
        # each pipeline rank's estimate against that rank's measurement; the worst is shown
        mems = [(est - got) / got for est, got in zip(r["estimated_state_per_pp"], r["measured_state_per_pp"])]
        worst = max(range(len(mems)), key=lambda i: abs(mems[i]))
        mem_errors.append(abs(mems[worst]))
        for est, got in zip(r["estimated_state_per_pp"], r["measured_state_per_pp"]):
            cap = (est + got) / 2  # a cap between the two: "fits" must not be said of a rank that does not
            false_fits += est <= cap < got
        passes = "/".join(f"{t * 1e3:.0f}" for t in r["passes_s"])
        print(f"{name:<24}{r['measured_s'] * 1e3:>12.1f}{passes:>14}{r['predicted_s'] * 1e3:>13.1f}{err:>+8.0%}"
              f"{r['measured_state_per_pp'][worst] / 1e6:>10.2f}"
              f"{r['estimated_state_per_pp'][worst] / 1e6:>9.2f}{mems[worst]:>+8.1%}")
    scenarios = sorted({name.rsplit("/", 1)[0] for name in rows})
    for scenario in scenarios:
        # `shoal plan` ranks the layouts of the configured sync method (a compressed hook changes
        # the numerics, so it is the user's choice, not the planner's): the plain all-reduce rows
        world = int(scenario.split("/")[0][1:])
        group = {n: r for n, r in rows.items() if n.startswith(scenario + "/")
                 and "method" not in LAYOUTS[world][n.rsplit("/", 1)[1]]}
        picked = min(group, key=lambda n: group[n]["predicted_s"])
        fastest = min(group, key=lambda n: group[n]["measured_s"])
        slower = group[picked]["measured_s"] / group[fastest]["measured_s"] - 1
        print(f"{scenario}: planner picks {picked.rsplit('/', 1)[1]}, fastest measured "
              f"{fastest.rsplit('/', 1)[1]} ({slower:+.0%} slower than the fastest)")
    if errors:
        print(f"\n{len(errors)} layouts: step time MAPE {statistics.mean(errors):.1%}, worst {max(errors):.1%}; "
              f"state memory worst {max(mem_errors):.1%}, false 'fits' {false_fits}")


if __name__ == "__main__":
    main()
