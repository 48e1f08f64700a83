"""Pipeline bubble, measured vs the theoretical (p-1)/(m+p-1), for GPipe and 1F1B over
several micro-batch counts m on p = 2 stages (one Gloo rank per CPU core).

Bubble = 1 - (time a stage computes) / (step time). The compute time is measured on each
rank by running its stage's forward and backward on one micro-batch outside the pipeline
(median of several runs) and multiplying by m; the step time is the median of several
pipeline steps with the same micro-batch size. Goal (issue 3): within 10 percentage
points of theory.

    .venv/bin/python benchmarks/pipeline.py          # table on stdout, JSON in benchmarks/out/
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.config import Config
from shoal.data.spec import DataSpec
from shoal.models import build_model, compute_loss
from shoal.parallel.compose import check_layout, parallelize

STAGES, VOCAB, SEQ, MICRO = 2, 256, 64, 4  # MICRO: samples per micro-batch
CASES = [("gpipe", m) for m in (1, 2, 4, 8)] + [("1f1b", m) for m in (2, 4, 8)]
REPEATS = 5


def config(schedule: str, m: int) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = "gpt", 256, 4, 4
    cfg.data.seq_len, cfg.train.batch_size = SEQ, MICRO * m
    cfg.parallel.dp_replicate, cfg.parallel.pp = 1, STAGES
    cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches = schedule, m
    return cfg


def stage_compute_seconds(part: torch.nn.Module, first: bool, last: bool, dim: int) -> float:
    """One micro-batch's forward + backward through this stage alone."""
    x = (torch.randint(0, VOCAB, (MICRO, SEQ)) if first else torch.randn(MICRO, SEQ, dim, requires_grad=True))
    times = []
    for _ in range(REPEATS + 1):
        start = time.perf_counter()
        out = part(x)
        if last:
            compute_loss(out, torch.randint(0, VOCAB, (MICRO, SEQ))).backward()
        else:
            out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - start)
    part.zero_grad()
    return statistics.median(times[1:])  # the first run warms up the allocator


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = DataSpec(kind="tokens", vocab_size=VOCAB, seq_len=SEQ)
    rows = []
    for schedule, m in CASES:
        cfg = config(schedule, m)
        dims = check_layout(cfg, world)
        torch.manual_seed(0)
        pm = parallelize(build_model(cfg.model, spec), dims, dims.build_mesh("cpu"), cfg, torch.device("cpu"))
        tokens = torch.randint(0, VOCAB, (MICRO * m, SEQ + 1))
        steps = []
        for _ in range(REPEATS + 1):
            dist.barrier()
            start = time.perf_counter()
            pm.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)
            steps.append(time.perf_counter() - start)
        step = statistics.median(steps[1:])
        compute = m * stage_compute_seconds(pm.model_parts[0], pm.has_first, pm.has_last, cfg.model.dim)
        # the pipeline is as slow as its slowest stage: report the bubble of the busiest one
        both = [torch.tensor([compute, step], dtype=torch.float64) for _ in range(world)]
        dist.all_gather(both, torch.tensor([compute, step], dtype=torch.float64))
        compute_max = max(float(t[0]) for t in both)
        step_max = max(float(t[1]) for t in both)
        rows.append({"schedule": schedule, "microbatches": m, "step_seconds": step_max,
                     "stage_compute_seconds": compute_max, "bubble_measured": max(0.0, 1 - compute_max / step_max),
                     "bubble_theory": (STAGES - 1) / (m + STAGES - 1)})
    if rank == 0:
        Path(out, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(STAGES, port, out), nprocs=STAGES)
        rows = json.loads(Path(out, "rows.json").read_text())
    print(f"{'schedule':<9}{'m':>3}{'step (s)':>10}{'compute (s)':>13}{'bubble':>9}{'theory':>9}{'gap (pp)':>10}")
    for r in rows:
        r["gap_points"] = 100 * (r["bubble_measured"] - r["bubble_theory"])
        print(f"{r['schedule']:<9}{r['microbatches']:>3}{r['step_seconds']:>10.3f}{r['stage_compute_seconds']:>13.3f}"
              f"{r['bubble_measured']:>9.1%}{r['bubble_theory']:>9.1%}{r['gap_points']:>+10.1f}")
    target = Path(__file__).parent / "out" / "pipeline.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                  "stages": STAGES, "micro_batch": MICRO, "seq_len": SEQ,
                                  "model": "gpt dim=256 n_layers=4 n_heads=4 vocab=256",
                                  "load_average": os.getloadavg()[0], "rows": rows}, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
