"""Shoal's overhead against a minimal hand-written DDP script under torchrun, and the cost of
fault-tolerant mode against plain DDP, all with default settings (no thread or restart flags).

The same model (gpt 'debug'), data, batch and steps; rows: the hand-written loop (2 workers),
`shoal run` with 2 and 4 workers, `shoal run fault.enabled=true` with 2 and 4 workers. Each
repeat runs every row once, in turn, so drift on the machine hits them alike; a ratio is the
median of the per-repeat ratios. Reports steady-state samples/s, time from command start to
first step, and peak memory per worker; prints a table and writes benchmarks/out/overhead.json.

    .venv/bin/python benchmarks/overhead.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = str(Path(sys.executable).parent / "shoal")


def steady_rate(times: list[float], batch: int) -> float:
    """Samples/s over the second half of the steps (after warm-up)."""
    half = len(times) // 2
    return batch * (len(times) - 1 - half) / (times[-1] - times[half])


def run_shoal(workdir: Path, steps: int, batch: int, seq_len: int, *extra: str) -> dict:
    args = [SHOAL, "run", f"train.steps={steps}", f"train.batch_size={batch}", f"data.seq_len={seq_len}",
            "train.eval_every=0", "checkpoint.every=0", "log.progress=off", "log.name=bench", "train.grad_clip=0",
            *extra]
    started = time.time()
    subprocess.run(args, cwd=workdir, check=True, capture_output=True)
    run = sorted((workdir / "runs").glob("bench*"), key=lambda p: p.stat().st_mtime)[-1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r.get("kind") == "train"]
    peaks = [float(re.search(r"peak memory (\d+) MB", p.read_text()).group(1))
             for p in sorted((run / "logs").glob("rank*.log"))]
    return {"samples_per_s": steady_rate(times, batch), "first_step_s": times[0] - started, "peak_mb": peaks}


def run_torchrun(workdir: Path, steps: int, batch: int, seq_len: int) -> dict:
    out = workdir / "handwritten.jsonl"
    started = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(ROOT / "benchmarks" / "handwritten_ddp.py"), str(out), str(steps), str(batch), str(seq_len)],
                   cwd=workdir, check=True, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    times = [r["time"] for r in records if "step" in r]
    return {"samples_per_s": steady_rate(times, batch), "first_step_s": times[0] - started,
            "peak_mb": records[-1]["peak_rss_mb"]}


ROWS = {
    "torchrun + hand-written DDP": lambda w, a: run_torchrun(w, a.steps, a.batch, a.seq_len),
    "shoal run": lambda w, a: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=2"),
    "shoal run fault.enabled": lambda w, a: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=2",
                                                      "fault.enabled=true"),
    "shoal run, 4 workers": lambda w, a: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=4"),
    "shoal run fault.enabled, 4 workers": lambda w, a: run_shoal(w, a.steps, a.batch, a.seq_len, "launch.nproc=4",
                                                                 "fault.enabled=true"),
}
PAIRS = {  # ratio name -> (ours, baseline, goal)
    "shoal / hand-written, throughput": ("shoal run", "torchrun + hand-written DDP", ">= 0.97"),
    "shoal / hand-written, time to first step": ("shoal run", "torchrun + hand-written DDP", "<= 1.5"),
    "fault-tolerant / plain, throughput (2 workers)": ("shoal run fault.enabled", "shoal run", ">= 0.95"),
    "fault-tolerant / plain, throughput (4 workers)": ("shoal run fault.enabled, 4 workers", "shoal run, 4 workers",
                                                       ">= 0.95"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "overhead.json"))
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # every row once per repeat, in turn
            for name, run in ROWS.items():
                workdir = Path(tmp) / f"{repeat}-{len(results[name])}-{name.split()[0]}"
                workdir.mkdir()
                results[name].append(run(workdir, args))
    summary = {name: {"samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
                      "first_step_s": statistics.median(r["first_step_s"] for r in runs),
                      "peak_mb_per_worker": max(max(r["peak_mb"]) for r in runs), "runs": runs}
               for name, runs in results.items()}
    ratios = {}
    for label, (ours, base, goal) in PAIRS.items():
        key = "first_step_s" if "first step" in label else "samples_per_s"
        pairs = [a[key] / b[key] for a, b in zip(results[ours], results[base])]
        ratios[label] = {"median": statistics.median(pairs), "pairs": pairs, "goal": goal}
    print(f"{'launcher':<38} {'samples/s':>10} {'first step (s)':>15} {'peak MB/worker':>15}")
    for name, s in summary.items():
        print(f"{name:<38} {s['samples_per_s']:>10.0f} {s['first_step_s']:>15.2f} {s['peak_mb_per_worker']:>15.0f}")
    print()
    for label, r in ratios.items():
        pairs = ", ".join(f"{p:.2f}" for p in r["pairs"])
        print(f"{label:<48} {r['median']:.3f}x (goal {r['goal']}; pairs {pairs})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
