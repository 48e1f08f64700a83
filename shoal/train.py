"""The Trainer: one training loop, read top to bottom.

It knows the parallel techniques only through `ParallelModel` (compose.py), data only
through sample ids from the `ShardedSampler`, and checkpoints only through `Checkpointer`.
Everything a step depends on (weights, optimizer moments, data position, RNG) is saved, so
a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

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
from shoal.observe.metrics import MetricsLog
from shoal.observe.timing import CommTimer
from shoal.observe.progress import Progress
from shoal.parallel.compose import ParallelModel


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
        self.checkpointer = checkpointer
        self.step = 0
        self.comm_timer = comm_timer
        self.autocast = (torch.autocast(placement.device.type, dtype=torch.bfloat16)
                         if t.precision == "bf16" else nullcontext())

    # -- state -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "rank": self.where.rank, "sampler": self.sampler.state_dict(),
                "rng": torch.get_rng_state()}

    def load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if int(state["rank"]) == self.where.rank:
            torch.set_rng_state(state["rng"])
        else:  # resumed on a different layout: a fresh, still per-rank stream
            torch.manual_seed(self.cfg.train.seed + 7919 * self.where.rank + self.step)

    def resume(self, path: Path) -> None:
        assert self.checkpointer is not None
        self.load_trainer_state(self.checkpointer.load(path, self.model.model_parts, self.optimizer))

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
        start, samples = self.sampler.state_dict(), 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        loss_sum = torch.zeros((), device=where.device)
        for micro in range(t.grad_accum):
            ids = self.sampler.next_batch(where.dp_rank, where.dp_size)
            samples += len(ids)
            inputs, targets = (x.to(where.device, non_blocking=True) for x in self.train_set.get(ids))
            last = micro == t.grad_accum - 1
            # gradients are synchronised once per step, on the last micro-batch
            with (nullcontext() if last else self.model.no_sync()), self.autocast:
                loss_sum += self.model.forward_backward(inputs, targets, 1.0 / t.grad_accum)
        if self.replicas is not None:
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
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` fixed batches of held-out data (no effect on training state)."""
        t, where = self.cfg.train, self.where
        sampler = ShardedSampler(len(self.val_set), min(self.micro_batch, len(self.val_set) // where.dp_size
                                                        * where.dp_size), t.seed, shuffle=False)
        self.model.train(False)
        total = torch.zeros((), device=where.device)
        for _ in range(t.eval_batches):
            inputs, targets = (x.to(where.device) for x in self.val_set.get(sampler.next_batch(where.dp_rank,
                                                                                                where.dp_size)))
            with self.autocast:
                total += self.model.evaluate(inputs, targets).float()
        self.model.train(True)
        return self.mean_over_dp(total / t.eval_batches)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> list[float]:
        t, ck = self.cfg.train, self.cfg.checkpoint
        metrics = MetricsLog(self.run_dir, self.cfg.log.tensorboard, self.cfg.log.every) if self.where.master else None
        tokens_per_sample = getattr(self.train_set, "tokens_per_sample", 1)
        unit = "tokens" if tokens_per_sample > 1 else "samples"
        progress = Progress(t.steps, self.step, mode=self.cfg.log.progress if self.where.master else "off",
                            every=self.cfg.log.every, unit=unit)
        losses: list[float] = []
        self.model.train(True)
        try:
            while self.step < t.steps:
                comm_before = self.comm_timer.seconds if self.comm_timer else 0.0
                started = time.perf_counter()
                loss = self.train_step()
                if loss is None:
                    continue
                loss = self.mean_over_dp(loss)
                seconds = time.perf_counter() - started
                losses.append(loss)
                rate = t.batch_size * tokens_per_sample / seconds
                progress.update(self.step, loss, rate)
                if metrics is not None:
                    metrics.log({"kind": "train", "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, t),
                                 "step_seconds": seconds, "comm_seconds": (self.comm_timer.seconds - comm_before) if self.comm_timer else 0.0,
                                 f"{unit}_per_second": rate, "samples": self.step * t.batch_size})
                if t.eval_every and self.step % t.eval_every == 0:
                    val = self.evaluate()
                    progress.message(f"step {self.step}: validation loss {val:.4f}")
                    if metrics is not None:
                        metrics.log({"kind": "eval", "step": self.step, "val_loss": val})
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
