"""DiLoCo's outer settings swept in one process: R replicas simulated side by side.

Each replica is its own model and AdamW, stepping on its own slice of every global batch
(the slice a `dp_replicate` rank of `shoal run` gets); every H steps the replicas' pseudo-
gradients are encoded as on the wire (shoal/sync/: int8, fp4, topk with its error feedback),
decoded and averaged in rank order, and one outer SGD (Nesterov) moves the shared outer
parameters, exactly as shoal/sync/diloco.py does across processes. DDP is one model on the
whole batch. Same model, data order, tokens, schedule and seed for every row, so the rows
differ only by the method. One process, no collectives: a sweep of dozens of settings costs
what a few distributed runs would, on a shared 2-core machine. A distributed run of the chosen
default (tests/sync/test_diloco_defaults.py, benchmarks/slow_links.py) confirms it.

    .venv/bin/python benchmarks/diloco_sweep.py --replicas 2 --inner-steps 10,30 --outer-lr 0.5,0.7,1.0 \
        --outer-momentum 0.9 --steps 600
    .venv/bin/python benchmarks/diloco_sweep.py --ddp-only --steps 600
    # issue 28's size (1.3M parameters, 3000 steps, 6.1M tokens, under one epoch of a 12 MB corpus):
    .venv/bin/python benchmarks/diloco_sweep.py --dim 160 --layers 4 --steps 3000 --batch-size 32 \
        --max-bytes 12000000 --replicas 4 --inner-steps 30 --outer-lr 0.6,1.0 --outer-momentum 0.9

The corpus is the Python standard library of the interpreter that runs the script, so another
Python reads other bytes: `--save-tokens DIR` writes this machine's training and validation
bytes, and `--tokens DIR` trains on them elsewhere (a GPU machine with another Python:
`--device cuda`), so that every row of the sweep sees the same tokens wherever it ran.

Each setting appends one JSON line to --out (default benchmarks/out/diloco_sweep.jsonl) and a
row to the printed table: final validation loss, gap to DDP's (from the same file), bytes
each replica sends per outer sync.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.config import load  # noqa: E402
from shoal.data import DataSpec, build_dataset, datasets  # noqa: E402
from shoal.models import build_model, compute_loss  # noqa: E402
from shoal.sync.compress import dequantize, quantize  # noqa: E402
from shoal.sync.diloco import outer_warmup_factor  # noqa: E402
from shoal.sync.encoding import ENCODINGS, decode_average, make_encoding  # noqa: E402
from shoal.train import build_optimizer, lr_at  # noqa: E402


def setup(args):
    overrides = ["data.source=stdlib", f"data.seq_len={args.seq_len}", "model.name=gpt",
                 f"model.flavour={args.flavour}", f"train.steps={args.steps}", f"train.lr={args.lr}",
                 f"train.warmup_steps={args.warmup}", f"train.batch_size={args.batch_size}", f"train.seed={args.seed}"]
    if args.dim:
        overrides += [f"model.dim={args.dim}", f"model.n_layers={args.layers}"]
    overrides.append(f"data.max_bytes={args.max_bytes}")
    cfg = load(None, overrides)
    if args.tokens:  # the bytes saved by --save-tokens on another machine, windows built as build_dataset does
        train_tokens, val_tokens = (torch.from_numpy(np.load(Path(args.tokens) / f"{part}.npy"))
                                    for part in ("train", "val"))
        spec = DataSpec(kind="tokens", vocab_size=datasets.VOCAB_SIZE, seq_len=cfg.data.seq_len)
        return cfg, datasets.TokenWindows(train_tokens, cfg.data.seq_len), \
            datasets.TokenWindows(val_tokens, cfg.data.seq_len), spec
    train, val, spec = build_dataset(cfg.data, 0)
    if args.save_tokens:
        Path(args.save_tokens).mkdir(parents=True, exist_ok=True)
        parts = datasets.stdlib_split(cfg.data.max_bytes, datasets.cache_dir(cfg.data.cache_dir),
                                      cfg.data.val_fraction)
        for part, tokens in zip(("train", "val"), parts):
            np.save(Path(args.save_tokens) / f"{part}.npy", tokens.numpy())
    return cfg, train, val, spec


DEVICE = torch.device("cpu")
BETA2: float | None = None  # --beta2: AdamW's second-moment decay for DDP and the replicas (None: the Trainer's)


def grad_norm_summary(norms: list[tuple[float, bool]]) -> dict:
    """The median gradient norm (before clipping) over a run's inner steps, each (norm, clipped), and
    the share clipped; a replica's gradient on 1/R of the batch carries more noise than DDP's on all of it."""
    return {"grad_norm_median": round(float(torch.tensor([n for n, _ in norms]).median()), 4),
            "clipped_share": round(sum(c for _, c in norms) / len(norms), 4)}


def set_beta2(optimizer, beta2: float | None) -> None:
    if beta2 is not None:
        for group in optimizer.param_groups:
            group["betas"] = (group["betas"][0], beta2)


def fresh_model(cfg, spec):
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every device: built on the CPU, then moved
    return build_model(cfg.model, spec).to(DEVICE)


def batches(train, cfg, steps):
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed))
    need = steps * cfg.train.batch_size
    order = order.repeat(math.ceil(need / len(order)))[:need]
    return order.view(steps, cfg.train.batch_size)


def inner_step(model, optimizer, x, y, cfg, step, norms: list[tuple[float, bool]]):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = compute_loss(model(x.to(DEVICE)), y.to(DEVICE))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
    norms.append((float(norm), float(norm) > cfg.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def evaluate(model, val, n_batches=32, batch=32):
    model.eval()
    losses = []
    for b in range(n_batches):
        ids = torch.arange(b * batch, (b + 1) * batch) % len(val)
        x, y = val.get(ids)
        losses.append(compute_loss(model(x.to(DEVICE)), y.to(DEVICE)).item())
    model.train()
    return sum(losses) / len(losses)


class Wire:
    """One replica's wire format for the whole model (one fragment), as shoal/sync/diloco.py uses it."""

    def __init__(self, name: str, numel: int, topk_fraction: float, topk_bits: int):
        self.name = name
        self.encoding = make_encoding(name, numel, topk_fraction=topk_fraction, topk_bits=topk_bits) \
            if name in ENCODINGS else None
        self.numel = numel

    def sent(self, pseudo: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What the other replicas decode of this replica's pseudo-gradient, and its bytes."""
        if self.encoding is not None:
            payload = self.encoding.encode(pseudo)
            return self.encoding.decode(payload), payload.numel()
        if self.name in ("int8", "int4"):
            bits = int(self.name[3:])
            codes, scales = quantize(pseudo, bits)
            return dequantize(codes, scales, bits, self.numel), codes.numel() + 4 * scales.numel()
        dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.name]
        return pseudo.to(dtype).float(), self.numel * torch.finfo(dtype).bits // 8


