"""Read this worker's place in the job from torchrun/elastic, SLURM or Kubernetes variables,
and start its process group.

torchrun (and `shoal run`/`shoal launch`, which use the same elastic agent) set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT and host the store in the agent. Under a
bare `srun`, SLURM's own SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are used and rank 0 hosts
the store. Kubernetes' PyTorchJob/TrainJob set the torchrun variables.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    agent_hosts_store: bool
    """True under an elastic agent (torchrun, shoal run/launch): the agent, not rank 0, owns the store."""


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def read_env(environ: dict[str, str] | None = None) -> WorkerEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return WorkerEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=int(env.get("MASTER_PORT", 29500)),
                         restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                         agent_hosts_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")
    if "SLURM_PROCID" in env:
        job = int(env.get("SLURM_JOB_ID", 0))
        return WorkerEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                         local_rank=int(env.get("SLURM_LOCALID", 0)),
                         local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
                         master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                         master_port=int(env.get("MASTER_PORT", 20000 + job % 10000)),
                         restart_count=int(env.get("SLURM_RESTART_COUNT", 0)), agent_hosts_store=False)
    return WorkerEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, restart_count=0, agent_hosts_store=False)


LOCAL_WORKERS_ENV = "SHOAL_LOCAL_WORKERS"
"""Workers that Shoal's own launchers (fault-tolerant supervisor, a joining host) run on this host."""


def thread_budget(configured: int = 0, environ: dict[str, str] | None = None) -> int:
    """Torch threads for this worker: `launch.threads` when set, else this host's usable cores
    shared among the workers on it, however the worker was started.

    Workers on a host come from Shoal's launchers (SHOAL_LOCAL_WORKERS), torchrun/elastic
    (LOCAL_WORLD_SIZE) or SLURM (SLURM_CPUS_PER_TASK gives the cores outright, else
    SLURM_NTASKS_PER_NODE shares them). Each worker taking every core would oversubscribe the
    host: spinning OpenMP threads of 4 workers on 2 cores made steps 20x slower here."""
    if configured:
        return configured
    env = os.environ if environ is None else environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    workers = 1
    for name in (LOCAL_WORKERS_ENV, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "").split("(")[0]  # SLURM writes '2(x3)' for 2 tasks on each of 3 nodes
        if value.isdigit() and int(value) > 0:
            workers = int(value)
            break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def die_with_launcher() -> None:
    """Under Shoal's launcher, end this worker when the launcher dies, even by SIGKILL.

    The elastic engine starts workers in sessions of their own, so a killed launcher would
    otherwise leave them training as orphans beside the run that replaces it.
    """
    launcher = os.environ.get("SHOAL_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(launcher):  # it died before the request was in place
        os._exit(1)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(worker: WorkerEnv, device: torch.device, backend: str = "auto",
                     timeout: timedelta = timedelta(minutes=5)) -> None:
    """Start the default process group; a single process runs without one."""
    if worker.world_size == 1 and worker.master_port == 0:
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore(worker.master_addr, worker.master_port, worker.world_size,
                          is_master=not worker.agent_hosts_store and worker.rank == 0, timeout=timeout)
    # A restarted attempt must not see the keys of the attempt before it (see TORCH_NOTES.md:
    # without this prefix Gloo connects to dead peers' addresses and hangs or is refused).
    store = dist.PrefixStore(f"shoal/attempt_{worker.restart_count}", store)
    dist.init_process_group(backend, store=store, rank=worker.rank, world_size=worker.world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
