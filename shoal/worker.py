"""One training worker: the process that `shoal run`, `shoal launch`, torchrun or srun start.

    torchrun --nproc-per-node 2 -m shoal.worker CONFIG.toml [section.key=value ...]

Reads its place in the job, joins the process group, builds mesh, model, parallel layout
and data, and hands them to the Trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
import gc
import logging
import os
import resource
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from shoal import config as config_module
from shoal.config import USER_ERROR, Config, ConfigError, rank_seed
from shoal.data import build_dataset
from shoal.data.sampler import place_in_sites
from shoal.fault.elastic import Replicas
from shoal.fault.exits import replica_exits
from shoal.fault.host import TrainerHost
from shoal.models import build_model
from shoal.models.hf_weights import tied_aliases
from shoal.observe import rundir
from shoal.observe.metrics import drop_records_after
from shoal.observe.timing import CommTimer
from shoal.runtime import preempt
from shoal.runtime.checkpoint import Checkpointer, latest_checkpoint
from shoal.runtime.protocol import SAMPLE_LOG_ENV, STORE_ENV, preempted_exit_code
from shoal.parallel.compose import parallelize
from shoal.runtime.env import (WorkerEnv, die_with_launcher, end_distributed, init_distributed, pick_device,
                               read_env, thread_budget)
from shoal.runtime.mesh import ParallelDims
from shoal.sites import site_index, sites_outer_sync
from shoal.sync import OUTER_SYNC_METHODS, comm_hook_for, outer_sync_for
from shoal.train import Placement, Trainer

log = logging.getLogger("shoal")


def prepare_run_dir(cfg: Config, worker: WorkerEnv, run_dir: str | None) -> Path:
    """Use the launcher's run directory, or (under plain torchrun/srun) let rank 0 make one."""
    if run_dir:
        path = Path(run_dir)
    else:
        holder = [None]
        if worker.rank == 0:
            path = rundir.new_run_dir(cfg)
            (path / "config.toml").write_text(config_module.to_toml(cfg))
            holder = [str(path)]
        if dist.is_initialized():
            dist.broadcast_object_list(holder, src=0)  # a path string between trusted ranks of one job
        path = Path(holder[0])
    return path


@dataclass
class Worker:
    """One worker, built and ready to train."""

    cfg: Config
    trainer: Trainer
    model: nn.Module
    """The unwrapped model (an outer sync wraps it)."""
    run_dir: Path
    replicas: Replicas | None
    """This worker's membership under per-step fault tolerance; None for the layout's own DDP/FSDP."""
    replica_group: dist.ProcessGroup | None
    """The data-parallel replica axis an outer sync (DiLoCo, local SGD) averages over."""


def _check_site_internal(cfg: Config, worker: WorkerEnv) -> None:
    """A site's c10d store and Gloo stay on the site's own network; one process still needs a group."""
    loopback = ("127.0.0.1", "localhost", "::1")
    if worker.world_size > 1 and worker.master_addr != cfg.sites.internal and not (
            worker.master_addr in loopback and cfg.sites.internal in loopback):
        raise ConfigError(f"sites.internal = '{cfg.sites.internal}', but this site's c10d store is at "
                          f"{worker.master_addr} (MASTER_ADDR): start the site's workers on its own network")
    if not dist.is_initialized():  # DiLoCo broadcasts inside the site, even a site of one worker
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def train(cfg: Config, *, run_dir: str | None = None, resume: str | None = None, verbose: bool = False) -> list[float]:
    """Build this process's worker and train it; returns its losses."""
    losses = run(build(cfg, run_dir=run_dir, resume=resume, verbose=verbose))
    # The model's hooks hold it in reference cycles, and FSDP's state holds its process groups: left
    # to the collector, they could be freed while the interpreter shuts down, which aborts the process
    # (a script that trains in place under torchrun goes on after this). They are freed here.
    gc.collect()
    return losses


