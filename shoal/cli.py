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
from shoal.config import USER_ERROR, ConfigError

QUICKSTART = Path(__file__).parent / "examples" / "quickstart.toml"
# Commands that live with their feature; each module has register(subparsers).
FEATURE_COMMANDS = ("shoal.plan.cli", "shoal.federated.cli", "shoal.launch.netbed", "shoal.data.cli",
                    "shoal.export.cli", "shoal.launch.render", "shoal.sites.cli")


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
    from shoal.parallel.compose import check_layout
    check_layout(cfg, world_size)


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
    from shoal.fault.preempt import PREEMPTED_CODES
    from shoal.launch.local import Stopped, WorkerFailure, launch_workers
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
                       max_restarts=cfg.launch.max_restarts, verbose=args.verbose,
                       grace_seconds=cfg.fault.grace_seconds)
    except Stopped as stopped:  # SIGTERM/SIGINT/SIGUSR1 to the launcher, forwarded to every worker
        return _say_stopped(cfg, stopped.signum, run_dir, args)
    except WorkerFailure as failure:
        if failure.exitcode == USER_ERROR:  # a user mistake found by a worker: its one-line error
            print(failure.message, file=sys.stderr)
            return USER_ERROR
        if failure.exitcode in PREEMPTED_CODES:  # the signal reached the workers, not this process
            return _say_stopped(cfg, failure.exitcode - 128, run_dir, args)
        print(f"shoal: worker rank {failure.rank} failed:\n{failure.message}", file=sys.stderr)
        return 1
    print(f"shoal: run directory {run_dir}", file=sys.stderr)
    return 0


def _say_stopped(cfg: config_module.Config, signum: int, run_dir: Path, args) -> int:
    """One line after a preemption: where the checkpoint is and the command that continues."""
    import signal as signals
    from shoal.fault.checkpoint import latest_checkpoint
    from shoal.observe.rundir import checkpoint_folder
    checkpoint = latest_checkpoint(checkpoint_folder(cfg, run_dir))
    where = f"checkpoint {checkpoint.name}" if checkpoint else "no checkpoint was completed"
    again = " ".join(["shoal", args.command, *args.items, "--resume", str(run_dir)])
    print(f"shoal: stopped by {signals.Signals(signum).name} ({where}); continue with: {again}", file=sys.stderr)
    return 128 + signum


def _resolve(args) -> config_module.Config | None:
    """The config of `run`/`launch` with --nproc applied; None once --print-config has printed it."""
    cfg, _ = _load(args.items, [f"launch.nproc={args.nproc}"] if args.nproc else [])
    if args.print_config:
        print(config_module.to_toml(cfg), end="")
        return None
    return cfg


def _ray_value_is_config(args) -> None:
    """`--ray` takes an optional ADDRESS; a config file or an override written after it is not one."""
    if args.ray and ("=" in args.ray or args.ray.endswith(".toml")):
        position = 1 if args.items and "=" not in args.items[0] and "=" in args.ray else 0
        args.items.insert(position, args.ray)
        args.ray = ""


def _start_on_ray(cfg: config_module.Config, address: str | None, resume: str | None) -> tuple[int, Path]:
    """`shoal run --ray` and `shoal.train(ray=...)`: checks, run directory, Ray Train; (exit code, run dir)."""
    from shoal.launch.ray import check_ray, run_on_ray
    check_ray(cfg, address)  # Ray is there and answers, before a run directory is made
    _check_before_launch(cfg, cfg.launch.nproc)
    run_dir = _prepare_run(cfg, resume, exact_name=False)
    return run_on_ray(cfg, run_dir, address=address, resume=bool(resume)), run_dir


def cmd_run(args) -> int:
    _ray_value_is_config(args)
    cfg = _resolve(args)
    if cfg is None:
        return 0
    if args.ray is not None:  # the same workers on a Ray cluster (shoal/launch/ray.py, docs/clusters.md)
        if args.chaos:
            raise ConfigError("--chaos injects failures into Shoal's own launcher; under --ray, Ray Train owns the "
                              "workers")
        return _start_on_ray(cfg, args.ray or None, args.resume)[0]
    per_step = False
    if cfg.fault.enabled or args.chaos:  # [fault] rules and the chaos spec, before anything starts
        from shoal.launch.supervisor import check_fault_tolerant
        per_step = check_fault_tolerant(cfg, cfg.launch.nproc, args.chaos)
        if per_step:
            from shoal.launch.workers import start_forkserver
            start_forkserver()  # workers' torch imports while this process does its own
    if not per_step:  # per-step replicas split any batch; the other layouts need it to divide
        _check_before_launch(cfg, cfg.launch.nproc)
    run_dir = _prepare_run(cfg, args.resume, exact_name=False)
    from shoal.launch.local import Rendezvous
    return _start(cfg, run_dir, args, Rendezvous(nnodes=1, timeout=cfg.launch.rdzv_timeout))


def _place_from_cluster(args) -> None:
    """Fill --nnodes/--node-rank/--rdzv (and --nproc) from a cluster's variables (Kubeflow PET_*,
    SkyPilot SKYPILOT_*) where the command line leaves them out."""
    from shoal.runtime.env import node_place
    place = node_place()
    if place is None:
        missing = [flag for flag, value in (("--nnodes", args.nnodes), ("--node-rank", args.node_rank),
                                            ("--rdzv", args.rdzv)) if value is None]
        if missing:
            raise ConfigError(f"shoal launch needs {', '.join(missing)} (or the PET_* variables of a Kubeflow "
                              f"TrainJob, or SkyPilot's SKYPILOT_* variables)")
        return
    args.nnodes = place.nnodes if args.nnodes is None else args.nnodes
    args.node_rank = place.node_rank if args.node_rank is None else args.node_rank
    args.rdzv = place.rdzv if args.rdzv is None else args.rdzv
    if place.nproc and not args.nproc:
        args.nproc = place.nproc


def cmd_launch(args) -> int:
    _place_from_cluster(args)
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


def _ray_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run the workers on a Ray cluster at ADDRESS (ray://HOST:PORT or HOST:PORT); "
                             "without ADDRESS, on a local Ray started for this run (docs/clusters.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Distributed training for plain PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train on local worker processes",
                         description="Train on launch.nproc worker processes on this machine.")
    _run_arguments(run)
    _ray_argument(run)
    run.set_defaults(func=cmd_run)

    launch = sub.add_parser("launch", help="join a multi-host job (c10d rendezvous, torchrun-compatible)",
                            description="Run this host's workers of a job spread over --nnodes hosts. Start it "
                                        "on every host with the same --rdzv HOST:PORT (node rank 0's address). "
                                        "Under a Kubeflow TrainJob/PyTorchJob (PET_*) or SkyPilot (SKYPILOT_*) "
                                        "the three flags come from the cluster's variables.")
    _run_arguments(launch)
    launch.add_argument("--nnodes", type=int, help="hosts in the job")
    launch.add_argument("--node-rank", type=int, help="this host's rank; 0 hosts the rendezvous")
    launch.add_argument("--rdzv", metavar="HOST:PORT", help="node rank 0's address and a free port")
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
        return USER_ERROR
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
