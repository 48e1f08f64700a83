"""Pipeline bubble, measured vs the theoretical (p-1)/(m+p-1), for GPipe and 1F1B over
several micro-batch counts m on p = 2 stages (one Gloo rank per CPU core).

Bubble = 1 - (time a rank computes) / (step time), both measured in the same pipeline
step: the compute time is the time spent inside the stages' forward_one_chunk and
backward_one_chunk (timed by wrapping those two PipelineStage methods here), the rest of
the step is waiting for the neighbour stage. Averaged over the ranks, median of several
steps. Goal (issue 3): within 10 percentage points of theory. On a shared machine other
processes stretch both times; compare runs taken at a low load average (recorded in the JSON).

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
from torch.distributed.pipelining import PipelineStage

from shoal.config import Config
from shoal.data.spec import DataSpec
from shoal.models import build_model
from shoal.parallel.compose import check_layout, parallelize
from shoal.runtime.env import end_distributed  # (importing it comes before any init_process_group)

STAGES, VOCAB, SEQ, MICRO = 2, 256, 64, 4  # MICRO: samples per micro-batch
CASES = [("gpipe", m) for m in (1, 2, 4, 8)] + [("1f1b", m) for m in (2, 4, 8)]
REPEATS = 8


def config(schedule: str, m: int) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = "gpt", 256, 4, 4
    cfg.data.seq_len, cfg.train.batch_size = SEQ, MICRO * m
    cfg.parallel.dp_replicate, cfg.parallel.pp = 1, STAGES
    cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches = schedule, m
    return cfg


BUSY = {"seconds": 0.0}


def _timed(method):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            BUSY["seconds"] += time.perf_counter() - start
    return wrapper


# compute on a stage happens inside these two methods; receives and sends happen between them
PipelineStage.forward_one_chunk = _timed(PipelineStage.forward_one_chunk)
PipelineStage.backward_one_chunk = _timed(PipelineStage.backward_one_chunk)


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
        steps, bubbles, busy = [], [], []
        for _ in range(REPEATS + 1):
            dist.barrier()
            BUSY["seconds"] = 0.0
            start = time.perf_counter()
            pm.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)
            step = time.perf_counter() - start
            # a step ends on every rank when the loss broadcast returns: one step time for all
            mine = torch.tensor([BUSY["seconds"], step], dtype=torch.float64)
            every = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            step = max(float(t[1]) for t in every)
            steps.append(step)
            busy.append(statistics.mean(float(t[0]) for t in every))
            bubbles.append(statistics.mean(1 - float(t[0]) / step for t in every))
        rows.append({"schedule": schedule, "microbatches": m, "step_seconds": statistics.median(steps[1:]),
                     "compute_seconds": statistics.median(busy[1:]), "bubble_measured": statistics.median(bubbles[1:]),
                     "bubble_theory": (STAGES - 1) / (m + STAGES - 1)})
    if rank == 0:
        Path(out, "rows.json").write_text(json.dumps(rows))
    end_distributed()


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
        print(f"{r['schedule']:<9}{r['microbatches']:>3}{r['step_seconds']:>10.3f}{r['compute_seconds']:>13.3f}"
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
