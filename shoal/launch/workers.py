"""The worker processes of Shoal's fault-tolerant launchers (shoal/launch/supervisor.py on node
rank 0, shoal/launch/remote.py on a joining host): their environment, how they start, how they
are stopped, and what to show when one fails.

Workers are forked from a forkserver that has imported torch and shoal once: on a busy
machine importing torch takes seconds, and a replacement that starts in milliseconds rejoins
while the survivors are still close to the step where its predecessor died.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

from shoal.runtime.protocol import (INCARNATION_ENV, LAUNCHER_PID_ENV, LOCAL_WORKERS_ENV, MEMBER_ENV, SLOT_ENV,
                                     STORE_ENV)

RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        LAUNCHER_PID_ENV)
"""A launcher's own rendezvous variables: a fault-tolerant worker's peers come from the store instead."""


def worker_env(*, store: str, member: int, slot: int, incarnation: int, local_workers: int,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fault-tolerant worker: this launcher's, less its rendezvous variables,
    plus where the job's store is, which member and slot the worker is, and how many workers
    share this host's cores (shoal/runtime/env.py's thread budget)."""
    env = {name: value for name, value in os.environ.items() if name not in RENDEZVOUS_VARIABLES}
    env.update(extra or {})
    env.update({STORE_ENV: store, MEMBER_ENV: str(member), SLOT_ENV: str(slot),
                INCARNATION_ENV: str(incarnation), LOCAL_WORKERS_ENV: str(local_workers)})
    return env


def _worker_main(argv: list[str], env: dict[str, str], log_path: str | None) -> None:
    """Entry of a forked worker: its own environment and output file, then `shoal.worker`."""
    os.environ.clear()
    os.environ.update(env)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    from shoal.worker import main
    sys.exit(main(argv))


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start (once) the process workers fork from; it imports torch and shoal meanwhile."""
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo is imported lazily by the first optimizer a worker builds, for seconds
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "torch.distributed.checkpoint",
                                "shoal.worker", "shoal.fault.elastic",
                                "shoal.parallel.activation", "shoal.parallel.compile", "shoal.models.mlp",
                                "shoal.models.gpt"])
    from multiprocessing import forkserver
    forkserver.ensure_running()
    return ctx


def spawn(ctx: multiprocessing.context.BaseContext, worker_args: list[str], env: dict[str, str],
          log: Path | None) -> multiprocessing.process.BaseProcess:
    """Start `shoal.worker WORKER_ARGS` with `env`, its output in `log` (None: the console)."""
    proc = ctx.Process(target=_worker_main, args=(worker_args, env, str(log) if log else None), daemon=False)
    proc.start()
    return proc


def kill(proc: multiprocessing.process.BaseProcess) -> bool:
    """SIGKILL a worker and wait for it; False when it had already exited."""
    if proc.exitcode is not None:
        return False
    try:
        os.kill(proc.pid, signal.SIGCONT)  # a stopped (hung, or paused by chaos) worker must wake to die
        proc.kill()
    except ProcessLookupError:
        pass  # it exited meanwhile
    proc.join()
    return True


def worker_failure_text(log: Path | None, lines: int = 30) -> str:
    """What to show of a failed worker: its one-line `shoal: error:` if it wrote one, else the
    end of its log."""
    if log is None or not log.is_file():
        return "(output shown above)"
    text = log.read_text(errors="replace").splitlines()
    errors = [line for line in text if line.startswith("shoal: error:")]
    return errors[-1] if errors else "\n".join(text[-lines:])
