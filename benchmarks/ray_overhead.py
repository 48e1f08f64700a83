"""What running through Ray costs: `shoal run` against `shoal run --ray` (a local Ray started
for the run, Ray Train's TorchTrainer), on the same workload and the same number of workers.

For each launcher it measures start-up (from the command's start to the first training step
in metrics.jsonl), the whole run's wall time, the median step time, and the peak memory of
the command's whole process tree (the sum of resident set sizes, sampled every 0.2 s: shared
pages count once per process, so both numbers overstate alike). Prints a table and writes
benchmarks/out/ray_overhead.json.

    .venv/bin/python benchmarks/ray_overhead.py [--steps 100] [--workers 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = str(Path(sys.executable).parent / "shoal")
WORKLOAD = ["model.name=gpt", "model.flavour=debug", "data.source=stdlib", "data.seq_len=64", "data.max_bytes=400000",
            "train.batch_size=16", "train.eval_every=0", "train.warmup_steps=2", "launch.threads=1",
            "log.progress=plain", "log.tensorboard=false"]
SAMPLE_SECONDS = 0.2


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:  # the process ended while being read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_once(ray: bool, steps: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="shoal-ray-bench-") as workdir:
        args = [SHOAL, "run", *WORKLOAD, f"train.steps={steps}", f"launch.nproc={workers}", "log.name=bench"]
        started = time.time()
        proc = subprocess.Popen([*args, *(["--ray"] if ray else [])], cwd=workdir, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(SAMPLE_SECONDS)
        wall = time.time() - started
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{err[-2000:]}")
        records = [json.loads(line) for line in (Path(workdir) / "runs" / "bench" / "metrics.jsonl").read_text()
                   .splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        return {"startup_s": train[0]["time"] - started, "wall_s": wall,
                "median_step_s": statistics.median(r["step_seconds"] for r in train),
                "peak_tree_rss_mb": peak / 2**20, "final_loss": train[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5 steps, once each: shows the script works")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 5, 1
    results = {}
    for name, ray in (("shoal run", False), ("shoal run --ray", True)):
        runs = [run_once(ray, args.steps, args.workers) for _ in range(args.repeats)]
        results[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    base, over = results["shoal run"], results["shoal run --ray"]
    print(f"{args.workers} workers, {args.steps} steps, median of {args.repeats}")
    print(f"{'launcher':<18}{'start-up s':>12}{'wall s':>10}{'step ms':>10}{'peak MB':>10}{'final loss':>12}")
    for name, r in results.items():
        print(f"{name:<18}{r['startup_s']:>12.1f}{r['wall_s']:>10.1f}{r['median_step_s'] * 1000:>10.1f}"
              f"{r['peak_tree_rss_mb']:>10.0f}{r['final_loss']:>12.4f}")
    print(f"Ray: +{over['startup_s'] - base['startup_s']:.1f} s start-up, "
          f"{over['peak_tree_rss_mb'] / base['peak_tree_rss_mb']:.1f}x peak memory")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_overhead.json").write_text(json.dumps({"steps": args.steps, "workers": args.workers,
                                                       "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