def build(cfg: Config, *, run_dir: str | None = None, resume: str | None = None, verbose: bool = False) -> Worker:
    """Environment -> process group -> mesh -> data -> model -> parallel layout -> Trainer, resumed
    from a checkpoint when asked (or when an elastic restart finds one)."""
    die_with_launcher()
    preempt.install()  # SIGTERM/SIGINT/SIGUSR1: stop at the next step boundary with a checkpoint
    worker = read_env()
    torch.set_num_threads(thread_budget(cfg.launch.threads, loader_workers=cfg.data.loader_workers))
    device = pick_device(cfg.launch.device, worker.local_rank)
    replicas = None
    if os.environ.get(STORE_ENV):  # started by the fault-tolerant supervisor: one replica of many
        replicas = Replicas.from_env(cfg)  # a replica group's worker also joins its group's process group here
    else:
        init_distributed(worker, device, cfg.launch.backend)
    if cfg.sites.name:
        _check_site_internal(cfg, worker)
    path = prepare_run_dir(cfg, worker, run_dir)
    log_id = worker.rank if replicas is None else replicas.replica.log_id
    rundir.log_to_run(path, "rank", log_id, log_id == 0 or verbose)
    # Under fault tolerance the replica axis is the changing set of replicas (shoal/fault/elastic.py);
    # this process group holds one replica group, which shards the model over dp_shard.
    parallel = cfg.parallel if replicas is None else dataclasses.replace(cfg.parallel, dp_replicate=1)
    dims = ParallelDims.from_config(parallel, worker.world_size)
    mesh = dims.build_mesh(device.type) if worker.world_size > 1 else None
    log.info("world %d on %s: dp_replicate=%d dp_shard=%d tp=%d pp=%d; %d torch threads", worker.world_size,
             device, dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, torch.get_num_threads())

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    train_set, val_set, spec = build_dataset(cfg.data, cfg.train.seed)
    # a layout that shards the model lets each rank read only its share of a checkpoint
    # (not with parallel.cpu_offload, whose shards FSDP keeps on the CPU while compute is on the device)
    sharded = mesh is not None and (dims.dp_shard > 1 or dims.tp > 1 or dims.pp > 1) and not cfg.parallel.cpu_offload
    model = build_model(cfg.model, spec, params_on_meta=sharded)
    log.info("model %s: %.2fM parameters; %d training samples", cfg.model.hf or cfg.model.factory or cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_set))
    outer_sync = cfg.sync.method in OUTER_SYNC_METHODS  # DiLoCo / local SGD own the replica axis
    # Across sites the sites are DiLoCo's replicas: inside one, gradients are all-reduced every step.
    tied = tied_aliases(model)  # before the split: a stage may hold one of two tied weights
    pm = parallelize(model, dims, mesh, cfg, device, replicate_gradients=not outer_sync or bool(cfg.sites.name))
    if any(p.is_meta for p in model.parameters()):
        from shoal.models.hf_weights import load_per_rank
        read = load_per_rank(pm.model_parts, cfg.model.hf, device, tied)
        log.info("model.hf: this rank read its share of %d checkpoint tensors", read)
    timer = None
    if pm.ddp is not None:
        timer = CommTimer()
        timer.attach(pm.ddp, *(comm_hook_for(cfg.sync, pm.ddp.process_group) or (None, None)))
    # A site reads an equal share of the global batch (whatever the other sites' sizes), split between its
    # own data-parallel ranks: the rule of place_in_sites, which every site computes alike.
    site, sites = site_index(cfg) if cfg.sites.name else (0, 1)
    torch.manual_seed(rank_seed(cfg.train.seed, worker.rank, site))  # per-rank dropout streams
    dp_rank, dp_size = place_in_sites(site, sites, mesh["dp"].get_local_rank() if mesh is not None else 0, dims.dp)
    placement = Placement(dp_rank=dp_rank, dp_size=dp_size, rank=worker.rank, device=device,
                          master=worker.rank == 0 and (replicas is None or replicas.replica.member == 0))
    checkpointer = Checkpointer(rundir.checkpoint_folder(cfg, path), keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save, meta=rundir.checkpoint_meta(cfg),
                                replicas_differ=outer_sync)
    sample_log = None
    if replicas is None and os.environ.get(SAMPLE_LOG_ENV):  # the sample audit (shoal/fault/audit.py); fault
        folder = Path(os.environ[SAMPLE_LOG_ENV])               # tolerance writes its own
        folder.mkdir(parents=True, exist_ok=True)
        # One file per process: a resumed run's records stay apart from those of the run it continues.
        sample_log = folder / f"{cfg.sites.name or 'run'}-rank{worker.rank}-pid{os.getpid()}.jsonl"
    trainer = Trainer(cfg, pm, train_set, val_set, placement=placement, run_dir=path, checkpointer=checkpointer,
                      comm_timer=timer, sync=replicas, sample_log=sample_log)
    if replicas is not None:  # what fault tolerance needs of the run: its parts; the step through the Trainer's methods
        replicas.attach(TrainerHost(model_parts=pm.model_parts, optimizer=trainer.optimizer, sampler=trainer.sampler,
                                    grad_accum=cfg.train.grad_accum, checkpointer=checkpointer, run=trainer))
    if not resume and cfg.fault.enabled and worker.restart_count and latest_checkpoint(checkpointer.folder):
        resume = str(path)  # fault.enabled on a layout without replicas: a restart continues from disk
    if resume:
        _, checkpoint = rundir.find_resume(cfg, str(path) if resume == "latest" and run_dir else resume)
        trainer.resume(checkpoint)
        log.info("resumed from %s at step %d", checkpoint, trainer.step)
        if placement.master:  # the stopped attempt's steps after the checkpoint are trained again
            dropped = drop_records_after(path, trainer.step)
            if dropped:
                log.info("metrics.jsonl: %d records after step %d (the stopped attempt's) dropped; this run "
                         "writes those steps again", dropped, trainer.step)
    return Worker(cfg=cfg, trainer=trainer, model=model, run_dir=path, replicas=replicas,
                  replica_group=mesh["dp_replicate"].get_group() if mesh is not None else None)


