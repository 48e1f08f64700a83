"""Sites over mutual TLS against plain Gloo on the same slow, distant link; a lost site's drop and rejoin.

On the sites netbed (shoal/launch/netbed_sites.py: one namespace per site, each behind a 20 Mbit/s
link, 100 ms round trip between two sites, the delay added by shoal/launch/netwire.py):

- `tls`: one `shoal run` per site (one worker each), DiLoCo's outer average over the cross-site
  plane (mutual TLS 1.3, docs/sites.md);
- `plain`: the same DiLoCo job as one Gloo world, one worker per site's namespace, its outer
  average a Gloo all-reduce across the same links (what a job without sites does, in clear).

Both train the same model on the same data for the same steps with fp32 outer gradients. Training
seconds come from the runs' metrics (first step's start to last step's end: start-up excluded, it
differs between a launcher and bare workers); bytes are every site's link counters over the whole
run, IP headers included. Then, with two TLS sites and `--grace` seconds of grace: site b's link is
cut right after a round (`drop`: the plane's own wait and the step that held the round, goal
<= grace + 1 s) and mended (`rejoin`: from the mend until a site has taken the other's state).

    # as root: it makes network namespaces
    .venv/bin/python benchmarks/sites.py                        # 2 and 3 sites, then drop and rejoin
    .venv/bin/python benchmarks/sites.py --sites 2 --steps 60 --no-drop

Prints a table and writes benchmarks/out/sites.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.config import load  # noqa: E402
from shoal.launch.netbed_sites import SitesNetbed  # noqa: E402
from shoal.observe.metrics import read_metrics  # noqa: E402
from shoal.sites.certs import make_site_certs  # noqa: E402

SHOAL = str(Path(sys.executable).parent / "shoal")
NAMES = "abcdefgh"
PORT = 7443


def common(args: argparse.Namespace, run_root: Path, name: str, steps: int) -> list[str]:
    # The sizes pinned to the flavour's own (0): `shoal run` without a file starts from the quickstart
    # (dim 128, 4 layers), a bare worker from the defaults, and the rows must train the same model.
    return ["model.name=gpt", "model.flavour=debug", "model.dim=0", "model.n_layers=0", "model.n_heads=0",
            "data.source=stdlib", "data.seq_len=64",
            f"train.steps={steps}", f"train.batch_size={args.batch_size}", "train.lr=3e-3",
            f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", "checkpoint.every=0",
            "sync.method=diloco", f"sync.inner_steps={args.inner_steps}", "sync.compression=none",
            "sync.outer_lr=0.7", "sync.outer_momentum=0.9", "launch.threads=1", "log.progress=plain",
            f"log.every={args.inner_steps}", "log.tensorboard=false", f"log.dir={run_root}", f"log.name={name}"]


def site_overrides(bed: SitesNetbed, site: str, certs: Path, grace: float) -> list[str]:
    peers = ",".join(f"{p}={bed.address(p)}:{PORT}" for p in bed.sites if p != site)
    return ["launch.nproc=1", f"sites.name={site}", f"sites.listen={bed.address(site)}:{PORT}",
            f"sites.peers={peers}", f"sites.certs={certs}", f"sites.grace_seconds={grace}"]


def retransmitted(bed: SitesNetbed) -> int:
    """TCP segments the sites have sent again so far (each namespace's own /proc/net/snmp): bytes a link
    carried twice."""
    total = 0
    for site in bed.sites:
        lines = [line.split() for line in subprocess.run(["ip", "netns", "exec", bed.namespace(site), "cat",
                                                          "/proc/net/snmp"], capture_output=True, text=True,
                                                         check=True).stdout.splitlines() if line.startswith("Tcp:")]
        total += int(lines[1][lines[0].index("RetransSegs")])
    return total


def model_size(logs: list[Path]) -> str:
    """The model the workers built, as they log it ("model gpt: 0.14M parameters"); one for all logs."""
    found = {match.group(0) for log in logs for match in re.finditer(r"model \S+: \S+ parameters", log.read_text())}
    if len(found) != 1:
        raise SystemExit(f"the workers of {logs} logged {sorted(found) or 'no model size'}, expected one model")
    return found.pop()


def train_seconds(run_dir: Path) -> float:
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    return train[-1]["time"] - (train[0]["time"] - train[0]["step_seconds"])


def wait_all(procs: list[subprocess.Popen], logs: list[Path], what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for proc, log in zip(procs, logs):
        code = proc.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise SystemExit(f"{what}: a process exited with {code}:\n{log.read_text()[-3000:]}")


def run_plain(bed: SitesNetbed, args: argparse.Namespace, run_root: Path, port: int) -> dict:
    name = f"plain{len(bed.sites)}"
    overrides = common(args, run_root, name, args.steps) + [f"parallel.dp_replicate={len(bed.sites)}"]
    load(None, overrides)  # a bad override fails here, before the workers start
    run_dir = run_root / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    before = {s: bed.counters(s)[0] for s in bed.sites}
    resent = retransmitted(bed)
    started = time.perf_counter()
    procs, logs = [], []
    for rank, site in enumerate(bed.sites):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(bed.sites)), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": bed.address(bed.sites[0]), "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "wan0", "OMP_NUM_THREADS": "1"}
        logs.append(run_dir / "logs" / f"stdout{rank}.txt")
        procs.append(bed.spawn(site, [sys.executable, "-m", "shoal.worker", *overrides, "--run-dir", str(run_dir)],
                               env=env, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    wait_all(procs, logs, name)
    return {"row": name, "transport": "plain Gloo", "sites": len(bed.sites), "model": model_size(logs),
            "wall_seconds": round(time.perf_counter() - started, 1), "train_seconds": round(train_seconds(run_dir), 2),
            "bytes_sent": sum(bed.counters(s)[0] - before[s] for s in bed.sites),
            "segments_resent": retransmitted(bed) - resent}


def start_sites(bed: SitesNetbed, args: argparse.Namespace, run_root: Path, certs: Path, tag: str, steps: int,
                grace: float) -> tuple[list[subprocess.Popen], list[Path]]:
    procs, logs = [], []
    for site in bed.sites:
        overrides = common(args, run_root, f"{tag}-{site}", steps) + site_overrides(bed, site, certs, grace)
        logs.append(run_root / f"{tag}-{site}.out")
        procs.append(bed.spawn(site, [SHOAL, "run", *overrides], cwd=run_root, stdout=logs[-1].open("w"),
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
    return procs, logs


def run_tls(bed: SitesNetbed, args: argparse.Namespace, run_root: Path, certs: Path) -> dict:
    tag = f"tls{len(bed.sites)}"
    before = {s: bed.counters(s)[0] for s in bed.sites}
    resent = retransmitted(bed)
    started = time.perf_counter()
    procs, logs = start_sites(bed, args, run_root, certs, tag, args.steps, grace=10.0)
    wait_all(procs, logs, tag)
    rounds = args.steps // args.inner_steps
    together = [log.read_text().count("with every site") for log in logs]
    if together != [rounds] * len(logs):  # a row must compare the same work: every round with every site
        raise SystemExit(f"{tag}: rounds with every site {together}, expected {rounds} each; see {logs}")
    # What the plane's frames carried, by kind (each site's `site_traffic` event at exit): the link
    # bytes beyond these are TLS records, TCP/IP headers and retransmissions.
    frames = {s: next((e["sent"] for e in events(run_root / f"{tag}-{s}") if e["event"] == "site_traffic"), {})
              for s in bed.sites}
    return {"row": tag, "transport": "mutual TLS 1.3", "sites": len(bed.sites), "model": model_size(logs),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(max(train_seconds(run_root / f"{tag}-{s}") for s in bed.sites), 2),
            "bytes_sent": sum(bed.counters(s)[0] - before[s] for s in bed.sites), "frames_sent": frames,
            "segments_resent": retransmitted(bed) - resent,
            "frame_bytes_sent": sum(size for sent in frames.values() for _, size in sent.values())}


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def drop_and_rejoin(bed: SitesNetbed, args: argparse.Namespace, run_root: Path, certs: Path) -> dict:
    """Two TLS sites; b's link is cut right after a round and mended once a has gone on without it."""
    procs, logs = start_sites(bed, args, run_root, certs, "drop", 100000, grace=args.grace)
    a_log, a_dir, b_dir = logs[0], run_root / "drop-a", run_root / "drop-b"
    try:
        wait_until(lambda: a_log.read_text().count("with every site") >= 2, 300, "two rounds of both sites")
        cut = time.time()
        bed.cut("b")
        try:
            dropped = wait_until(lambda: next((e for e in events(a_dir) if e["event"] == "site_dropped"), None),
                                 120, "site a to drop site b")
        except SystemExit:  # a result, not a crash of the benchmark: the grace window did not hold
            return {"row": "drop+rejoin", "sites": 2, "grace_seconds": args.grace, "dropped_within_120_s": False}
        went_on = wait_until(lambda: "averaged over sites a\n" in a_log.read_text(), 60, "site a to go on alone")
        round_step = dropped["round"] * args.inner_steps  # the step whose outer sync held the round
        held = wait_until(lambda: next((r["step_seconds"] for r in read_metrics(a_dir)
                                        if r.get("kind") == "train" and r["step"] == round_step), None),
                          60, f"site a's metrics of step {round_step}")
        bed.mend("b")
        mended = time.time()
        joined = wait_until(lambda: next((e for e in events(a_dir) + events(b_dir) if e["event"] == "site_joined"
                                          and e["t"] >= mended), None), 240, "a site to take the other's state")
        return {"row": "drop+rejoin", "sites": 2, "grace_seconds": args.grace, "dropped_in_round": dropped["round"],
                "cut_to_drop_seconds": round(dropped["t"] - cut, 2), "plane_waited_seconds": dropped["waited"],
                "round_step_seconds": round(held, 2), "went_on_alone": bool(went_on),
                "mend_to_joined_seconds": round(joined["t"] - mended, 2), "joined_site": joined["site"],
                "state_from": joined["source"]}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\n{args.rate} per site, {args.rtt} round trip between sites; gpt debug, {args.steps} steps x "
          f"{args.batch_size} x 64 tokens, DiLoCo every {args.inner_steps} steps, fp32 outer gradients")
    header = f"{'row':<8} {'transport':<15} {'train s':>8} {'wall s':>7} {'MB sent':>8} {'train ÷ plain':>14} " \
             f"{'bytes ÷ plain':>14}"
    print(f"{header}\n{'-' * len(header)}")
    for row in rows:
        plain = next((r for r in rows if r["transport"] == "plain Gloo" and r["sites"] == row["sites"]), None)
        if plain is not None and row is not plain:
            if row["model"] != plain["model"]:
                raise SystemExit(f"{row['row']} trained {row['model']}, {plain['row']} {plain['model']}: not comparable")
            row["vs_plain"] = {"train": row["train_seconds"] / plain["train_seconds"],
                               "bytes": row["bytes_sent"] / plain["bytes_sent"]}
        ratios = row.get("vs_plain")
        print(f"{row['row']:<8} {row['transport']:<15} {row['train_seconds']:>8.2f} {row['wall_seconds']:>7.1f} "
              f"{row['bytes_sent'] / 1e6:>8.2f} " + (f"{ratios['train']:>14.3f} {ratios['bytes']:>14.3f}"
                                                    if ratios else f"{'-':>14} {'-':>14}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="2,3", help="site counts, comma-separated")
    parser.add_argument("--rate", default="20mbit", help="each site's link, both ways")
    parser.add_argument("--rtt", default="100ms", help="round trip between two sites")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inner-steps", type=int, default=10, help="DiLoCo's H: steps between outer rounds")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, sequences of 64 tokens")
    parser.add_argument("--grace", type=float, default=3.0, help="sites.grace_seconds of the drop/rejoin run")
    parser.add_argument("--no-drop", action="store_true", help="skip the drop and rejoin run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "sites.json"))
    args = parser.parse_args()
    if args.steps % args.inner_steps:
        parser.error(f"--steps {args.steps} must be a multiple of --inner-steps {args.inner_steps}")
    for count in (int(n) for n in args.sites.split(",")):
        if args.batch_size % count:  # the plain row's workers split the global batch between the sites
            parser.error(f"--batch-size {args.batch_size} must divide into {count} sites (e.g. --batch-size 12)")

    from shoal.data import build_dataset
    build_dataset(load(None, ["data.source=stdlib", "data.seq_len=64"]).data, 0)  # fill the cache once, here

    rows, drop = [], None
    with tempfile.TemporaryDirectory(prefix="shoal-sites-bench-") as tmp:
        for index, count in enumerate(int(n) for n in args.sites.split(",")):
            run_root = Path(tmp) / f"sites{count}"
            run_root.mkdir()
            certs = run_root / "certs"
            make_site_certs(certs, list(NAMES[:count]))
            with SitesNetbed(list(NAMES[:count]), args.rate, args.rtt, prefix=f"shbench{count}",
                             subnet=f"10.{90 + index}.0.0/16") as bed:
                print(f"{count} sites: plain Gloo...", flush=True)
                rows.append(run_plain(bed, args, run_root, 29700 + count))
                print(f"{count} sites: mutual TLS...", flush=True)
                rows.append(run_tls(bed, args, run_root, certs))
                if count == 2 and not args.no_drop:
                    print("2 sites: cut site b's link, then mend it...", flush=True)
                    drop = drop_and_rejoin(bed, args, run_root, certs)
    print_table(args, rows)
    for row in rows:
        print(f"{row['row']}: {row['segments_resent']} TCP segments sent again")
        for site, sent in row.get("frames_sent", {}).items():
            print(f"{row['row']} site {site} sent frames: " + ", ".join(
                f"{count} {kind} ({size / 1e6:.2f} MB)" for kind, (count, size) in sent.items()))
    if drop and drop.get("dropped_within_120_s") is False:
        print(f"\ndrop: site a did NOT drop site b within 120 s of the cut (grace {args.grace:g} s)")
    elif drop:
        print(f"\ndrop: b's link cut {drop['cut_to_drop_seconds']:.2f} s before site a dropped it from round "
              f"{drop['dropped_in_round']}; the plane waited {drop['plane_waited_seconds']:.2f} s and that step took "
              f"{drop['round_step_seconds']:.2f} s (grace {args.grace:g} s, goal <= {args.grace + 1:g} s)")
        print(f"rejoin: {drop['mend_to_joined_seconds']:.2f} s from the mend until site {drop['joined_site']} took "
              f"site {drop['state_from']}'s state")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "benchmarks/sites.py " + " ".join(sys.argv[1:]), "rate": args.rate, "rtt": args.rtt,
        "steps": args.steps, "inner_steps": args.inner_steps, "batch_size": args.batch_size,
        "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(), "rows": rows, "drop": drop,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
