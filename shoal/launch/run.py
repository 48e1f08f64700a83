"""The start of a run, in one place: the config as the user gave it, the checks made before any
worker starts, the run directory, and which launcher starts the workers.

`shoal run` / `shoal launch` (shoal/cli.py), `shoal.train()` (shoal/api.py) and the cluster
renderers (shoal/launch/render/) call these; none of them reaches into another's private steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shoal import config as config_module
from shoal.config import USER_ERROR, Config

if TYPE_CHECKING:
    from shoal.launch.local import Rendezvous

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"


@dataclass
class Invocation:
    """What the user asked for, beyond the config: the command (`run` or `launch`) and its items
    (to print the command that continues a stopped run), `--resume`, `--verbose`, `--chaos`."""

    command: str = "run"
    items: list[str] = field(default_factory=list)
    resume: str | None = None
    verbose: bool = False
    chaos: str | None = None


def split_config(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the config is the first item that is not an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def load_config(items: list[str], extra: list[str] | None = None) -> tuple[Config, str]:
    """The config of `[CONFIG] [key=value ...]` (the quickstart when no file is named), with
    `extra` overrides after the user's; (config, the file it came from)."""
    path, overrides = split_config(items)
    path = path or str(QUICKSTART)
    return config_module.load(path, overrides + (extra or [])), path


def check_before_launch(cfg: Config, world_size: int) -> None:
    """Checks that need the world size, done before any worker starts; under `parallel.auto` the
    planner's layout replaces the configured degrees first (shoal/plan/auto.py)."""
    from shoal.parallel.compose import check_layout
    if cfg.parallel.auto:
        from shoal.plan.auto import choose_layout
        choice = choose_layout(cfg, world_size)
        for axis, degree in choice.degrees.items():
            setattr(cfg.parallel, axis, degree)
        print(f"shoal: parallel.auto chose {choice.row}; {choice.reason}", file=sys.stderr)
    check_layout(cfg, world_size)


def check_run(cfg: Config, world_size: int, chaos: str | None = None) -> bool:
    """Every check made before a run starts on `world_size` workers: the [fault] rules (for this
    host's `launch.nproc` workers) and the chaos spec when asked for, then the layout. True when
    the run is per-step fault tolerant (its replicas split any batch, so the layout's
    divisibility is not asked of them)."""
    per_step = False
    if cfg.selfplay.game:  # a learner beside actor processes (shoal/launch/actors.py)
        check_selfplay(cfg, chaos)
        return False
    if cfg.fault.enabled or chaos:
        from shoal.launch.supervisor import check_fault_tolerant
        per_step = check_fault_tolerant(cfg, cfg.launch.nproc, chaos)
    if not per_step:
        check_before_launch(cfg, world_size)
    elif cfg.parallel.auto:
        from shoal.config import ConfigError
        raise ConfigError("parallel.auto = true: per-step fault tolerance trains data-parallel replicas only; "
                          "set parallel.auto = false (or fault.enabled = false)")
    return per_step


def check_selfplay(cfg: Config, chaos: str | None) -> None:
    """A self-play run's checks before it starts: the game exists; chaos is not for it."""
    from shoal.config import ConfigError
    from shoal.selfplay.setup import load_game
    if chaos:
        raise ConfigError("--chaos injects failures into per-step fault tolerance's workers; a self-play run's "
                          "actors are replaced under fault.enabled = true (kill one to see it)")
    load_game(cfg.selfplay.game)


def prepare_run_dir(cfg: Config, resume: str | None, *, exact_name: bool) -> Path:
    """The run directory (a new one, or the one `resume` names) with the config written in it;
    the data is checked first (shards, tokenizer, columns), before any worker starts."""
    from shoal.data import check_data
    from shoal.observe import rundir
    check_data(cfg)
    if resume:
        run_dir, checkpoint = rundir.find_resume(cfg, resume)
        print(f"shoal: resuming {run_dir} from {checkpoint.name}", file=sys.stderr)
    else:
        run_dir = rundir.new_run_dir(cfg, exact=exact_name)
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    return run_dir


def start_workers(cfg: Config, run_dir: Path, invocation: Invocation, rendezvous) -> int:
    """Start this host's workers with the launcher the config asks for (per-step fault tolerant,
    joining a running fault-tolerant job, or torch's elastic agent) and wait; the exit code."""
    worker_args = [str(run_dir / "config.toml"), "--run-dir", str(run_dir)]
    if invocation.resume:
        worker_args += ["--resume", str(run_dir)]
    if invocation.verbose:
        worker_args.append("--verbose")
    if not cfg.selfplay.game:
        return _launch(cfg, worker_args, run_dir, invocation, rendezvous)
    from shoal.launch.actors import run_actor_host, start_actors
    from shoal.launch.local import Rendezvous
    from shoal.runtime.env import launcher_environment
    from shoal.runtime.protocol import LOCAL_WORKERS_ENV
    if not rendezvous.is_host:  # a host that adds actors to the running job (shoal/selfplay/relay.py)
        return run_actor_host(cfg, worker_args, run_dir, rendezvous.endpoint, verbose=invocation.verbose)
    # actors and an evaluator beside the learner ranks (shoal/launch/actors.py); with --nnodes > 1
    # the --rdzv port is the store other hosts' actors join through, and the learner stays on this host
    pool = start_actors(cfg, worker_args, run_dir, rendezvous=rendezvous, verbose=invocation.verbose)
    if rendezvous.nnodes > 1:
        rendezvous = Rendezvous(nnodes=1, timeout=rendezvous.timeout)
    try:
        with launcher_environment(**{LOCAL_WORKERS_ENV: str(pool.processes)}):  # the learner's share of the cores
            return _launch(cfg, worker_args, run_dir, invocation, rendezvous)
    finally:
        pool.stop()


