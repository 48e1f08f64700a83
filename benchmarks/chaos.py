"""Training under failure: Shoal's per-step recovery against torchrun's restart-everything.

The same workload (gpt 'debug' on the stdlib corpus, `--workers` workers, one thread each)
runs four times for `--duration` seconds of training each: Shoal clean, Shoal with a random
worker SIGKILLed every `--every` seconds (`shoal run --chaos`, killed workers restarted),
torchrun clean, and torchrun (`--max-restarts`, resuming from a checkpoint every 10 steps)
with the same kills sent by this script. Reports failures injected and survived, time from
each kill to the next committed step, goodput (samples committed / samples the clean run of
the same launcher commits in the same wall time) and, for Shoal, samples lost or repeated
(from the per-step sample log). Prints a table and writes benchmarks/out/chaos.json.

    .venv/bin/python benchmarks/chaos.py [--duration 180] [--every 15] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOAL = str(Path(sys.executable).parent / "shoal")
sys.path.insert(0, str(ROOT))

from shoal import config as config_module  # noqa: E402
from shoal.fault.audit import audit, read_records  # noqa: E402
from shoal.runtime.protocol import SAMPLE_LOG_ENV  # noqa: E402

BATCH = 32
WORKLOAD = ["model.name=gpt", "model.flavour=debug", "data.source=stdlib", "data.seq_len=64",
            f"train.batch_size={BATCH}", "train.steps=1000000", "train.eval_every=0", "train.warmup_steps=10",
            "log.progress=off", "fault.enabled=true", "fault.step_timeout=10"]  # otherwise the defaults


GRACE = 15.0
"""Seconds a run goes on after its measured window, without new failures, so that a kill near the
window's end can show its recovery; samples committed then do not count as goodput."""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)  # polling files written by other processes: there is no event to wait on
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_shoal(workdir: Path, workers: int, duration: float, chaos: str | None) -> dict:
    samples = workdir / "samples"
    samples.mkdir(parents=True)
    args = [SHOAL, "run", *WORKLOAD, f"launch.nproc={workers}", "log.name=bench"] + (["--chaos", chaos] if chaos else [])
    # Ctrl-C (SIGINT) ends the run as a user would; a shell's background job starts with SIGINT ignored,
    # which the launcher would inherit, so it is given back its default.
    proc = subprocess.Popen(args, cwd=workdir, env={**os.environ, SAMPLE_LOG_ENV: str(samples)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: any(p.stat().st_size for p in samples.glob("*.jsonl")), 300, "the first step")
        start = time.time()
        time.sleep(duration)  # the measured window: training runs (and fails) on its own meanwhile
        end = time.time()
        time.sleep(GRACE)  # a kill at the window's end gets the time to recover (not counted as goodput)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    run = workdir / "runs" / "bench"
    events = [json.loads(line) for line in (run / "logs" / "fault_events.jsonl").read_text().splitlines()]
    records = read_records(samples)
    commits = sorted(min(r["t"] for r in recs) for recs in records.values())
    kills = [e["t"] for e in events if e["event"] == "chaos" and start <= e["t"] <= end]
    recoveries = [next((c - k for c in commits if c > k), None) for k in kills]
    last = max(records)
    num_samples = next(int(line.split()[-3]) for line in (run / "logs" / "rank0.log").read_text().splitlines()
                       if "training samples" in line)
    for path in samples.glob("*.jsonl"):  # leave out the step in flight at Ctrl-C (some workers only)
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                                if line.strip() and f'"step": {last},' not in line))
    check = audit(samples, num_samples=num_samples, global_batch=BATCH, grad_accum=1, seed=1234)
    # -9: killed by the chaos; 0: finished; 128 + SIGINT: stopped with a checkpoint by this script's Ctrl-C
    crashed = [e for e in events if e["event"] == "exit" and e["code"] not in (-9, 0, 128 + signal.SIGINT)]
    return {"committed_samples": BATCH * sum(1 for c in commits if start <= c <= end), "window_s": end - start,
            "kills": len(kills), "survived": sum(r is not None for r in recoveries) if not crashed else 0,
            "recovery_s": [r for r in recoveries if r is not None], "crashed_workers": len(crashed),
            "samples_lost_or_repeated": check.duplicated + BATCH * (len(check.missing_steps) + len(check.wrong_batch_steps)),
            "replicas_disagreed_steps": len(check.disagreeing_steps), "exit_code": proc.returncode,
            "stderr_tail": stderr[-600:]}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def run_torchrun(workdir: Path, workers: int, duration: float, every: float | None, seed: int = 0) -> dict:
    cfg = config_module.load(None, [*WORKLOAD, f"launch.nproc={workers}", "checkpoint.every=10", "log.name=tr"])
    run = workdir / "runs" / "tr"
    (run / "logs").mkdir(parents=True)
    (run / "config.toml").write_text(config_module.to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(workers), "--max-restarts", "1000", "-m", "shoal.worker", str(run / "config.toml"),
                             "--run-dir", str(run)], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"

    def steps() -> list[tuple[float, int]]:
        if not metrics.is_file():
            return []
        rows = []
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "train":
                rows.append((row["time"], row["step"]))
        return rows

    rng = random.Random(seed)
    kills: list[float] = []
    try:
        wait_for(steps, 300, "the first step")
        start = time.time()
        end = start + duration
        next_kill = start + every if every else float("inf")
        while time.time() < end:
            if time.time() >= next_kill:
                pids = children(proc.pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills.append(time.time())
                next_kill += every
            time.sleep(0.05)
        time.sleep(GRACE)  # as for Shoal: late kills may still recover; no more kills now
        progress = steps()
    finally:
        proc.kill()
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    before = max((s for t, s in progress if t <= start), default=0)
    reached = max((s for t, s in progress if t <= end), default=0)
    recoveries = [next((t - k for t, _ in progress if t > k), None) for k in kills]
    return {"committed_samples": BATCH * (reached - before), "window_s": duration, "kills": len(kills),
            "survived": sum(r is not None for r in recoveries), "recovery_s": [r for r in recoveries if r is not None],
            "redone_steps": sum(1 for i in range(1, len(progress)) if progress[i][1] <= progress[i - 1][1])}


def summarize(name: str, chaos: dict, clean: dict) -> dict:
    rec = chaos["recovery_s"]
    return {"launcher": name, "failures_injected": chaos["kills"], "failures_survived": chaos["survived"],
            "median_recovery_s": statistics.median(rec) if rec else None, "worst_recovery_s": max(rec) if rec else None,
            "goodput": chaos["committed_samples"] / (clean["committed_samples"] / clean["window_s"] * chaos["window_s"]),
            "samples_lost_or_repeated": chaos.get("samples_lost_or_repeated"), "raw": {"chaos": chaos, "clean": clean}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of training measured per run")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between kills")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip-torchrun", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = run_shoal(tmp / "shoal-clean", args.workers, args.duration, None)
        chaos = run_shoal(tmp / "shoal-chaos", args.workers, args.duration, f"kill=random,every={args.every}s")
        rows.append(summarize("shoal run (fault.enabled)", chaos, clean))
        if not args.skip_torchrun:
            clean = run_torchrun(tmp / "tr-clean", args.workers, args.duration, None)
            chaos = run_torchrun(tmp / "tr-chaos", args.workers, args.duration, args.every)
            rows.append(summarize("torchrun --max-restarts", chaos, clean))
    print(f"{args.workers} workers, gpt debug, a random SIGKILL every {args.every:.0f}s, {args.duration:.0f}s measured "
          f"per run\n")
    print(f"{'launcher':28} {'injected':>8} {'survived':>8} {'median s':>9} {'worst s':>8} {'goodput':>8} {'lost/dup':>8}")
    for r in rows:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['launcher']:28} {r['failures_injected']:>8} {r['failures_survived']:>8} "
              f"{fmt(r['median_recovery_s'], '>9.2f')} {fmt(r['worst_recovery_s'], '>8.2f')} "
              f"{r['goodput']:>8.0%} {fmt(r['samples_lost_or_repeated'], '>8')}")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    print(f"\nwrote {out / 'chaos.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
