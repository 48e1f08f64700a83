"""Start the workers of this host with torch.distributed.elastic, the engine behind torchrun.

Local rank 0's standard output is the user's terminal (so its progress bar is live); its
standard error and all output of the other ranks go to files under `<run dir>/logs/workers/`
unless --verbose. When a worker fails, the user sees that rank's own traceback once, not
the launcher's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig as ElasticLaunchConfig, elastic_launch

from shoal.config import USER_ERROR
from shoal.launch.bound import BACKEND, BoundStore
from shoal.runtime.env import launcher_environment
from shoal.runtime.protocol import ELASTIC_SIGNALS, LAUNCHER_PID_ENV


@dataclass(kw_only=True)
class Rendezvous:
    """How the hosts of one job find each other (c10d rendezvous, as torchrun's --rdzv-*)."""

    nnodes: int = 1
    endpoint: str = "127.0.0.1:0"
    """host:port of the store; port 0 on a single host means any free port."""
    is_host: bool = True
    """This host runs the rendezvous store (node rank 0)."""
    run_id: str = ""
    timeout: int = 60
    local_addr: str | None = None
    """The address other hosts reach this one at; None on a single host."""
    field: str = "launch"
    """The setting `endpoint`'s host comes from, named when this host cannot listen there."""


class WorkerFailure(RuntimeError):
    """A worker process failed; `message` holds its own traceback."""

    def __init__(self, rank: int, exitcode: int, message: str):
        super().__init__(message)
        self.rank, self.exitcode, self.message = rank, exitcode, message


class Stopped(RuntimeError):
    """The launcher received a stop signal; it forwarded it to the workers, which saved a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def launch_workers(worker_args: list[str], *, nproc: int, run_dir: Path, rendezvous: Rendezvous,
                   max_restarts: int = 0, verbose: bool = False, grace_seconds: float = 25) -> None:
    """Run `python -m shoal.worker <worker_args>` on `nproc` local processes until they finish.

    A stop signal (SIGTERM, SIGINT, SIGUSR1, ...) to this process is forwarded to the workers, which
    stop at the next step with a checkpoint (shoal/runtime/preempt.py); after `grace_seconds` the
    agent kills them. It then raises `Stopped`."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    quiet = {local_rank: Std.ALL if local_rank else Std.ERR for local_rank in range(nproc)}
    logs = DefaultLogsSpecs(log_dir=str(Path(run_dir) / "logs" / "workers"),
                            redirects=Std.NONE if verbose else quiet)
    bound = None
    if rendezvous.nnodes == 1 and rendezvous.is_host:
        # One host: its store and Gloo listen on the rendezvous address only (shoal/launch/bound.py).
        host, _, port = rendezvous.endpoint.rpartition(":")
        bound = BoundStore(host.strip("[]"), int(port or 0), field=rendezvous.field, timeout=rendezvous.timeout)
        rendezvous = dataclasses.replace(rendezvous, endpoint=bound.endpoint, local_addr=bound.host)
    config = ElasticLaunchConfig(
        min_nodes=rendezvous.nnodes, max_nodes=rendezvous.nnodes, nproc_per_node=nproc, logs_specs=logs,
        run_id=rendezvous.run_id or uuid.uuid4().hex[:12], rdzv_backend=BACKEND if bound else "c10d",
        rdzv_endpoint=rendezvous.endpoint,
        rdzv_configs={"is_host": rendezvous.is_host, "join_timeout": rendezvous.timeout,
                      "read_timeout": rendezvous.timeout, "timeout": rendezvous.timeout},
        max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn", local_addr=rendezvous.local_addr,
        shutdown_timeout=max(1, int(grace_seconds)))
    # Workers end with this process; SLURM's --signal sends SIGUSR1, which the agent must forward too.
    try:
        with launcher_environment(**{LAUNCHER_PID_ENV: str(os.getpid()), "TORCHELASTIC_SIGNALS_TO_HANDLE": ELASTIC_SIGNALS},
                                  **(bound.gloo_environment() if bound else {})):
            elastic_launch(config, sys.executable)("-u", "-m", "shoal.worker", *worker_args)
    except SignalException as err:
        raise Stopped(int(err.sigval)) from None
    except ChildFailedError as err:
        # A user mistake one worker found (exit code 2; a pipeline's last stage checks the loss) ends
        # its peers too, with a broken connection, perhaps first: its one line is the cause to show.
        mistakes = sorted((rank, f) for rank, f in err.failures.items() if f.exitcode == USER_ERROR)
        rank, failure = mistakes[0] if mistakes else err.get_first_failure()
        raise WorkerFailure(rank, failure.exitcode, _failure_text(failure, Path(run_dir))) from None
    finally:
        if bound is not None:
            bound.close()


def _failure_text(failure, run_dir: Path) -> str:
    if failure.exitcode == USER_ERROR:  # a user mistake the worker found: its one-line error
        for log in sorted((run_dir / "logs" / "workers").rglob("stderr.log")):
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("shoal: error:")]
            if lines:
                return lines[-1]
    data = failure.error_file_data.get("message", {}) if isinstance(failure.error_file_data, dict) else {}
    if isinstance(data, dict) and data.get("extraInfo", {}).get("py_callstack"):
        return data["extraInfo"]["py_callstack"].rstrip()
    if failure.exitcode < 0:
        return f"killed by signal {-failure.exitcode}"
    return f"exited with code {failure.exitcode} (see its log under logs/workers/)"