def run(built: Worker) -> list[float]:
    """Train a built worker to the end, or to a stop: a lost launcher or a stop signal leaves a
    checkpoint, a broken replica group exits for its launcher to restart it."""
    cfg, trainer, replicas, model = built.cfg, built.trainer, built.replicas, built.model
    outer_sync = cfg.sync.method in OUTER_SYNC_METHODS
    # A replica of a fault-tolerant job stops by its own exits (shoal/fault/exits.py).
    stops = replica_exits(replicas) if replicas is not None else nullcontext()
    try:
        with stops:
            if replicas is not None and outer_sync:  # DiLoCo over the changing replicas (shoal/fault/outer.py)
                from shoal.fault.outer import elastic_outer_sync
                sync_context = elastic_outer_sync(cfg.sync, model, trainer.optimizer, replicas, replicas.host)
            elif cfg.sites.name:  # DiLoCo whose replicas are sites, over the cross-site plane (shoal/sites)
                sync_context = sites_outer_sync(cfg, model, trainer.optimizer, built.run_dir,
                                                resumed=trainer.step > 0)
            else:
                sync_context = outer_sync_for(cfg.sync, model, trainer.optimizer, built.replica_group)
            with sync_context as synced:
                trainer.attach_outer_sync(synced)  # checkpoints hold its state; a resumed run gets it back
                losses = trainer.fit()
    except preempt.Preempted as stopped:
        # Every rank saved this step's checkpoint together (Trainer.fit) and no collective is pending.
        log.warning("%s; checkpoint saved; continue with --resume", stopped)
        end_distributed(trainer.model.ddp)
        raise SystemExit(preempted_exit_code(stopped.signum)) from None
    finally:
        close = getattr(trainer.train_set, "close", None)  # a Loader's receiving thread (shoal/data/loader.py)
        if close is not None:
            close()
    log.info("finished %d steps; final loss %.4f; run directory %s", trainer.step, losses[-1] if losses else
             float("nan"), built.run_dir)
    log.info("peak memory %.0f MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    end_distributed(trainer.model.ddp)
    return losses


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="config TOML (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--run-dir", help="run directory made by the launcher")
    parser.add_argument("--resume", nargs="?", const="latest", help="continue from the latest checkpoint")
    parser.add_argument("--verbose", action="store_true", help="every rank logs to the console")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not args.config.endswith(".toml"):
        overrides.insert(0, args.config)
        args.config = None
    try:
        cfg = config_module.load(args.config, overrides)
        if cfg.selfplay.game:  # a learner rank, actor or evaluator of self-play (shoal/selfplay/process.py)
            from shoal.selfplay.process import run_process
            return run_process(cfg, run_dir=args.run_dir, resume=args.resume, verbose=args.verbose)
        train(cfg, run_dir=args.run_dir, resume=args.resume, verbose=args.verbose)
    except ConfigError as err:
        print(f"shoal: error: {err}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
