"""Read this worker's (or this host's) place in the job from the variables of whatever started
it, and start its process group.

torchrun (and `shoal run`/`shoal launch`, which use the same elastic agent) set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT and host the store in the agent; Ray Train
sets the same names and has already initialised the process group, which is adopted. Under a
bare `srun`, SLURM's own SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are used and rank 0 hosts
the store. One worker per host also runs from Kubeflow's PET_* variables (TrainJob,
PyTorchJob) or SkyPilot's SKYPILOT_* ones; `node_place` reads the same variables for
`shoal launch`, which starts several workers per host.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shoal.config import ConfigError
from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from shoal.runtime.protocol import LAUNCHER_PID_ENV, LOCAL_WORKERS_ENV


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


# What Kubeflow's TrainJob (torch runtime) and PyTorchJob inject into every pod, as torchrun reads them.
PET_VARIABLES = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# SkyPilot sets no port: the rendezvous uses this one unless MASTER_PORT says otherwise.
SKYPILOT_DEFAULT_PORT = 29400


@dataclass(frozen=True, kw_only=True)
class NodePlace:
    """One host's place in a multi-host job, as `shoal launch --nnodes --node-rank --rdzv` take it."""

    nnodes: int
    node_rank: int
    rdzv: str
    """host:port of node rank 0's rendezvous."""
    nproc: int | None
    """Workers per host when the cluster says so (PET_NPROC_PER_NODE), else None."""
    source: str
    """Which variables it came from, for messages: 'PET_*' or 'SKYPILOT_*'."""


def _integer(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not a whole number") from None


def node_place(environ: dict[str, str] | None = None) -> NodePlace | None:
    """This host's place from Kubeflow's PET_* or SkyPilot's SKYPILOT_* variables; None when
    neither set is present. A PET_* set missing one variable is an error naming it."""
    env = os.environ if environ is None else environ
    present = [name for name in PET_VARIABLES if name in env]
    if present:
        missing = [name for name in PET_VARIABLES if name not in env]
        if missing:
            raise ConfigError(f"{missing[0]} is not set, but {present[0]} is: a Kubeflow TrainJob or PyTorchJob "
                              f"sets all of {', '.join(PET_VARIABLES)}")
        nproc = env["PET_NPROC_PER_NODE"]
        # torchrun also takes 'auto'/'gpu'/'cpu' here; Shoal then keeps launch.nproc.
        return NodePlace(nnodes=_integer(env, "PET_NNODES"), node_rank=_integer(env, "PET_NODE_RANK"),
                         rdzv=f"{env['PET_MASTER_ADDR']}:{_integer(env, 'PET_MASTER_PORT')}",
                         nproc=int(nproc) if nproc.isdigit() else None, source="PET_*")
    if "SKYPILOT_NODE_RANK" in env:
        for name in ("SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES"):
            if name not in env:
                raise ConfigError(f"{name} is not set, but SKYPILOT_NODE_RANK is: SkyPilot sets SKYPILOT_NODE_RANK, "
                                  f"SKYPILOT_NODE_IPS and SKYPILOT_NUM_NODES on every node")
        ips = env["SKYPILOT_NODE_IPS"].split()
        if not ips:
            raise ConfigError("SKYPILOT_NODE_IPS is empty: it lists the job's node addresses, head first")
        port = _integer(env, "MASTER_PORT") if "MASTER_PORT" in env else SKYPILOT_DEFAULT_PORT
        return NodePlace(nnodes=_integer(env, "SKYPILOT_NUM_NODES"), node_rank=_integer(env, "SKYPILOT_NODE_RANK"),
                         rdzv=f"{ips[0]}:{port}", nproc=None, source="SKYPILOT_*")
    return None


def read_env(environ: dict[str, str] | None = None) -> WorkerEnv:
    env = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():  # Ray Train (or a user's script) made the group already
        return WorkerEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 0)),
                         restart_count=0, agent_hosts_store=False)
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
    place = node_place(env)
    if place is not None:  # one worker per host, started straight from the cluster's variables
        if place.nproc not in (None, 1):
            raise ConfigError(f"PET_NPROC_PER_NODE={place.nproc}: several workers per host need a launcher; run "
                              f"`shoal launch CONFIG` in the container instead of `python -m shoal.worker`")
        host, _, port = place.rdzv.rpartition(":")
        return WorkerEnv(rank=place.node_rank, world_size=place.nnodes, local_rank=0, local_world_size=1,
                         master_addr=host, master_port=int(port), restart_count=0, agent_hosts_store=False)
    return WorkerEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, restart_count=0, agent_hosts_store=False)


