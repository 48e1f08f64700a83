"""The Trainer: one training loop, read top to bottom.

It knows the parallel techniques only through `ParallelModel` (compose.py), data only
through sample ids from the `ShardedSampler`, and checkpoints only through `Checkpointer`.
Everything a step depends on (weights, optimizer moments, data position, RNG) is saved, so
a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shoal.config import Config
from shoal.data import ShardedSampler
from shoal.fault.checkpoint import Checkpointer
from shoal.models import to_device
from shoal.observe.metrics import MetricsLog
from shoal.observe.timing import CommTimer
from shoal.observe.progress import Progress
from shoal.parallel.compose import ParallelModel

log = logging.getLogger("shoal")


def lr_at(step: int, cfg) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


@dataclass(kw_only=True)
class Placement:
    """Where this rank sits: which data shard it reads and whether it logs."""

    dp_rank: int
    dp_size: int
    rank: int
    device: torch.device
    master: bool  # this process logs, shows progress and writes metrics


class Trainer:
    def __init__(self, cfg: Config, model: ParallelModel, train_set, val_set, *, placement: Placement,
                 run_dir: Path, checkpointer: Checkpointer | None = None, comm_timer: CommTimer | None = None,
                 replicas=None):
        self.cfg, self.model, self.train_set, self.val_set = cfg, model, train_set, val_set
        # Fault-tolerant mode (shoal/fault/elastic.py): the replicas of each step set this
        # rank's data share and average the gradients; None means the layout's own DDP/FSDP.
        self.replicas = replicas
        self.where, self.run_dir = placement, Path(run_dir)
        t = cfg.train
        if t.batch_size % (placement.dp_size * t.grad_accum):
            raise ValueError(f"train.batch_size = {t.batch_size} must divide into {placement.dp_size} "
                             f"data-parallel ranks x train.grad_accum = {t.grad_accum} micro-batches")
        self.micro_batch = t.batch_size // t.grad_accum  # global samples per micro-batch
        self.optimizer = build_optimizer(list(model.parameters()), t)
        self.sampler = ShardedSampler(len(train_set), self.micro_batch, t.seed)
        follow = getattr(train_set, "follow", None)
        if follow is not None:  # a loader reading ahead in this sampler's order (shoal/data/loader.py)
            follow(self.sampler, lambda: (self.where.dp_rank, self.where.dp_size))
        self.checkpointer = checkpointer
        # DiLoCo / LocalSGD around fit() (shoal/sync): its state goes into every checkpoint.
        self.outer_sync = None
        self._saved_outer_sync: dict | None = None  # read by resume(), loaded by attach_outer_sync()
        self.step = 0
        self.comm_timer = comm_timer
        self.autocast = (torch.autocast(placement.device.type, dtype=torch.bfloat16)
                         if t.precision == "bf16" else nullcontext())

    # -- state -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        state = {"step": self.step, "rank": self.where.rank, "sampler": self.sampler.state_dict(),
                 "rng": torch.get_rng_state()}
        if self.outer_sync is not None:
            state["outer_sync"] = self.outer_sync.state_dict()
        return state

    def load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self._saved_outer_sync = state.get("outer_sync")
        if int(state["rank"]) == self.where.rank:
            torch.set_rng_state(state["rng"])
        else:  # resumed on a different layout: a fresh, still per-rank stream
            torch.manual_seed(self.cfg.train.seed + 7919 * self.where.rank + self.step)

    def resume(self, path: Path) -> None:
        assert self.checkpointer is not None
        self.load_trainer_state(self.checkpointer.load(path, self.model.model_parts, self.optimizer))

    def attach_outer_sync(self, outer_sync) -> None:
        """Checkpoint `outer_sync` (an entered DiLoCo / LocalSGD, or None) from now on, and give it the
        state that `resume()` read. Called after entry: loading a checkpoint steps the optimizer once
        (DCP's state initialisation), which must not count as an inner step."""
        self.outer_sync = outer_sync
        saved, self._saved_outer_sync = self._saved_outer_sync, None
        if outer_sync is not None and saved is not None:
            outer_sync.load_state_dict(saved)
        elif outer_sync is not None and self.step:
            log.warning("the checkpoint holds no outer-sync state: the outer optimizer starts afresh at step %d",
                        self.step)

    def logs_metrics(self) -> bool:
        """This process writes metrics.jsonl now: the logging rank, or under fault tolerance the
        first worker of the current generation (so the metrics go on when worker 0 dies)."""
        if self.replicas is None:
            return self.where.master
        return self.replicas.is_master and self.replicas.lane == 0

    def save(self) -> None:
        if self.checkpointer is not None and (self.replicas is None or self.replicas.is_master):
            self.checkpointer.save(self.step, self.model.model_parts, self.optimizer, self.trainer_state())

    # -- one step ----------------------------------------------------------------------
    def train_step(self) -> torch.Tensor | None:
        """Forward and backward over `grad_accum` micro-batches, then one optimizer step.
        Returns None when a failure made the replicas abandon the step (nothing applied)."""
        t, where = self.cfg.train, self.where
        if self.replicas is not None:  # may wait for a new group and receive state from a peer
            where.dp_rank, where.dp_size = self.replicas.begin_step(self)
            if self.outer_sync is not None and self.outer_sync.owed_sync(self):
                return None  # it joined in the middle of an outer sync and finished it: no step of its own
        start, samples = self.sampler.state_dict(), 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        loss_sum = torch.zeros((), device=where.device)
        for micro in range(t.grad_accum):
            ids = self.sampler.next_batch(where.dp_rank, where.dp_size)
            samples += len(ids)
            inputs, targets = (to_device(x, where.device) for x in self.train_set.get(ids))
            last = micro == t.grad_accum - 1
            # gradients are synchronised once per step, on the last micro-batch
            with (nullcontext() if last else self.model.no_sync()), self.autocast:
                loss_sum += self.model.forward_backward(inputs, targets, 1.0 / t.grad_accum)
        if self.replicas is not None and self.outer_sync is not None:
            # Under DiLoCo the replicas average parameters every few steps (shoal/fault/outer.py), not gradients.
            self.replicas.publish_progress(self.step + 1, float(loss_sum / t.grad_accum))
        elif self.replicas is not None:
            loss_sum = self.replicas.reduce(self, samples, loss_sum / t.grad_accum)
            if loss_sum is None:  # abandoned: the next group retries the same global batch
                self.optimizer.zero_grad(set_to_none=True)
                self.sampler.load_state_dict(start)
                return None
            loss_sum = loss_sum * t.grad_accum  # already the mean over every replica's samples
        if t.grad_clip > 0:
            clip = getattr(self.model, "clip_grad_norm_", None)
            if clip is not None:
                clip(t.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / t.grad_accum

    def mean_over_dp(self, value: torch.Tensor) -> float:
        """The loss averaged over data-parallel ranks (what a single process would report)."""
        return float(self.means_over_dp(value))

    def means_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged element by element over the data-parallel ranks, in one all-reduce."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            values = values.detach().clone()
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` fixed batches of held-out data (no effect on training state)."""
        t, where = self.cfg.train, self.where
        sampler = ShardedSampler(len(self.val_set), min(self.micro_batch, len(self.val_set) // where.dp_size
                                                        * where.dp_size), t.seed, shuffle=False)
        self.model.train(False)
        total = torch.zeros((), device=where.device)
        for _ in range(t.eval_batches):
            inputs, targets = (to_device(x, where.device) for x in self.val_set.get(sampler.next_batch(
                where.dp_rank, where.dp_size)))
            with self.autocast:
                total += self.model.evaluate(inputs, targets).float()
        self.model.train(True)
        return self.mean_over_dp(total / t.eval_batches)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> list[float]:
        t, ck = self.cfg.train, self.cfg.checkpoint
        metrics: MetricsLog | None = None

        def log_metrics(record: dict) -> None:
            nonlocal metrics
            if not self.logs_metrics():
                return
            if metrics is None:  # opened by whichever worker is logging now (appended to)
                metrics = MetricsLog(self.run_dir, self.cfg.log.tensorboard, self.cfg.log.every)
            metrics.log(record)

        tokens_per_sample = getattr(self.train_set, "tokens_per_sample", 1)
        unit = "tokens" if tokens_per_sample > 1 else "samples"
        # Under fault tolerance the launcher shows progress (shoal/observe/fleet.py): any worker may die.
        shown = self.where.master and self.replicas is None
        progress = Progress(t.steps, self.step, mode=self.cfg.log.progress if shown else "off",
                            every=self.cfg.log.every, unit=unit)
        losses: list[float] = []
        # Outer-sync methods (DiLoCo) exist to keep the link quiet between syncs: their ranks' losses
        # wait here and are averaged every `log.every` steps in one all-reduce, not one per step.
        unsent: list[tuple[torch.Tensor, dict]] = []

        def publish(averaged: bool) -> None:
            means = torch.stack([loss for loss, _ in unsent])
            # In fp64 a sum of a few fp32 losses is exact in any order, so the logged means do not
            # depend on how the all-reduce splits the vector (a resumed run's first one is shorter).
            means = means if averaged else self.means_over_dp(means.double())
            for loss, (_, record) in zip(means.tolist(), unsent):
                record = {"kind": "train", "step": record["step"], "loss": loss, **record}
                losses.append(loss)
                progress.update(record["step"], loss, record[f"{unit}_per_second"])
                log_metrics(record)
            unsent.clear()

        self.model.train(True)
        try:
            while self.step < t.steps:
                comm_before = self.comm_timer.seconds if self.comm_timer else 0.0
                started = time.perf_counter()
                loss = self.train_step()
                if loss is None:
                    continue
                if self.outer_sync is None:  # the gradients travel every step anyway; so does the loss
                    loss = self.means_over_dp(loss)
                seconds = time.perf_counter() - started
                unsent.append((loss.detach().reshape(()), {
                    "time": round(time.time(), 3),  # when the step ended, not when its loss was averaged
                    "step": self.step, "lr": lr_at(self.step - 1, t), "step_seconds": seconds,
                    "comm_seconds": (self.comm_timer.seconds - comm_before) if self.comm_timer else 0.0,
                    f"{unit}_per_second": t.batch_size * tokens_per_sample / seconds,
                    "samples": self.step * t.batch_size}))
                if self.outer_sync is None or self.step % self.cfg.log.every == 0 or self.step == t.steps:
                    publish(averaged=self.outer_sync is None)
                if t.eval_every and self.step % t.eval_every == 0:
                    val = self.evaluate()
                    progress.message(f"step {self.step}: validation loss {val:.4f}")
                    log_metrics({"kind": "eval", "step": self.step, "val_loss": val})
                if ck.every and self.step % ck.every == 0 and self.step < t.steps:
                    self.save()
            self.save()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
        return losses