def run_diloco(cfg, train, val, spec, order, *, replicas, inner_steps, outer_lr, outer_momentum, nesterov,
               compression, topk_fraction, topk_bits, outer_warmup, inner_lr_scale, inner_clip_scale=1.0,
               inner_beta2=None):
    models = [fresh_model(cfg, spec) for _ in range(replicas)]
    tcfg = cfg.train
    inner_cfg = type(tcfg)(**{**vars(tcfg), "lr": tcfg.lr * inner_lr_scale,
                              "grad_clip": tcfg.grad_clip * inner_clip_scale if inner_clip_scale else math.inf})
    optimizers = [build_optimizer(m.parameters(), inner_cfg) for m in models]
    for optimizer in optimizers:  # the replicas' AdamW second-moment decay: --inner-beta2, else --beta2
        set_beta2(optimizer, inner_beta2 if inner_beta2 is not None else BETA2)
    params = [list(m.parameters()) for m in models]
    outer = [p.detach().clone().float() for p in params[0]]
    outer_opt = torch.optim.SGD(outer, lr=outer_lr, momentum=outer_momentum,
                                nesterov=nesterov and outer_momentum > 0)
    numel = sum(o.numel() for o in outer)
    wires = [Wire(compression, numel, topk_fraction, topk_bits) for _ in range(replicas)]
    share = order.shape[1] // replicas
    sync_bytes, syncs, norms = 0, 0, []
    for step in range(order.shape[0]):
        for r in range(replicas):
            x, y = train.get(order[step, r * share:(r + 1) * share])
            inner_step(models[r], optimizers[r], x, y, inner_cfg, step, norms)
        if (step + 1) % inner_steps:
            continue
        with torch.no_grad():
            sent = []
            for r in range(replicas):
                pseudo = torch.cat([(o - p.float()).reshape(-1) for p, o in zip(params[r], outer)])
                decoded, n_bytes = wires[r].sent(pseudo.cpu())  # the encodings as on the wire: CPU tensors
                sent.append(decoded.to(DEVICE))
            average = decode_average_rows(sent)
            for group in outer_opt.param_groups:
                group["lr"] = outer_lr * outer_warmup_factor(syncs, outer_warmup)
            start = 0
            for o in outer:
                o.grad = average[start:start + o.numel()].view_as(o)
                start += o.numel()
            outer_opt.step()
            for r in range(replicas):
                for p, o in zip(params[r], outer):
                    p.copy_(o)
        sync_bytes, syncs = n_bytes, syncs + 1
    return evaluate(models[0], val), sync_bytes, syncs, grad_norm_summary(norms)


