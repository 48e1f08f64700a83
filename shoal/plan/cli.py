"""`shoal plan CONFIG.toml --world N`: every layout of N ranks with its per-rank memory, whether
it fits, its predicted step time and throughput (on this host, from `shoal plan --calibrate`,
or on a cluster from its specs), what a token budget costs, what failures and slow links do,
and the layout to use. Imported by shoal/cli.py at start-up, so it imports torch only when
the command runs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="list parallel layouts for N workers with memory and step time; "
                                           "recommend one",
                              description="Estimate per-worker memory and step time of every parallel layout of "
                                          "--world ranks, on this host (calibrated) or on a cluster from its specs, "
                                          "flag those that fit, and recommend one. See docs/plan.md.")
    p.add_argument("config", nargs="?", help="the run's TOML config (optional with --calibrate)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `shoal run`")
    p.add_argument("--world", type=int, default=None, help="total workers (hosts x processes per host)")
    p.add_argument("--memory-per-worker", default=None,
                   help="memory each worker may use, e.g. 2GB or 16GiB; layouts above it are marked as not fitting "
                        "(default with --cluster: the accelerator's memory)")
    p.add_argument("--all", action="store_true", help="also list the layouts this model cannot take, with why")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (matmul rate, bandwidth, collectives on 2 and 4 Gloo ranks; under a "
                        "minute) and cache it; without it a cached calibration is reused")
    p.add_argument("--cluster", default=None,
                   help="predict on a cluster instead of this host: a TOML file or a preset "
                        "(h100-sxm, h200, a100, l4; spec-derived, not measured)")
    p.add_argument("--tokens", default=None, help="token budget for time and cost, e.g. 20e9 or 300B")
    p.add_argument("--mtbf", default=None, help="mean time between failures of the whole job, e.g. 6h")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints for --mtbf (default: checkpoint.every, else Young's optimum)")
    p.add_argument("--restart-seconds", type=float, default=10.0,
                   help="seconds a restart from checkpoint takes (default 10: torchrun on this 2-core host, "
                        "benchmarks/chaos.py)")
    p.add_argument("--regroup-seconds", type=float, default=0.13,
                   help="seconds per-step recovery takes (default 0.13: fault.enabled, benchmarks/chaos.py)")
    p.add_argument("--link", default=None, help="bandwidth between sites, e.g. 20mbit (with --sites)")
    p.add_argument("--rtt", default="50ms", help="round trip between sites, e.g. 100ms")
    p.add_argument("--sites", type=int, default=None, help="sites joined by --link")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shoal.config import ConfigError
    if args.config is None:
        if not args.calibrate:
            raise ConfigError("shoal plan needs a CONFIG (and --world N), or --calibrate alone")
        _calibrate(None)
        return 0
    if args.world is None:
        raise ConfigError("shoal plan CONFIG needs --world N (total workers)")
    if args.world < 1:
        raise ConfigError(f"--world {args.world} must be at least 1")
    if args.sites is not None and args.sites < 2:
        raise ConfigError(f"--sites {args.sites} must be at least 2")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every} must be at least 1")
    from shoal.plan.goodput import parse_duration, parse_rate
    from shoal.plan.report import plan_report
    # every option checked before anything is printed
    if args.mtbf:
        parse_duration(args.mtbf, "--mtbf")
    if args.link:
        parse_rate(args.link)
    parse_duration(args.rtt, "--rtt")
    return plan_report(args, _calibrate if args.calibrate else None)


def _calibrate(shapes_by_threads):
    from shoal.plan.calibrate import calibrate, save_calibration
    cal = calibrate(shapes_by_threads, say=lambda line: print(line, flush=True))
    path = save_calibration(cal)
    print(f"calibrated in {cal.seconds:.0f} s; cached in {path}")
    return cal
