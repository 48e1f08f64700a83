"""The self-play learner: the training side of AlphaZero's loop, one weight version at a time.

    wait for selfplay.games_per_version new games  ->  ingest them into the replay buffer
    ->  selfplay.train_steps_per_version optimizer steps on buffer samples  ->  publish version N+1

(Silver et al., "Mastering the game of Go without human knowledge", Nature 2017, and "A general
reinforcement learning algorithm that masters chess, shogi and Go through self-play", Science
2018.) The learner is `launch.nproc` ordinary Shoal workers: with several, each rank samples its
share of every batch from its own copy of the buffer and DDP averages the gradients.

Exact resume: everything a version depends on is in its checkpoint (shoal/runtime/checkpoint.py):
network and optimizer through DCP, and in the trainer state the replay buffer, the sampling
generator, the weight version and the ledger, the batch ids each version ingested (in the
order ingested). Actors keep playing while the learner is down, so a resumed learner ingests
other games than the killed one would have; what is provable is that a learner started from
scratch and fed the ledger's batches version by version (`replay_ledger`) ends with the same
weights, bit for bit on CPU, as the killed-and-resumed one, and no batch appears twice in it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from shoal.config import Config, ConfigError, rank_seed
from shoal.runtime import preempt, protocol
from shoal.runtime.checkpoint import Checkpointer, latest_checkpoint, read_meta
from shoal.observe import rundir
from shoal.observe.events import append_event
from shoal.observe.metrics import MetricsLog, drop_records_after
from shoal.runtime.env import die_with_launcher, end_distributed, init_distributed, read_env, thread_budget
from shoal.selfplay import transport
from shoal.selfplay.setup import build_buffer, build_network, load_game, record_length, record_type

log = logging.getLogger("shoal")
POLL = 0.05  # seconds between looks for new game files while waiting


@dataclass
class LearnerState:
    """What the loop carries from version to version besides network, optimizer and buffer."""

    version: int = 0
    ledger: list[list[str]] = field(default_factory=list)
    """ledger[v] holds the batch ids ingested before training version v + 1, in ingest order."""
    lrs: list[float] = field(default_factory=list)
    """lrs[v] is the learning rate version v + 1 trained at (selfplay.lr_final decays it by run time)."""
    seconds: float = 0.0
    """Training time before this process (a resumed run's time budget continues)."""

    @property
    def ingested(self) -> set[str]:
        return {batch for batches in self.ledger for batch in batches}


class Learner:
    """Network, optimizer, replay buffer and sampling generator of one learner rank."""

    def __init__(self, cfg: Config, *, rank: int = 0, world_size: int = 1):
        sp = cfg.selfplay
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.game = load_game(sp.game)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, and in a replay
        self.net = build_network(self.game, cfg)
        self.model = self.net
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.net)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.buffer = build_buffer(self.game, cfg)
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.train.seed, rank))
        self.record_type = record_type()
        self.state = LearnerState()
        self.started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds of training so far, those before a resume included (selfplay.minutes counts them)."""
        return self.state.seconds + time.monotonic() - self.started

    def ingest(self, run_dir: Path, batches: list[str]) -> tuple[int, int]:
        """Add the games of `batches` (in this order) to the buffer; (games, positions) added."""
        games = positions = 0
        for batch in batches:
            records = transport.read_games(run_dir, batch, self.record_type)
            self.buffer.add(records)
            games += len(records)
            positions += sum(record_length(r) for r in records)
        self.state.ledger.append(list(batches))
        return games, positions

    def next_lr(self) -> float:
        """The learning rate of the next version: train.lr, decayed over the run's last part by the share
        of selfplay.versions or selfplay.minutes done, whichever is further along."""
        from shoal.selfplay.learn import decayed_lr
        sp = self.cfg.selfplay
        progress = (self.state.version + 1) / sp.versions  # the last version trains at the final rate
        if sp.minutes:
            progress = max(progress, self.elapsed() / (60 * sp.minutes))
        return decayed_lr(self.cfg.train.lr, progress, final=sp.lr_final, start=sp.lr_decay_from)

    def train_version(self, lr: float) -> dict[str, float]:
        """One version's optimizer steps at learning rate `lr`; the mean losses."""
        from shoal.selfplay.learn import train_steps
        sp = self.cfg.selfplay
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # with augmentation each sampled position is one of its symmetric copies (learn.augment)
        losses = train_steps(self.model, self.optimizer, self.buffer, sp.train_steps_per_version,
                             sp.batch_size // self.world_size, self.generator,
                             symmetries=self.game.symmetries if sp.augment else None)
        self.state.version += 1
        self.state.lrs.append(lr)
        return losses

    def trainer_state(self) -> dict:
        s = self.state
        return {"version": s.version, "ledger": s.ledger, "lrs": s.lrs, "seconds": self.elapsed(),
                "buffer": self.buffer.state_dict(), "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state()}

    def load_trainer_state(self, saved: dict) -> None:
        ledger = [list(b) for b in saved["ledger"]]
        # a checkpoint from before the decay trained every version at train.lr
        lrs = [float(lr) for lr in saved.get("lrs", [self.cfg.train.lr] * len(ledger))]
        self.state = LearnerState(version=int(saved["version"]), ledger=ledger, lrs=lrs,
                                  seconds=float(saved["seconds"]))
        self.started = time.monotonic()
        self.buffer.load_state_dict(saved["buffer"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])


def replay_ledger(cfg: Config, run_dir: Path, *, threads: int, versions: int | None = None) -> Learner:
    """A fresh one-process learner fed the ledger's batches version by version (the first
    `versions`, default all): the reference a resumed learner must equal. Bit-for-bit equality
    needs the learner's torch thread count (`torch_threads` of its metrics): a CPU matmul sums
    in another order on another count of threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        learner = Learner(cfg)
        for row in transport.ledger_rows(run_dir)[:versions]:
            learner.ingest(run_dir, row["batches"])
            learner.train_version(row.get("lr", cfg.train.lr))  # a ledger from before the decay: train.lr
    finally:
        torch.set_num_threads(previous)
    return learner


def _wait_for_games(run_dir: Path, ingested: set[str], wanted: int) -> list[str] | str:
    """Block until the pending batches hold at least `wanted` games; all pending batches, in name order,
    [] when a stop signal came first, or the reason the actors failed for good (the pool wrote it)."""
    counts: dict[str, int] = {}
    while True:
        pending = transport.pending_batches(run_dir, ingested)
        for batch in pending:
            if batch not in counts:
                counts[batch] = transport.batch_games(run_dir, batch)
        if pending and sum(counts[b] for b in pending) >= wanted:
            return pending
        reason = transport.failure(run_dir)
        if reason:
            return reason
        if preempt.requested():
            return []
        time.sleep(POLL)


class ActorsFailed(RuntimeError):
    """No actor is left to play games (the launcher's pool gave up on them)."""


def _agree(value, rank: int, world_size: int):
    """Rank 0's value on every rank (which batches to ingest, whether to stop): the ranks of one job trust
    each other, as torch's object collectives assume."""
    if world_size == 1:
        return value
    holder = [value if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run_learner(cfg: Config, run_dir: Path, *, resume: str | None, verbose: bool) -> int:
    """The learner rank's whole life: build, resume when asked, train every version, checkpoint."""
    die_with_launcher()
    preempt.install()
    worker = read_env()
    torch.set_num_threads(thread_budget(cfg.launch.threads))
    # rank 0 may wait minutes for games while the others wait in its broadcast
    init_distributed(worker, torch.device("cpu"), cfg.launch.backend, timeout=timedelta(hours=2))
    rank, world_size = worker.rank, worker.world_size
    master = rank == 0  # this rank publishes weights, writes the ledger and the metrics
    rundir.log_to_run(run_dir, "learner", rank, rank == 0 or verbose)
    log.info("learner rank %d of %d: pid %d, %d torch threads, attempt %d", rank, world_size, os.getpid(),
             torch.get_num_threads(), worker.restart_count)
    learner = Learner(cfg, rank=rank, world_size=world_size)
    checkpointer = Checkpointer(rundir.checkpoint_folder(cfg, run_dir), keep=cfg.checkpoint.keep,
                                meta={**rundir.checkpoint_meta(cfg), "selfplay": network_meta(cfg)})
    if not resume and cfg.fault.enabled and worker.restart_count and latest_checkpoint(checkpointer.folder):
        resume = str(run_dir)  # the elastic agent restarted the learner: continue from its checkpoint
    if resume:
        checkpoint = latest_checkpoint(checkpointer.folder)
        if checkpoint is None:
            raise ConfigError(f"--resume: {run_dir} has no complete checkpoint")
        saved_with = read_meta(checkpoint).get("selfplay", {})
        for key, value in network_meta(cfg).items():
            if saved_with.get(key, value) != value:
                raise ConfigError(f"--resume: checkpoint {checkpoint} was saved with selfplay.{key} = "
                                  f"{saved_with[key]!r}, but the config now says {value!r}")
        learner.load_trainer_state(checkpointer.load(checkpoint, [learner.net], learner.optimizer))
        log.info("resumed from %s at weight version %d", checkpoint, learner.state.version)
        if master:
            append_event(run_dir / "metrics.jsonl", "resumed", learner.state.version, checkpoint=checkpoint.name)
    if master:
        # What a killed attempt did after this state is undone: its versions are trained again, and
        # batches it ingested without a checkpoint are ingested again (they are not in the ledger).
        dropped = drop_records_after(run_dir, learner.state.version)
        withdrawn = transport.withdraw_weights_after(run_dir, learner.state.version)
        transport.write_ledger(run_dir, learner.state.ledger, learner.state.lrs)
        if dropped or withdrawn:
            log.info("versions after %d are trained again: %d metric records dropped, weight files %s withdrawn",
                     learner.state.version, dropped, withdrawn)
        transport.publish_weights(run_dir, learner.state.version, learner.net.state_dict())
    # opened after the records of undone versions were dropped (that rewrites the file)
    metrics = MetricsLog(run_dir, tensorboard=cfg.log.tensorboard) if master else None
    sp = cfg.selfplay
    code = 0
    saved = learner.state.version if resume else -1  # the version the newest checkpoint holds
    try:
        while learner.state.version < sp.versions:
            waited = time.monotonic()
            batches = _agree(_wait_for_games(run_dir, learner.state.ingested, sp.games_per_version) if master
                             else None, rank, world_size)
            if isinstance(batches, str):
                raise ActorsFailed(batches)
            if not batches:  # a stop signal while waiting: the checkpoint below holds everything
                raise preempt.Preempted(_agree(preempt.requested(), rank, world_size) or 15, learner.state.version)
            lr = _agree(learner.next_lr(), rank, world_size)  # run time differs between ranks
            if master:
                transport.append_ledger(run_dir, learner.state.version + 1, batches, lr)
            ingest_started = time.monotonic()
            games, positions = learner.ingest(run_dir, batches)
            losses = learner.train_version(lr)
            version = learner.state.version
            if master:
                transport.publish_weights(run_dir, version, learner.net.state_dict(), keep_every=sp.eval_every)
                seconds = time.monotonic() - waited
                metrics.log({"kind": "selfplay", "step": version, "version": version, "games": games,
                             "positions": positions, "batches": len(batches),
                             "games_per_second": games / seconds, "positions_per_second": positions / seconds,
                             "wait_seconds": ingest_started - waited,
                             "train_seconds": time.monotonic() - ingest_started,
                             "buffer_positions": len(learner.buffer), "lr": lr,
                             "torch_threads": torch.get_num_threads(),
                             **losses})
                log.info("version %d: %d games (%d positions) from %d batches; %s", version, games, positions,
                         len(batches), " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            out_of_time = _agree(bool(sp.minutes) and learner.elapsed() >= 60 * sp.minutes, rank, world_size)
            stop = _agree(preempt.requested(), rank, world_size)
            last = version >= sp.versions or out_of_time
            if last or stop or (cfg.checkpoint.every and version % cfg.checkpoint.every == 0):
                saved = _save(learner, checkpointer, run_dir, master)
            if stop:
                raise preempt.Preempted(stop, version)
            if out_of_time:
                log.info("selfplay.minutes = %s reached after version %d", sp.minutes, version)
                break
        if master:
            transport.mark_finished(run_dir)
    except preempt.Preempted as stopped:
        if saved != learner.state.version:
            _save(learner, checkpointer, run_dir, master)
        log.warning("%s; checkpoint saved; continue with --resume", stopped)
        code = protocol.preempted_exit_code(stopped.signum)
    except ActorsFailed as err:
        print(f"shoal: error: self-play actors failed: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if metrics is not None:
            metrics.close()
    log.info("learner stopped at weight version %d", learner.state.version)
    end_distributed(learner.model if world_size > 1 else None)
    return code


def network_meta(cfg: Config) -> dict:
    """The settings a checkpoint's network and buffer depend on; a resume must keep them (augment too:
    it changes the generator's draws, so the resumed run would sample other batches than the ledger's)."""
    return {"game": cfg.selfplay.game, "channels": cfg.selfplay.channels, "blocks": cfg.selfplay.blocks,
            "augment": cfg.selfplay.augment}


def _save(learner: Learner, checkpointer: Checkpointer, run_dir: Path, master: bool) -> int:
    """Checkpoint the learner's current version (every rank calls); the version saved."""
    saving = time.monotonic()
    checkpointer.save(learner.state.version, [learner.net], learner.optimizer, learner.trainer_state())
    if master:
        append_event(run_dir / "metrics.jsonl", "checkpoint", learner.state.version,
                     seconds=round(time.monotonic() - saving, 3))
    return learner.state.version
