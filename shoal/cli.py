"""The `shoal` command: run, launch, config, report, and the commands of plan/fed/netbed.

User mistakes (a bad config, a missing file, a busy port) end in one line,
`shoal: error: ...`, and exit code 2; a failed worker shows its own traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from shoal import config as config_module
from shoal.config import ConfigError

QUICKSTART = Path(__file__).parent / "examples" / "quickstart.toml"
# Commands that live with their feature; each module has register(subparsers).
FEATURE_COMMANDS = ("shoal.plan.cli", "shoal.federated.cli", "shoal.launch.netbed", "shoal.data.cli")


def _split_config(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the config is the first item that is not an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str], extra: list[str] | None = None) -> tuple[config_module.Config, str]:
    path, overrides = _split_config(items)
    path = path or str(QUICKSTART)
    return config_module.load(path, overrides + (extra or [])), path


def _check_before_launch(cfg: config_module.Config, world_size: int) -> None:
    """Checks that need the world size, done before any worker starts."""
    from shoal.runtime.mesh import ParallelDims
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    check_layout = getattr(importlib.import_module("shoal.parallel.compose"), "check_layout", None)
    if check_layout is not None:
        check_layout(cfg, world_size)
    if cfg.train.batch_size % (dims.dp * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} must divide into {dims.dp} data-parallel "
                          f"ranks x train.grad_accum = {cfg.train.grad_accum}")


def _prepare_run(cfg: config_module.Config, resume: str | None, *, exact_name: bool) -> Path:
    from shoal.data import check_data
    from shoal.observe import rundir
    check_data(cfg)  # shards, tokenizer, columns: before any worker starts
    if resume:
        run_dir, checkpoint = rundir.find_resume(cfg, resume)
        print(f"shoal: resuming {run_dir} from {checkpoint.name}", file=sys.stderr)
    else:
        run_dir = rundir.new_run_dir(cfg, exact=exact_name)
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    return run_dir


def _start(cfg: config_module.Config, run_dir: Path, args, rendezvous) -> int:
    from shoal.launch.local import WorkerFailure, launch_workers
    worker_args = [str(run_dir / "config.toml"), "--run-dir", str(run_dir)]
    if args.resume:
        worker_args += ["--resume", str(run_dir)]
    if args.verbose:
        worker_args.append("--verbose")
    if cfg.fault.enabled:  # per-step fault tolerance (shoal/launch/supervisor.py, docs/fault.md)
        from shoal.launch.supervisor import launch_fault_tolerant, per_step_unsupported
        if not rendezvous.is_host and not per_step_unsupported(cfg):  # a host adding workers to the job
            from shoal.launch.remote import join_fault_tolerant
            return join_fault_tolerant(cfg, worker_args, run_dir, rendezvous.endpoint, verbose=args.verbose)
        code = launch_fault_tolerant(cfg, worker_args, run_dir, chaos=args.chaos, verbose=args.verbose,
                                     rendezvous=rendezvous if args.command == "launch" else None)
        if code is not None:
            return code
    try:
        launch_workers(worker_args, nproc=cfg.launch.nproc, run_dir=run_dir, rendezvous=rendezvous,
                       max_restarts=cfg.launch.max_restarts, verbose=args.verbose)
    except WorkerFailure as failure:
        if failure.exitcode == 2:  # a user mistake found by a worker: its one-line error
            print(failure.message, file=sys.stderr)
            return 2
        print(f"shoal: worker rank {failure.rank} failed:\n{failure.message}", file=sys.stderr)
        return 1
    print(f"shoal: run directory {run_dir}", file=sys.stderr)
    return 0


def _resolve(args) -> config_module.Config | None:
    """The config of `run`/`launch` with --nproc applied; None once --print-config has printed it."""
    cfg, _ = _load(args.items, [f"launch.nproc={args.nproc}"] if args.nproc else [])
    if args.print_config:
        print(config_module.to_toml(cfg), end="")
        return None
    return cfg


def cmd_run(args) -> int:
    cfg = _resolve(args)
    if cfg is None:
        return 0
    per_step = False
    if cfg.fault.enabled or args.chaos:  # [fault] rules and the chaos spec, before anything starts
        from shoal.launch.supervisor import check_fault_tolerant
        per_step = check_fault_tolerant(cfg, cfg.launch.nproc, args.chaos)
        if per_step:
            from shoal.launch.supervisor import start_forkserver
            start_forkserver()  # workers' torch imports while this process does its own
    if not per_step:  # per-step replicas split any batch; the other layouts need it to divide
        _check_before_launch(cfg, cfg.launch.nproc)
    run_dir = _prepare_run(cfg, args.resume, exact_name=False)
    from shoal.launch.local import Rendezvous
    return _start(cfg, run_dir, args, Rendezvous(nnodes=1, timeout=cfg.launch.rdzv_timeout))


def cmd_launch(args) -> int:
    cfg = _resolve(args)
    if cfg is None:
        return 0
    per_step = False
    if cfg.fault.enabled or args.chaos:
        from shoal.launch.supervisor import check_fault_tolerant
        if cfg.fault.enabled and not cfg.fault.max_workers:  # room for every host's workers
            cfg.fault.max_workers = cfg.launch.nproc * args.nnodes
        per_step = check_fault_tolerant(cfg, cfg.launch.nproc, args.chaos)
        if args.chaos and args.node_rank:
            raise ConfigError("--chaos is given to node rank 0's launcher, which injects into its own workers")
    if not per_step:
        _check_before_launch(cfg, cfg.launch.nproc * args.nnodes)
    from shoal.launch.nodes import node_rendezvous
    rendezvous = node_rendezvous(args.rdzv, args.nnodes, args.node_rank, cfg.launch.rdzv_timeout,
                                 args.run_id or f"shoal-{cfg.log.name}")
    if per_step and not rendezvous.is_host:
        # Workers of this host join the running job and receive its state from a live peer; the
        # run directory (shared or not) holds their logs, and its checkpoints are the job's.
        args.resume = None
        run_dir = Path(cfg.log.dir) / cfg.log.name
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    else:
        run_dir = _prepare_run(cfg, args.resume, exact_name=True)
    return _start(cfg, run_dir, args, rendezvous)


def cmd_config(args) -> int:
    if args.markdown:
        print("# Configuration reference\n\nGenerated by `shoal config --markdown`. Every key can be set in "
              "the TOML file or on the command line as `section.key=value`.\n")
    print(config_module.reference(markdown=args.markdown), end="")
    return 0


def cmd_report(args) -> int:
    from shoal.observe.report import write_report
    try:
        summary, png = write_report(Path(args.run_dir))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    print((Path(args.run_dir) / "report.md").read_text())
    print(f"plot: {png}")
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]",
                        help="config file (default: the quickstart) and overrides")
    parser.add_argument("--nproc", type=int, help="worker processes on this host (launch.nproc)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                        help="continue the newest run of this name (or RUN_DIR) from its last checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="show every rank's output")
    parser.add_argument("--chaos", metavar="SPEC", help="inject failures with fault.enabled, e.g. "
                                                        "'kill=random,every=15s' (see docs/fault.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Distributed training for plain PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train on local worker processes",
                         description="Train on launch.nproc worker processes on this machine.")
    _run_arguments(run)
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="join a multi-host job (c10d rendezvous, torchrun-compatible)",
                            description="Run this host's workers of a job spread over --nnodes hosts. Start it "
                                        "on every host with the same --rdzv HOST:PORT (node rank 0's address).")
    _run_arguments(launch)
    launch.add_argument("--nnodes", type=int, required=True, help="hosts in the job")
    launch.add_argument("--node-rank", type=int, required=True, help="this host's rank; 0 hosts the rendezvous")
    launch.add_argument("--rdzv", required=True, metavar="HOST:PORT", help="node rank 0's address and a free port")
    launch.add_argument("--run-id", help="rendezvous id shared by the hosts (default: shoal-<log.name>)")
    launch.set_defaults(func=cmd_launch)

    cfg = sub.add_parser("config", help="list every config key with its default and meaning",
                         description="Every config key, its default and its meaning.",
                         epilog=config_module.reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_argument("--markdown", action="store_true", help="as a Markdown reference (docs/config.md)")
    cfg.set_defaults(func=cmd_config)

    report = sub.add_parser("report", help="plot and summarise a run directory")
    report.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    report.set_defaults(func=cmd_report)

    for module_name in FEATURE_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
