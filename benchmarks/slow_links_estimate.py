"""Slow links at issue 28's size, estimated: losses from the DiLoCo sweep, time from bytes at the link's rate.

benchmarks/slow_links.py measures every method on a real rate-limited netbed, but at the
issue's size (gpt 1.3M parameters, 3000 steps x 32 x 64 tokens) one DDP run over a 20 Mbit/s
link takes hours of this 2-core machine. This mode takes each method's validation loss from
benchmarks/diloco_sweep.py (R replicas simulated in one process with the wire encodings; loss
does not depend on the link) and its time on the link from arithmetic:

    time = steps x compute per step (measured here: one worker's share of the global batch,
           one thread, this machine)
         + messages x (bytes sent per worker / link rate + sequential rounds x RTT / 2)

DDP: one ring all-reduce of the fp32 gradients per step (DDP's 25 MB bucket holds the whole
model): 2(N-1)/N x 4P bytes sent per worker, 2(N-1) rounds. DiLoCo per outer sync, as
shoal/sync/diloco.py sends int8: at 2 replicas one all-gather of the payload (N-1 rounds, (N-1) x
payload bytes); beyond 2 an all-to-all and an all-gather (quantized_reduce_scatter: 2(N-1)/N x
payload bytes, 1 + (N-1) rounds); plus the start's broadcast of the fp32 model. (The sweep's
loss at 4 replicas decodes every replica's int8 codes and averages in fp32; the all-to-all path
rounds the average to int8 once more, which the sweep does not model.) Compute is not
overlapped with communication in the estimate (DDP's overlap would hide at most its compute,
a few % of its step here). Every row says which inputs were measured and which computed.

    .venv/bin/python benchmarks/slow_links_estimate.py --sweep docs/diloco_sweep_1m.jsonl \
        --rate-mbit 20 --rtt-ms 100 --workers 2,4

Prints a table and writes benchmarks/out/slow_links_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diloco_sweep as sweep  # noqa: E402
from shoal.sync.outer_settings import DEFAULT_COMPRESSION, tuned_outer_settings  # noqa: E402


def compute_seconds_per_step(shape: dict, per_worker_batch: int, repeats: int) -> float:
    """One worker's forward, backward and AdamW step on its share of the batch, one thread, median."""
    args = argparse.Namespace(seq_len=shape["seq_len"], flavour=shape["flavour"], steps=shape["steps"],
                              lr=shape["lr"], warmup=shape["warmup"], batch_size=per_worker_batch, seed=shape["seed"],
                              dim=shape["dim"], layers=shape["layers"], max_bytes=shape["max_bytes"],
                              tokens="", save_tokens="")
    torch.set_num_threads(1)
    cfg, train, _, spec = sweep.setup(args)
    model = sweep.fresh_model(cfg, spec)
    optimizer = sweep.build_optimizer(model.parameters(), cfg.train)
    order = sweep.batches(train, cfg, repeats + 3)
    times = []
    for step in range(repeats + 3):
        x, y = train.get(order[step])
        started = time.perf_counter()
        sweep.inner_step(model, optimizer, x, y, cfg.train, step, norms=[])
        times.append(time.perf_counter() - started)
    return sorted(times[3:])[repeats // 2]


def link_seconds(sent_bytes: float, rounds: int, rate: float, rtt: float) -> float:
    return sent_bytes / rate + rounds * rtt / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="docs/diloco_sweep_1m.jsonl", help="benchmarks/diloco_sweep.py's JSONL")
    parser.add_argument("--seed", type=int, default=1234, help="the sweep's seed whose rows are used")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="the sweep's global batch whose rows are used; 0: the first DDP row's")
    parser.add_argument("--rate-mbit", type=float, default=20.0)
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps for the compute per step")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "slow_links_estimate.json"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.sweep).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["seed"] == args.seed and (not args.batch_size or r["batch_size"] == args.batch_size)]
    ddp = [r for r in rows if r["method"] == "ddp" and r["lr"] == rows[0]["lr"]]
    if not ddp:
        raise SystemExit(f"{args.sweep}: no DDP row for seed {args.seed}"
                         + (f" and batch {args.batch_size}" if args.batch_size else "")
                         + "; run diloco_sweep.py --ddp-only first")
    ddp = ddp[0]
    shape = {k: ddp[k] for k in ("steps", "batch_size", "seq_len", "lr", "warmup", "flavour", "dim", "layers",
                                 "params", "seed", "max_bytes")}
    rows = [r for r in rows if all(r[k] == v for k, v in shape.items())]  # one file may hold several shapes
    rate, rtt, params, steps = args.rate_mbit * 1e6 / 8, args.rtt_ms / 1e3, shape["params"], shape["steps"]
    print(f"gpt {params / 1e6:.2f}M parameters, {steps} steps x {shape['batch_size']} x {shape['seq_len']} tokens; "
          f"links {args.rate_mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT (computed, not a netbed run)")
    header = (f"{'workers':>7} {'method':<48} {'compute s':>9} {'comm s':>9} {'wall s':>9} {'MB sent/worker':>14} "
              f"{'val loss':>9} {'bytes ÷':>8} {'wall ÷':>7} {'loss vs DDP':>11}")
    print(f"{header}\n{'-' * len(header)}")
    table = []
    for workers in [int(w) for w in args.workers.split(",")]:
        compute = compute_seconds_per_step(shape, shape["batch_size"] // workers, args.repeats) * steps
        ddp_sent = steps * 2 * (workers - 1) / workers * 4 * params
        ddp_comm = steps * link_seconds(2 * (workers - 1) / workers * 4 * params, 2 * (workers - 1), rate, rtt)
        entries = [{"method": "DDP all-reduce (time computed)", "sent": ddp_sent, "comm": ddp_comm,
                    "val_loss": ddp["val_loss"]}]
        for h in (10, 30, 100):
            candidates = [r for r in rows if r["method"] == "diloco" and r["replicas"] == workers
                          and r["inner_steps"] == h and r["compression"] == DEFAULT_COMPRESSION]
            if not candidates:
                continue
            tuned = tuned_outer_settings(workers, h)
            chosen = [r for r in candidates if (r["outer_lr"], r["outer_momentum"], r["outer_warmup"],
                                                r["inner_lr_scale"]) == (tuned.lr, tuned.momentum, tuned.warmup, 1.0)]
            row = chosen[0] if chosen else min(candidates, key=lambda r: r["val_loss"])
            label = (f"DiLoCo H={h} {row['compression']}, outer {row['outer_lr']:g}/{row['outer_momentum']:g}"
                     f"/w{row['outer_warmup']}" + (" (default)" if chosen and h == 30 else
                                                   "" if chosen else " (best swept)"))
            payload = row["bytes_per_sync"]
            syncs = steps // h
            # shoal/sync/diloco.py: one all-gather at 2 replicas; beyond, an all-to-all + an all-gather
            per_sync, rounds = ((workers - 1) * payload, workers - 1) if workers <= 2 else \
                (2 * (workers - 1) / workers * payload, 1 + (workers - 1))
            sent = syncs * per_sync + 4 * params  # + the start's broadcast of the model
            comm = syncs * link_seconds(per_sync, rounds, rate, rtt) + link_seconds(4 * params, 1, rate, rtt)
            entries.append({"method": label, "sent": sent, "comm": comm, "val_loss": row["val_loss"],
                            "inner_steps": h, "outer_lr": row["outer_lr"], "outer_momentum": row["outer_momentum"],
                            "outer_warmup": row["outer_warmup"], "is_default": bool(chosen) and h == 30})
        for entry in entries:
            entry.update(workers=workers, compute=compute, wall=compute + entry["comm"],
                         bytes_fewer=entries[0]["sent"] / entry["sent"],
                         wall_faster=(compute + entries[0]["comm"]) / (compute + entry["comm"]),
                         loss_gap=entry["val_loss"] / entries[0]["val_loss"] - 1)
            print(f"{workers:>7} {entry['method']:<48} {compute:>9.0f} {entry['comm']:>9.0f} {entry['wall']:>9.0f} "
                  f"{entry['sent'] / 1e6:>14.1f} {entry['val_loss']:>9.4f} {entry['bytes_fewer']:>8.0f} "
                  f"{entry['wall_faster']:>7.1f} {entry['loss_gap']:>+11.1%}")
            table.append(entry)
    single = [r for r in rows if r["method"] == "diloco" and r["replicas"] == 1]
    for row in single:
        print(f"DiLoCo 1 replica H={row['inner_steps']} outer {row['outer_lr']:g}/{row['outer_momentum']:g}: "
              f"{row['val_loss']:.4f}, {row['val_loss'] / ddp['val_loss'] - 1:+.1%} against plain AdamW "
              f"({ddp['val_loss']:.4f})")
        table.append({"workers": 1, "method": f"DiLoCo 1 replica outer {row['outer_lr']:g}/{row['outer_momentum']:g}",
                      "val_loss": row["val_loss"], "loss_gap": row["val_loss"] / ddp["val_loss"] - 1})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": shape, "rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms,
                               "sweep": args.sweep, "rows": table}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