def decode_average_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(rows[0])
    for row in rows:  # rank order, as decode_average
        total += row
    return total.div_(len(rows))


def run_ddp(cfg, train, val, spec, order):
    """DDP's final validation loss, and its curve at 80 % and 90 % of the steps: still falling at the end?"""
    model = fresh_model(cfg, spec)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    set_beta2(optimizer, BETA2)
    steps = order.shape[0]
    marks = {steps * 8 // 10, steps * 9 // 10} - {0}
    curve, norms = {}, []
    for step in range(steps):
        x, y = train.get(order[step])
        inner_step(model, optimizer, x, y, cfg.train, step, norms)
        if step + 1 in marks:
            curve[step + 1] = evaluate(model, val)
    curve[steps] = evaluate(model, val)
    return curve[steps], curve, grad_norm_summary(norms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--flavour", default="debug")
    parser.add_argument("--dim", type=int, default=0, help="gpt width (with --layers); 0: the flavour's")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--replicas", default="2")
    parser.add_argument("--inner-steps", default="10")
    parser.add_argument("--outer-lr", default="0.7")
    parser.add_argument("--outer-momentum", default="0.9")
    parser.add_argument("--nesterov", default="1")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--topk-fraction", type=float, default=0.02)
    parser.add_argument("--topk-bits", type=int, default=2)
    parser.add_argument("--outer-warmup", default="0", help="outer syncs of linear outer-lr warm-up")
    parser.add_argument("--inner-lr-scale", default="1", help="inner lr multiplier for the replicas")
    parser.add_argument("--inner-clip-scale", type=float, default=1.0,
                        help="the replicas' gradient clipping threshold x this (DDP keeps train.grad_clip); 0: none")
    parser.add_argument("--beta2", type=float, default=None,
                        help="AdamW's beta2 for DDP and the replicas (default: the Trainer's 0.95)")
    parser.add_argument("--inner-beta2", type=float, default=None,
                        help="the replicas' AdamW beta2 alone (DDP keeps --beta2, else the Trainer's 0.95)")
    parser.add_argument("--settings", default="", help="instead of the grid: ';'-separated "
                        "R:H:outer_lr:momentum[:warmup[:inner_lr_scale[:compression]]]")
    parser.add_argument("--ddp-only", action="store_true")
    parser.add_argument("--skip-ddp", action="store_true", help="take DDP's loss from --out when it is there")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="data.max_bytes: the corpus's size")
    parser.add_argument("--save-tokens", default="", help="write the corpus's train/val bytes to this folder")
    parser.add_argument("--tokens", default="", help="train on the bytes --save-tokens wrote (another machine's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the replicas train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234, help="weights and data order (train.seed)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "diloco_sweep.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, BETA2
    DEVICE, BETA2 = torch.device(args.device), args.beta2
    cfg, train, val, spec = setup(args)
    n_params = sum(p.numel() for p in fresh_model(cfg, spec).parameters())
    order = batches(train, cfg, args.steps)
    shape = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
             "warmup": args.warmup, "flavour": args.flavour, "dim": args.dim, "layers": args.layers,
             "params": n_params, "seed": args.seed, "max_bytes": args.max_bytes,
             **({"beta2": args.beta2} if args.beta2 is not None else {})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row):
        with out.open("a") as f:
            f.write(json.dumps({**shape, **row}) + "\n")

    def ddp_loss():
        for line in out.read_text().splitlines() if out.exists() else []:
            row = json.loads(line)
            if row["method"] == "ddp" and all(row.get(k) == v for k, v in shape.items()):
                return row["val_loss"]
        return None

    if args.ddp_only or (ddp_loss() is None and not args.skip_ddp):
        started = time.perf_counter()
        loss, curve, norms = run_ddp(cfg, train, val, spec, order)
        record({"method": "ddp", "val_loss": loss, "val_curve": curve, **norms,
                "seconds": round(time.perf_counter() - started, 1)})
        print(f"ddp: val loss {loss:.4f} ({time.perf_counter() - started:.0f} s, {n_params} params); at steps "
              + ", ".join(f"{s}: {v:.4f}" for s, v in curve.items()), flush=True)
    reference = ddp_loss()
    if args.ddp_only:
        return 0
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    grid = list(itertools.product(ints(args.replicas), ints(args.inner_steps), floats(args.outer_lr),
                                  floats(args.outer_momentum), ints(args.outer_warmup), floats(args.inner_lr_scale),
                                  args.compression.split(",")))
    if args.settings:
        grid = []
        for item in args.settings.split(";"):
            v = item.split(":") + ["0", "1", args.compression][len(item.split(":")) - 4:]
            grid.append((int(v[0]), int(v[1]), float(v[2]), float(v[3]), int(v[4]), float(v[5]), v[6]))
    print(f"{'R':>2} {'H':>4} {'outer lr':>8} {'mom':>5} {'warm':>4} {'inner x':>7} {'wire':>6} "
          f"{'val loss':>9} {'vs DDP':>8} {'kB/sync':>8} {'s':>5}", flush=True)
    for replicas, h, olr, mom, warm, scale, wire in grid:
        started = time.perf_counter()
        loss, n_bytes, syncs, norms = run_diloco(
            cfg, train, val, spec, order, replicas=replicas, inner_steps=h, outer_lr=olr, outer_momentum=mom,
            nesterov=bool(int(args.nesterov)), compression=wire, topk_fraction=args.topk_fraction,
            topk_bits=args.topk_bits, outer_warmup=warm, inner_lr_scale=scale,
            inner_clip_scale=args.inner_clip_scale, inner_beta2=args.inner_beta2)
        seconds = time.perf_counter() - started
        reference = reference or ddp_loss()
        gap = loss / reference - 1 if reference else float("nan")
        record({"method": "diloco", "replicas": replicas, "inner_steps": h, "outer_lr": olr, "outer_momentum": mom,
                "nesterov": bool(int(args.nesterov)), "outer_warmup": warm, "inner_lr_scale": scale,
                "compression": wire, "topk_fraction": args.topk_fraction, "topk_bits": args.topk_bits,
                **({"inner_clip_scale": args.inner_clip_scale} if args.inner_clip_scale != 1 else {}),
                **({"inner_beta2": args.inner_beta2} if args.inner_beta2 is not None else {}),
                "val_loss": loss, "ddp_val_loss": reference, "gap": gap, "bytes_per_sync": n_bytes,
                "syncs": syncs, **norms, "seconds": round(seconds, 1)})
        print(f"{replicas:>2} {h:>4} {olr:>8.2f} {mom:>5.2f} {warm:>4} {scale:>7.2f} {wire:>6} {loss:>9.4f} "
              f"{gap:>+8.1%} {n_bytes / 1e3:>8.1f} {seconds:>5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
