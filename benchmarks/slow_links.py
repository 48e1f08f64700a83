"""Training over slow links: DDP against compressed all-reduce and DiLoCo, on a real 20 Mbit/s network.

Each worker runs in its own network namespace (shoal/launch/netbed.py) whose link is
limited with `tc tbf`; the workers are ordinary `python -m shoal.worker` processes that
find each other through MASTER_ADDR, as on separate hosts. With `--rtt 100ms` every worker
is instead its own site of the sites netbed (shoal/launch/netbed_sites.py): a namespace behind
a `tc tbf`-limited TUN link to a WAN router, so that every pair of workers is one WAN round
trip apart. Every method gets the same token budget (steps x global batch). Bytes are the
kernel's counters of each worker's link, not estimates.

    # as root: it makes network namespaces
    .venv/bin/python benchmarks/slow_links.py                 # five methods at 2 and 4 workers
    .venv/bin/python benchmarks/slow_links.py --methods ddp,diloco-default --steps 300 --batch-size 16
    # the same links with 100 ms of round trip between any two workers
    .venv/bin/python benchmarks/slow_links.py --methods ddp,diloco-default --steps 300 --batch-size 16 --rtt 100ms
    # issue 28's size: a 1.3M-parameter gpt, 3000 steps, the default DiLoCo at H 10/30/100 (hours here)
    .venv/bin/python benchmarks/slow_links.py --workers 2,4 --dim 160 --layers 4 --steps 3000 --batch-size 32 \
        --methods ddp,diloco-default-h10,diloco-default-h30,diloco-default-h100

`--workers 2,4` runs every method at each worker count (one netbed each) and ends with the
loss gap to DDP at each count side by side. `diloco-default` is `sync.method=diloco` and nothing
else (the tuned defaults, docs/sync.md); `diloco-default-h<H>` changes only inner_steps. By
default (`--rtt none`) the links are rate-limited only. This kernel has no `netem`, so `--rtt`
adds the delay below TCP with the TUN delay line of shoal/launch/netwire.py: it holds every
packet rtt/4 on each site's wire each way, so a packet between two workers is held rtt/2 and a
round trip takes `rtt` on top of the rate limit.

The default shape is chosen so that communication dominates DDP's step: the gpt debug model
(137k parameters, 0.55 MB in fp32) with 4 sequences of 64 tokens per worker per step costs
~35 ms of compute per step on a quiet 2-core machine, while one ring all-reduce of its
gradients at 20 Mbit/s takes ~0.4 s.

Prints a table and writes benchmarks/out/slow_links.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.config import load  # noqa: E402
from shoal.launch.netbed import Netbed, NetbedError  # noqa: E402
from shoal.launch.netbed_sites import SitesNetbed, parse_rtt  # noqa: E402
from shoal.observe.metrics import read_metrics  # noqa: E402

# ddp, fp16, powersgd, the paper's diloco, streaming and Shoal's default diloco; int8 (per-step, error
# feedback) and the H sweep (diloco-default-h10/h30/h100) can be added with --methods.
DEFAULT_METHODS = ("ddp", "fp16", "powersgd", "diloco", "streaming", "diloco-default")
METHODS: dict[str, list[str]] = {
    "ddp": ["sync.method=allreduce"],
    "fp16": ["sync.method=fp16"],
    "int8": ["sync.method=int8"],
    "powersgd": ["sync.method=powersgd", "sync.powersgd_rank=4"],
    # The DiLoCo paper's recipe: AdamW inside (train.optimizer's default), outer Nesterov SGD lr 0.7, momentum 0.9.
    "diloco": ["sync.method=diloco", "sync.inner_steps=50", "sync.compression=int8", "sync.outer_lr=0.7",
               "sync.outer_momentum=0.9", "sync.nesterov=true", "sync.outer_warmup=0"],
    "streaming": ["sync.method=diloco", "sync.inner_steps=50", "sync.compression=int4", "sync.fragments=4",
                  "sync.overlap=true", "sync.outer_lr=0.7", "sync.outer_momentum=0.9", "sync.nesterov=true",
                  "sync.outer_warmup=0"],
    # The best of a small sweep at this budget (docs/sync.md): syncs twice as often at half the bytes each,
    # with a full outer step and light momentum, for 20 outer syncs' worth of pseudo-gradients.
    "diloco-h25": ["sync.method=diloco", "sync.inner_steps=25", "sync.compression=int4", "sync.outer_lr=1.0",
                   "sync.outer_momentum=0.5", "sync.nesterov=true", "sync.outer_warmup=0"],
    # Shoal's default cross-site method: `sync.method = "diloco"` and nothing else (docs/sync.md says why).
    "diloco-default": ["sync.method=diloco"],
}
# The H sweep: the defaults with only inner_steps changed (the outer lr follows H by the table).
for _h in (10, 30, 100):
    METHODS[f"diloco-default-h{_h}"] = ["sync.method=diloco", f"sync.inner_steps={_h}"]


def common_overrides(args: argparse.Namespace, run_root: Path, name: str) -> list[str]:
    return [
        "model.name=gpt", f"model.flavour={args.flavour}", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
        "data.source=stdlib", "data.seq_len=64",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        f"train.warmup_steps={args.steps // 10}", f"train.eval_every={min(50, args.steps)}", "train.eval_batches=8",
        f"parallel.dp_replicate={args.workers}", "checkpoint.every=0", "checkpoint.keep=1",
        "launch.threads=1", "log.progress=plain", "log.every=50", "log.tensorboard=false",
        f"log.dir={run_root}", f"log.name={name}",
    ]


class SiteWorkers:
    """A SitesNetbed seen as a Netbed: worker i is site "w<i>", reached over its wan0."""

    def __init__(self, bed: SitesNetbed, workers: int):
        self.bed, self.sites = bed, [f"w{i}" for i in range(workers)]

    def address(self, worker: int) -> str:
        return self.bed.address(self.sites[worker])

    def env(self, worker: int) -> dict[str, str]:
        # As Netbed.env: Gloo talks over the one link out of the namespace (a site's is wan0, not eth0).
        return {**os.environ, "GLOO_SOCKET_IFNAME": "wan0"}

    def spawn(self, worker: int, argv: list[str], **popen) -> subprocess.Popen:
        return self.bed.spawn(self.sites[worker], argv, **popen)

    def counters(self, worker: int) -> tuple[int, int]:
        return self.bed.counters(self.sites[worker])


def link_text(args: argparse.Namespace) -> str:
    return f"{args.rate}" + ("" if args.rtt == "none" else f", {args.rtt} rtt")


def run_method(bed: Netbed | SiteWorkers, args: argparse.Namespace, name: str, run_root: Path, port: int) -> dict:
    overrides = common_overrides(args, run_root, name) + METHODS[name]
    load(None, overrides)  # a bad override fails here, before four workers start
    run_dir = run_root / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    before = [bed.counters(i)[0] for i in range(args.workers)]
    started = time.perf_counter()
    procs = []
    for rank in range(args.workers):
        env = bed.env(rank) | {"RANK": str(rank), "WORLD_SIZE": str(args.workers), "LOCAL_RANK": "0",
                               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": bed.address(0), "MASTER_PORT": str(port),
                               "OMP_NUM_THREADS": "1"}
        log = (run_dir / "logs" / f"stdout{rank}.txt").open("w")
        procs.append(bed.spawn(rank, [sys.executable, "-m", "shoal.worker", *overrides, "--run-dir", str(run_dir)],
                               env=env, stdout=log, stderr=subprocess.STDOUT))
    # Sample the counters while the workers run, to split start-up bytes from training bytes.
    samples = []
    while any(p.poll() is None for p in procs):
        samples.append((time.time(), [bed.counters(i)[0] - before[i] for i in range(args.workers)]))
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    if any(codes):
        tails = "".join(f"\n--- rank {r} ---\n" + "".join((run_dir / "logs" / f"stdout{r}.txt").read_text()
                                                               .splitlines(keepends=True)[-8:])
                        for r, code in enumerate(codes) if code)
        raise WorkersFailed(f"{name}: workers exited with {codes}{tails}", killed=any(c < 0 for c in codes))
    sent = [bed.counters(i)[0] - before[i] for i in range(args.workers)]
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [(r["time"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    start = train[0]["time"] - train[0]["step_seconds"]
    startup = next((sent for t, sent in reversed(samples) if t <= start), [0] * args.workers)
    return {"method": name, "overrides": METHODS[name], "wall_seconds": round(wall, 1),
            "train_seconds": round(train[-1]["time"] - start, 1),
            "bytes_sent_per_worker": int(sum(sent) / len(sent)), "bytes_sent": sent,
            "startup_bytes_per_worker": int(sum(startup) / len(startup)),
            "final_val_loss": evals[-1][1], "final_train_loss": train[-1]["loss"],
            "val_curve": [(round(t - start, 1), loss) for t, loss in evals]}


REACH_TOLERANCE = 0.01  # "reached DDP's loss" means within 1 %: fp16 lands a hair above it


class WorkersFailed(RuntimeError):
    def __init__(self, message: str, killed: bool):
        super().__init__(message)
        self.killed = killed  # by a signal from outside, not by an error of its own


def time_to_reach(result: dict, target: float) -> float | None:
    """Seconds of training until validation loss first came within 1 % of `target`; None if never."""
    return next((t for t, loss in result["val_curve"] if loss <= target * (1 + REACH_TOLERANCE)), None)


def run_world_size(args: argparse.Namespace, names: list[str]) -> list[dict]:
    """Every method at `args.workers` workers, each worker in its own namespace of one bed."""
    rate = None if args.rate == "none" else args.rate
    if args.rtt != "none":
        # Every worker its own site: any two are one WAN round trip apart. A prefix per worker count (the
        # previous bed may linger a moment) and a /16 apart from Netbed's 10.79.<n>.0/24 and the tests' beds.
        with SitesNetbed([f"w{i}" for i in range(args.workers)], rate, args.rtt, prefix=f"shs{args.workers}x",
                         subnet=f"10.{90 + args.workers}.0.0/16") as sites:
            return run_methods(SiteWorkers(sites, args.workers), args, names)
    with Netbed(args.workers, rate, prefix=f"shb{args.workers}x",
                subnet=f"10.79.{args.workers}.0/24") as bed:  # the previous bed's links may linger a moment
        return run_methods(bed, args, names)


def run_methods(bed: Netbed | SiteWorkers, args: argparse.Namespace, names: list[str]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-slow-links-") as tmp:
        for index, name in enumerate(names):
            print(f"running {name} ({args.steps} steps, {args.workers} workers at {link_text(args)})...", flush=True)
            try:
                result = run_method(bed, args, name, Path(tmp) / "try1", 29600 + index)
            except WorkersFailed as failure:
                if not failure.killed:
                    raise SystemExit(str(failure)) from None
                # On a shared machine another job may kill our workers; one more try, said aloud.
                print(f"{failure}\nretrying {name} once", flush=True)
                result = run_method(bed, args, name, Path(tmp) / "try2", 29650 + index)
            results.append({**result, "workers": args.workers})
    return results


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    """One world size's table; adds each row's ratios to DDP (the issue's goals) to its result."""
    reference = next((r for r in results if r["method"] == "ddp"), None)
    header = (f"{'method':<22} {'wall s':>8} {'train s':>8} {'MB sent/worker':>15} {'of it start-up':>15} "
              f"{'val loss':>9} {'s to DDP+1%':>12} {'bytes ÷':>8} {'wall ÷':>7} {'train ÷':>8} {'loss vs DDP':>12}")
    print(f"\n{args.workers} workers, {link_text(args)} links, gpt {args.flavour} dim {args.dim or 'preset'} layers "
          f"{args.layers or 'preset'}, {args.steps} steps x {args.batch_size} x 64 tokens")
    print(f"{header}\n{'-' * len(header)}")
    for r in results:
        reach = time_to_reach(r, reference["final_val_loss"]) if reference else None
        r["seconds_to_ddp_final_loss"] = reach
        if reference:
            r["vs_ddp"] = {"bytes_fewer": reference["bytes_sent_per_worker"] / r["bytes_sent_per_worker"],
                           "wall_faster": reference["wall_seconds"] / r["wall_seconds"],
                           "train_faster": reference["train_seconds"] / r["train_seconds"],
                           "loss_gap": r["final_val_loss"] / reference["final_val_loss"] - 1}
        ratios = r.get("vs_ddp", {})
        reach_text = "-" if reference is None else "never" if reach is None else f"{reach:.1f}"
        print(f"{r['method']:<22} {r['wall_seconds']:>8.1f} {r['train_seconds']:>8.1f} "
              f"{r['bytes_sent_per_worker'] / 1e6:>15.2f} {r['startup_bytes_per_worker'] / 1e6:>15.2f} "
              f"{r['final_val_loss']:>9.4f} {reach_text:>12} "
              + (f"{ratios['bytes_fewer']:>8.1f} {ratios['wall_faster']:>7.1f} {ratios['train_faster']:>8.1f} "
                 f"{ratios['loss_gap']:>+12.1%}" if ratios else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated from {', '.join(METHODS)}")
    parser.add_argument("--workers", default="2,4", help="worker (replica) counts, comma-separated")
    parser.add_argument("--rate", default="20mbit", help="each worker's link, both ways; none for no limit")
    parser.add_argument("--rtt", default="none", help="round trip added between any two workers, e.g. 100ms "
                        "(each worker its own site of shoal/launch/netbed_sites.py, the delay made by "
                        "shoal/launch/netwire.py); none (the default) for the bridge of shoal/launch/netbed.py, "
                        "no delay")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (the same for every method)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, sequences of 64 tokens")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--flavour", default="debug", help="gpt size preset")
    parser.add_argument("--dim", type=int, default=0, help="gpt width; 0 means the flavour's (the issue's "
                        "size: --dim 160 --layers 4, 1.3M parameters)")
    parser.add_argument("--layers", type=int, default=0, help="gpt blocks; 0 means the flavour's")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "slow_links.json"))
    args = parser.parse_args()
    names = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.rtt != "none":
        try:
            parse_rtt(args.rtt)
        except NetbedError as error:
            parser.error(f"--rtt: {error}")

    from shoal.data import build_dataset
    build_dataset(load(None, ["data.source=stdlib", "data.seq_len=64"]).data, 0)  # fill the cache once, here

    counts = [int(w) for w in str(args.workers).split(",")]
    results = []
    for workers in counts:
        run_args = argparse.Namespace(**{**vars(args), "workers": workers})
        results += run_world_size(run_args, names)
        print_table(run_args, [r for r in results if r["workers"] == workers])
    if len(counts) > 1:  # the loss columns: the gap to DDP at each replica count, side by side
        print(f"\n{'method':<22} " + " ".join(f"{f'gap at {w}':>10}" for w in counts))
        for name in names:
            gaps = [next((r.get("vs_ddp", {}).get("loss_gap") for r in results
                          if r["method"] == name and r["workers"] == w), None) for w in counts]
            print(f"{name:<22} " + " ".join(f"{g:>+10.1%}" if g is not None else f"{'-':>10}" for g in gaps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "benchmarks/slow_links.py " + " ".join(sys.argv[1:]), "workers": counts,
        "rate": args.rate, "rtt": args.rtt, "steps": args.steps, "batch_size": args.batch_size,
        "flavour": args.flavour, "dim": args.dim, "layers": args.layers,
        "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(), "results": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