def _launch(cfg: Config, worker_args: list[str], run_dir: Path, invocation: Invocation, rendezvous) -> int:
    from shoal.runtime.protocol import PREEMPTED_CODES
    from shoal.launch.local import Stopped, WorkerFailure, launch_workers
    if cfg.fault.enabled and not cfg.selfplay.game:  # per-step fault tolerance (shoal/launch/supervisor.py)
        from shoal.config import per_step_unsupported
        from shoal.launch.supervisor import launch_fault_tolerant
        if not rendezvous.is_host and not per_step_unsupported(cfg):  # a host adding workers to the job
            from shoal.launch.remote import join_fault_tolerant
            return join_fault_tolerant(cfg, worker_args, run_dir, rendezvous.endpoint, verbose=invocation.verbose)
        code = launch_fault_tolerant(cfg, worker_args, run_dir, chaos=invocation.chaos, verbose=invocation.verbose,
                                     rendezvous=rendezvous if invocation.command == "launch" else None)
        if code is not None:
            return code
    try:
        # a self-play learner under fault.enabled is restarted from its checkpoint (shoal/selfplay/learner.py)
        restarts = cfg.fault.max_restarts if cfg.selfplay.game and cfg.fault.enabled else cfg.launch.max_restarts
        launch_workers(worker_args, nproc=cfg.launch.nproc, run_dir=run_dir, rendezvous=rendezvous,
                       max_restarts=restarts, verbose=invocation.verbose,
                       grace_seconds=cfg.fault.grace_seconds)
    except Stopped as stopped:  # SIGTERM/SIGINT/SIGUSR1 to the launcher, forwarded to every worker
        return say_stopped(cfg, stopped.signum, run_dir, invocation)
    except WorkerFailure as failure:
        if failure.exitcode == USER_ERROR:  # a user mistake found by a worker: its one-line error
            print(failure.message, file=sys.stderr)
            return USER_ERROR
        if failure.exitcode in PREEMPTED_CODES:  # the signal reached the workers, not this process
            return say_stopped(cfg, failure.exitcode - 128, run_dir, invocation)
        print(f"shoal: worker rank {failure.rank} failed:\n{failure.message}", file=sys.stderr)
        return 1
    print(f"shoal: run directory {run_dir}", file=sys.stderr)
    return 0


def say_stopped(cfg: Config, signum: int, run_dir: Path, invocation: Invocation) -> int:
    """One line after a preemption: where the checkpoint is and the command that continues."""
    import signal as signals
    from shoal.runtime.checkpoint import latest_checkpoint
    from shoal.observe.rundir import checkpoint_folder
    checkpoint = latest_checkpoint(checkpoint_folder(cfg, run_dir))
    where = f"checkpoint {checkpoint.name}" if checkpoint else "no checkpoint was completed"
    again = " ".join(["shoal", invocation.command, *invocation.items, "--resume", str(run_dir)])
    print(f"shoal: stopped by {signals.Signals(signum).name} ({where}); continue with: {again}", file=sys.stderr)
    return 128 + signum


def start_local(cfg: Config, invocation: Invocation) -> tuple[int, Path]:
    """A run on this machine's workers, as `shoal run` and `shoal.train()` start it: checks, run
    directory, launcher; (exit code, run directory)."""
    if check_run(cfg, cfg.launch.nproc, invocation.chaos):
        from shoal.launch.workers import start_forkserver
        start_forkserver()  # workers' torch imports while this process does its own
    rendezvous = local_rendezvous(cfg)
    run_dir = prepare_run_dir(cfg, invocation.resume, exact_name=False)
    return start_workers(cfg, run_dir, invocation, rendezvous), run_dir


def local_rendezvous(cfg: Config) -> Rendezvous:
    """One host's rendezvous: loopback, or for a site its `sites.internal` address (the site's own
    network), where the launcher's store and the workers' Gloo listen and nowhere else
    (shoal/launch/bound.py). An address this host cannot listen on is refused here, naming the field."""
    from shoal.launch.bound import listen_on
    from shoal.launch.local import Rendezvous
    if not cfg.sites.name:
        return Rendezvous(nnodes=1, timeout=cfg.launch.rdzv_timeout)
    host = cfg.sites.internal
    listen_on(host, 0, field="sites.internal").close()  # before a run directory is made
    endpoint = f"[{host}]:0" if ":" in host else f"{host}:0"
    return Rendezvous(nnodes=1, timeout=cfg.launch.rdzv_timeout, endpoint=endpoint, field="sites.internal")


def start_on_ray(cfg: Config, address: str | None, resume: str | None) -> tuple[int, Path]:
    """`shoal run --ray` and `shoal.train(ray=...)`: checks, run directory, Ray Train; (exit code, run dir)."""
    from shoal.launch.ray import check_ray, run_on_ray
    check_ray(cfg, address)  # Ray is there and answers, before a run directory is made
    check_before_launch(cfg, cfg.launch.nproc)
    run_dir = prepare_run_dir(cfg, resume, exact_name=False)
    return run_on_ray(cfg, run_dir, address=address, resume=bool(resume)), run_dir
