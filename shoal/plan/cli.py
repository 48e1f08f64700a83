"""`shoal plan CONFIG.toml --world N`: every layout of N ranks, its per-rank memory, which
fit, and the one to use. Imported by shoal/cli.py at start-up, so it imports torch only
when the command runs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="list parallel layouts for N workers with their memory; recommend one",
                              description="Estimate per-worker memory (parameters, gradients, optimizer state, "
                                          "activations) of every parallel layout of --world ranks, flag those "
                                          "that fit --memory-per-worker, and recommend one.")
    p.add_argument("config", help="the run's TOML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `shoal run`")
    p.add_argument("--world", type=int, required=True, help="total workers (hosts x processes per host)")
    p.add_argument("--memory-per-worker", default=None,
                   help="memory each worker may use, e.g. 2GB or 16GiB; layouts above it are marked as not fitting")
    p.add_argument("--all", action="store_true", help="also list the layouts this model cannot take, with why")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shoal import config
    from shoal.config import ConfigError
    from shoal.plan.layouts import format_size, parse_size, plan_layouts, recommend

    if args.world < 1:
        raise ConfigError(f"--world {args.world} must be at least 1")
    cfg = config.load(args.config, args.overrides)
    cap = parse_size(args.memory_per_worker) if args.memory_per_worker else None
    plans = plan_layouts(cfg, args.world, cap)
    best = recommend(plans)
    valid = sorted((p for p in plans if p.estimate), key=lambda p: p.estimate.total)
    header = f"{'layout':<38}{'params':>10}{'grads':>10}{'optim':>10}{'activ':>10}{'buffers':>10}{'total':>10}"
    print(f"{cfg.model.name} ({cfg.model.flavour}) on {args.world} workers, per-worker memory of the busiest rank"
          + (f", cap {format_size(cap)}" if cap else ""))
    print(header + ("  fits" if cap else ""))
    for p in valid:
        e = p.estimate
        mark = "*" if p is best else " "
        row = (f"{mark} {p.name:<36}{format_size(e.params):>10}{format_size(e.grads):>10}{format_size(e.optimizer):>10}"
               f"{format_size(e.activations):>10}{format_size(e.buffers):>10}{format_size(e.total):>10}")
        print(row + (("  yes" if p.fits else "  no") if cap else ""))
    invalid = [p for p in plans if not p.estimate]
    if invalid and args.all:
        print("\nnot possible for this model:")
        for p in invalid:
            print(f"  {p.name:<36}{p.error}")
    elif invalid:
        print(f"({len(invalid)} more layouts are not possible for this model; --all lists them with the reason)")
    if best is None:
        print("\nno layout fits: add workers, lower --memory-per-worker's demand (train.batch_size, "
              "parallel.activation_checkpointing) or use a smaller model")
        return 1
    print(f"\nrecommended: {best.name}  (estimated {format_size(best.estimate.total)} per worker)")
    print("[parallel]\n" + "\n".join(f"{axis} = {d}" for axis, d in best.degrees.items()))
    return 0