def thread_budget(configured: int = 0, environ: dict[str, str] | None = None, loader_workers: int = 0) -> int:
    """Torch threads for this worker: `launch.threads` when set, else this host's usable cores
    shared among the workers on it, however the worker was started, less one core for each of
    its data-loader processes (`data.loader_workers`; they decode and augment while it computes).

    Workers on a host come from Shoal's launchers (SHOAL_LOCAL_WORKERS), torchrun/elastic
    (LOCAL_WORLD_SIZE) or SLURM (SLURM_CPUS_PER_TASK gives the cores outright, else
    SLURM_NTASKS_PER_NODE shares them). Each worker taking every core would oversubscribe the
    host: spinning OpenMP threads of 4 workers on 2 cores made steps 20x slower here."""
    if configured:
        return configured
    env = os.environ if environ is None else environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]) - loader_workers)
    workers = 1
    for name in (LOCAL_WORKERS_ENV, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "").split("(")[0]  # SLURM writes '2(x3)' for 2 tasks on each of 3 nodes
        if value.isdigit() and int(value) > 0:
            workers = int(value)
            break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers - loader_workers)


@contextlib.contextmanager
def launcher_environment(**values: str):
    """Set variables that workers started inside the block inherit (SHOAL_LAUNCHER_PID, ...), and
    give the caller its own environment back afterwards: a Python API caller, or a test, that
    launches workers and later starts a job of another kind must not pass these on to it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def die_with_launcher() -> None:
    """Under Shoal's launcher, end this worker when the launcher dies, even by SIGKILL.

    The elastic engine starts workers in sessions of their own, so a killed launcher would
    otherwise leave them training as orphans beside the run that replaces it.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
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


def end_distributed(*ddp_modules: torch.nn.Module | None) -> None:
    """Destroy every process group now, their Gloo threads with them (docs/torch.md).

    A Gloo thread that finished a collective may need the GIL to drop that collective's
    tensors. A group freed from C++ with the GIL held (DDP's Reducer holds its group; so
    does the registry `destroy_process_group` clears last) waits for that thread while
    holding what it needs: the worker hangs at exit. A group freed during interpreter
    shutdown aborts the process instead. So the Reducers of `ddp_modules` let go first,
    and the last reference to each group is a Python one, dropped here: a group freed from
    Python releases the GIL while its threads end.

    A DeviceMesh holds its groups too, and DTensor's caches (sharding propagation, redistribute
    plans) hold every mesh FSDP or tensor parallelism used for the rest of the process: those
    groups would outlive destroy_process_group and be freed at exit. Each live mesh lets go of them.
    """
    for module in ddp_modules:
        if module is not None and hasattr(module, "reducer"):
            module.logger = None  # holds the Reducer
            module.reducer = None
    if not dist.is_initialized():
        return
    groups = list(dist.distributed_c10d._world.pg_map)  # private in torch 2.13: every live group
    groups += _groups_meshes_held()
    dist.destroy_process_group()
    groups.clear()


def _groups_meshes_held() -> list[dist.ProcessGroup]:
    """Empty every live DeviceMesh's group registry (its root's `_pg_registry`, private in torch
    2.13) and return what it held."""
    from torch.distributed.device_mesh import DeviceMesh
    held = []
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):
            registry = getattr(obj, "_pg_registry", None)
            if registry:
                held += registry.values()
                registry.clear()
    return held


def init_distributed(worker: WorkerEnv, device: torch.device, backend: str = "auto",
                     timeout: timedelta = timedelta(minutes=5)) -> None:
    """Start the default process group; a single process runs without one, and one that Ray
    Train (or the caller) already started is used as it is."""
    if dist.is_initialized():
        return
    if worker.world_size == 1 and worker.master_port == 0:
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore(worker.master_addr, worker.master_port, worker.world_size,
                          is_master=not worker.agent_hosts_store and worker.rank == 0, timeout=timeout)
    # A restarted attempt must not see the keys of the attempt before it (docs/torch.md:
    # without this prefix Gloo connects to dead peers' addresses and hangs or is refused).
    store = dist.PrefixStore(f"shoal/attempt_{worker.restart_count}", store)
    dist.init_process_group(backend, store=store, rank=worker.rank, world_size=worker.world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
