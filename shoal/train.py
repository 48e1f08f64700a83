"""The Trainer: one training loop, read top to bottom.

It knows the parallel techniques only through `ParallelModel` (compose.py), data only
through sample ids from the `ShardedSampler`, checkpoints only through `Checkpointer`, and
how the replicas of a step agree on its gradients only through a `GradientSync`: the
layout's own DDP/FSDP (`LayoutSync`, nothing to do), or per-step fault tolerance's changing
replicas (shoal/fault/elastic.py), whose `reduce` says whether the step was committed or
abandoned (shoal/fault/agreement.py). What fault tolerance needs of the run, it reads through an
adapter the worker builds from the model's parts, the optimizer and the sampler (shoal/fault/host.py);
the step counter and this rank's place change only through this class's methods.
Everything a step depends on (weights, optimizer moments, data position, RNG) is saved, so
a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from shoal.config import Config, rank_seed
from shoal.data import ShardedSampler
from shoal.fault.agreement import StepOutcome
from shoal.fault.audit import write_record
from shoal.models import to_device
from shoal.observe.loggers import open_loggers
from shoal.observe.ranks import RankTiming, gather_over_group
from shoal.observe.reporter import StepReporter
from shoal.observe.timing import CommTimer
from shoal.runtime import preempt
from shoal.runtime.checkpoint import Checkpointer
from shoal.parallel.compose import ParallelModel, check_batch_split

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


class GradientSync(Protocol):
    """How the replicas of a step agree on its gradients, as the Trainer sees it."""

    agrees_on_stop: bool
    """A stop signal travels through this agreement (the worker that gets one leaves the others): the
    Trainer's loss all-reduce carries none."""
    shows_progress: bool
    """The master rank shows progress; False when the launcher shows it (any worker may die)."""
    weights_by_samples: bool
    """`reduce` weights each rank's gradients by its sample count, so each rank divides its loss by
    its own item count; False: DDP/FSDP take a plain mean, so the count is averaged over the ranks."""

    def begin_step(self) -> tuple[int, int] | None:
        """This step's (dp_rank, dp_size); None when there is no step to train now (skip it)."""

    def reduce(self, samples: int, loss: torch.Tensor) -> StepOutcome:
        """Average the gradients of `samples` samples: committed (with the loss to report, and whether
        it is already the mean over every rank), or abandoned, when nothing may be applied."""

    def writes_metrics(self) -> bool:
        """This process writes metrics.jsonl now."""

    def saves_checkpoints(self) -> bool:
        """This process takes part in saving checkpoints now."""


@dataclass(kw_only=True)
class Placement:
    """Where this rank sits: which data shard it reads and whether it logs."""

    dp_rank: int
    dp_size: int
    rank: int
    device: torch.device
    master: bool  # this process logs, shows progress and writes metrics


class LayoutSync:
    """The layout's own DDP or FSDP averages the gradients inside backward: nothing to do here."""

    agrees_on_stop = False
    shows_progress = True
    weights_by_samples = False

    def __init__(self, where: Placement):
        self.where = where

    def begin_step(self) -> tuple[int, int]:
        return self.where.dp_rank, self.where.dp_size

    def reduce(self, samples: int, loss: torch.Tensor) -> StepOutcome:
        return StepOutcome.committed(loss)

    def writes_metrics(self) -> bool:
        return self.where.master

    def saves_checkpoints(self) -> bool:
        return True


class Trainer:
    """One worker's training loop (`fit`), its checkpoints and its evaluation.

    What it holds, set in `__init__` and read by the loop:
        cfg: Config                       the whole run's config (the loop reads cfg.train, cfg.log)
        model: ParallelModel              the composed model: its parts (pipeline stages) and its loss
        train_set, val_set                data sources: `len()` and `get(sample ids)` (shoal/data)
        where: Placement                  this rank, its data-parallel rank and size, its device
        run_dir: Path                     the run directory (metrics, checkpoints, logs)
        sync: GradientSync                how replicas agree on a step: LayoutSync, or the fault-tolerant one
        optimizer: torch.optim.Optimizer  built from cfg.train
        sampler: ShardedSampler           the global sample order; its position is checkpointed
        micro_batch: int                  global samples per micro-batch (batch_size // grad_accum)
        checkpointer: Checkpointer | None saves and loads model, optimizer and `trainer_state()`
        outer_sync                        an entered DiLoCo / LocalSGD, or None (`attach_outer_sync`)
        step: int                         optimizer steps taken so far
        data_seconds, arrival_seconds, comm_seconds, step_started: float
                                          where the last step's time went (metrics, shoal/observe/ranks.py)
        comm_timer: CommTimer | None      times the gradient collectives
        report: StepReporter | None       while `fit` runs: where events and records go
        every_target_counts: bool         the data has no padding: every rank's item count is its own (counts_agree)
        sample_log: Path | None           a file this rank appends each step's sample ids to (the audit of
                                          shoal/fault/audit.py; the worker passes it from SHOAL_SAMPLE_LOG)
        autocast                          bf16 autocast or a null context, from cfg.train.precision
    """

    def __init__(self, cfg: Config, model: ParallelModel, train_set, val_set, *, placement: Placement,
                 run_dir: Path, checkpointer: Checkpointer | None = None, comm_timer: CommTimer | None = None,
                 sync: GradientSync | None = None, sample_log: Path | None = None):
        self.cfg, self.model, self.train_set, self.val_set = cfg, model, train_set, val_set
        self.where, self.run_dir = placement, Path(run_dir)
        self.sync = sync or LayoutSync(placement)
        t = cfg.train
        check_batch_split(t, placement.dp_size)
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
        self.data_seconds = 0.0  # time this step waited for its batches (the loader's cost, in metrics)
        self.comm_timer = comm_timer
        # Where the last step's time went (seconds since its start): arrival at the gradient
        # collective, and the communication it then waited for (shoal/observe/ranks.py).
        self.arrival_seconds = 0.0
        self.comm_seconds = 0.0
        self.step_started = 0.0
        self.report: StepReporter | None = None  # while fit() runs: where events go
        self.sample_log = sample_log
        self.every_target_counts = bool(getattr(train_set, "every_target_counts", False))
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
            torch.manual_seed(rank_seed(self.cfg.train.seed, self.where.rank) + self.step)

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
        self.move_to_outer_sync_step()  # a state taken on entry or loading may hold more or fewer of this run's steps

    def move_to_outer_sync_step(self) -> None:
        """Continue at the step the outer sync names, if it names one: it took another replica's state, which
        holds this run's steps up to that step and none after (shoal/sites/outer.py)."""
        named = getattr(self.outer_sync, "step_to_continue_at", None)
        step = named() if named is not None else None
        if step is not None and step != self.step:
            self.move_to_step(step)

    def move_to_step(self, step: int) -> None:
        """Continue at `step` with the data position (and learning rate) the run had there: back, the steps
        after it are trained again on their own data; ahead, the steps between are not read again."""
        log.info("continuing at step %d (from step %d): the data position moves %s", step, self.step,
                 "back, those steps' samples are read again" if step < self.step else "on, not reading the steps "
                 "between")
        self.sampler.move((step - self.step) * self.cfg.train.grad_accum)  # global micro-batches, as every rank
        self.step = step

    def save(self) -> None:
        """Write a checkpoint of the current step, if this process takes part in saving now."""
        if self.checkpointer is not None and self.sync.saves_checkpoints():
            self.write_checkpoint()

    def write_checkpoint(self, *, asynchronous: bool | None = None) -> None:
        """Write a checkpoint of the current step from this process (`asynchronous`: None follows
        checkpoint.async_save)."""
        started = time.perf_counter()
        self.checkpointer.save(self.step, self.model.model_parts, self.optimizer, self.trainer_state(),
                               asynchronous=asynchronous)
        if self.report is not None:
            self.report.event("checkpoint", self.step, seconds=round(time.perf_counter() - started, 4))

    def continue_at(self, step: int) -> None:
        """Count optimizer steps from `step` on: this rank took another replica's state, which holds
        that replica's step (fault tolerance's joiner, shoal/fault/join.py; the data position travels
        with the sampler's own state)."""
        self.step = step

    def place(self, dp_rank: int, dp_size: int) -> None:
        """This rank's share of the global batch from now on (the gradient agreement decides it each
        step; an outer sync that regroups mid-step moves it too, shoal/fault/outer.py)."""
        self.where.dp_rank, self.where.dp_size = dp_rank, dp_size

    # -- one step ----------------------------------------------------------------------
    def train_step(self) -> StepOutcome:
        """Forward and backward over `grad_accum` micro-batches, then one optimizer step, unless the
        replicas abandoned the step (a failure: nothing applied) or had none to train (skipped)."""
        t, where = self.cfg.train, self.where
        placement = self.sync.begin_step()  # fault tolerance may regroup and receive state here
        if placement is None:
            return StepOutcome.skipped()
        self.place(*placement)
        start, samples = self.sampler.state_dict(), 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        loss_sum = torch.zeros((), device=where.device)
        batches = []  # the step's micro-batches, all fetched first: the loss is divided by their item count
        read_ids = []
        for micro in range(t.grad_accum):
            ids = self.sampler.next_batch(where.dp_rank, where.dp_size)
            read_ids.append(ids)
            samples += len(ids)
            fetched = time.perf_counter()
            batches.append(tuple(to_device(x, where.device) for x in self.train_set.get(ids)))
            self.data_seconds += time.perf_counter() - fetched
        items = self.items_per_rank([targets for _, targets in batches])
        # with a count, each micro-batch's loss is its sum / the count, and they add up to the mean
        scale = 1.0 if items is not None else 1.0 / t.grad_accum
        for micro, (inputs, targets) in enumerate(batches):
            last = micro == t.grad_accum - 1
            # gradients are synchronised once per step, on the last micro-batch
            with (nullcontext() if last else self.model.no_sync()), self.autocast:
                loss = self.model.forward_backward(inputs, targets, scale, items)
                loss_sum += loss if scale == 1.0 else loss * scale
        reduce_started = time.perf_counter()
        reduced = self.sync.reduce(samples, loss_sum)
        reduced_at = time.perf_counter()
        # Under DDP this rank arrived when its last gradient bucket went to the hook (the rest of
        # backward then waited for the slowest rank); otherwise when it called the reduce.
        timer = self.comm_timer
        arrived = timer.arrived if timer is not None and timer.arrived > self.step_started else reduce_started
        self.arrival_seconds = arrived - self.step_started
        self.comm_seconds = reduced_at - arrived
        if not reduced.applied:  # abandoned: the next group retries the same global batch
            self.optimizer.zero_grad(set_to_none=True)
            self.sampler.load_state_dict(start)
            return reduced
        if t.grad_clip > 0:
            clip = getattr(self.model, "clip_grad_norm_", None)
            if clip is not None:
                clip(t.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), t.grad_clip)
        if self.sample_log is not None:  # before the step: a crash in its outer sync leaves the record
            write_record(self.sample_log, step=self.step, ids=torch.cat(read_ids), epoch=start["epoch"],
                         params=self.model.parameters(), loss=float(loss_sum), rank=where.rank)
        syncs = getattr(self.outer_sync, "outer_syncs", None)
        stepped = time.perf_counter()
        self.optimizer.step()  # an outer sync (DiLoCo, local SGD) runs in its post-step hook
        if syncs is not None and self.outer_sync.outer_syncs != syncs:
            seconds = time.perf_counter() - stepped
            self.comm_seconds += seconds
            if self.report is not None:
                self.report.event("outer_sync", self.step + 1, seconds=round(seconds, 4),
                                  syncs=self.outer_sync.outer_syncs)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return reduced

    def items_per_rank(self, targets: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The step's count of targets that count (not padding, not IGNORE_INDEX), averaged over
        the data-parallel ranks, when the loss is the built-in cross-entropy; None otherwise.

        Dividing each rank's loss sum by it makes the step's loss the mean over every item of the
        global batch, which DDP/FSDP's averaging of the gradients then keeps, as torchtitan and
        transformers (num_items_in_batch) do: 1, 2 or 4 ranks and any train.grad_accum give one
        loss on padded data. One scalar all-reduce per step. Replicas that average parameters
        (DiLoCo, local SGD) or come and go (fault tolerance) count their own items."""
        counts = [self.model.loss.items(y, every_target_counts=self.every_target_counts) for y in targets]
        if any(c is None for c in counts):
            return None
        local = self.outer_sync is not None or self.sync.weights_by_samples or self.counts_agree()
        if isinstance(counts[0], int):  # every target counts (all counts are ints): no tensor operation
            if local:
                return torch.tensor(float(max(1, sum(counts))), device=targets[0].device)
            count = torch.tensor(float(sum(counts)), device=targets[0].device)
        else:
            count = torch.stack(counts).sum().float()
        if not local:
            count = self.means_over_dp(count)
        return torch.where(count > 0, count, torch.ones_like(count))  # nothing counts: a loss of 0, not NaN

    def counts_agree(self) -> bool:
        """Whether every data-parallel rank counts the same items this step without asking the others:
        the data promises that every target counts (`every_target_counts`: token windows have no
        padding) and the micro-batch splits evenly, so each rank's targets have one shape. The mean
        over the ranks is then this rank's own count, exactly, and the step saves an all-reduce."""
        return self.every_target_counts and self.micro_batch % self.where.dp_size == 0

    def means_and_stop(self, values: torch.Tensor, timing: list[float] | None = None
                       ) -> tuple[torch.Tensor, bool, tuple[list[str], list[list[float]]] | None]:
        """`values` averaged over the ranks (in fp64: a sum of a few fp32 losses is exact in any
        order), whether any rank was asked to stop (SIGTERM and the like, shoal/runtime/preempt.py),
        and, given `timing` (this rank's window of per-rank timing, RankTiming.due), every rank's
        (labels, rows): all in the one all-reduce the loss needs anyway. Each rank writes its
        timing in its own slots of a block that is zero elsewhere, so the sum is every rank's
        values, exactly."""
        asked = preempt.requested() > 0 and not self.sync.agrees_on_stop
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return values, asked, (None if timing is None else (["0"], [timing]))
        world, rank, width = dist.get_world_size(), dist.get_rank(), len(timing or ())
        vector = values.detach().reshape(-1).tolist() + [float(asked)] + [0.0] * (world * width)
        start = values.numel() + 1 + rank * width
        vector[start:start + width] = timing or []
        summed = torch.tensor(vector, dtype=torch.float64, device=values.device)
        dist.all_reduce(summed)
        means = (summed[:values.numel()] / world).reshape(values.shape)
        gathered = None
        if timing is not None:
            rows = summed[values.numel() + 1:].view(world, width).tolist()
            gathered = ([str(r) for r in range(world)], rows)
        return means, bool(summed[values.numel()] > 0), gathered

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
        """Mean loss over `eval_batches` fixed batches of held-out data (no effect on training state):
        over every target that counts, as in training, when the loss is the built-in cross-entropy."""
        t, where = self.cfg.train, self.where
        sampler = ShardedSampler(len(self.val_set), min(self.micro_batch, len(self.val_set) // where.dp_size
                                                        * where.dp_size), t.seed, shuffle=False)
        self.model.train(False)
        total = torch.zeros((), device=where.device)
        counted = torch.zeros((), device=where.device)
        by_items = False  # the same on every rank (the loss and the targets' dtype decide), so are the collectives
        for _ in range(t.eval_batches):
            inputs, targets = (to_device(x, where.device) for x in self.val_set.get(sampler.next_batch(
                where.dp_rank, where.dp_size)))
            items = self.model.loss.items(targets)
            with self.autocast:  # with a count: the batch's sum (divided by 1), added up, then / all items
                total += self.model.evaluate(inputs, targets, None if items is None else torch.ones(())).float()
            if items is not None:
                counted, by_items = counted + items, True
        self.model.train(True)
        if by_items:
            total_and_count = self.means_over_dp(torch.stack([total, counted]))
            return float(total_and_count[0] / total_and_count[1].clamp(min=1))
        return self.mean_over_dp(total / t.eval_batches)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> list[float]:
        """Train to `train.steps`; returns the loss of every step this call trained."""
        t, ck = self.cfg.train, self.cfg.checkpoint
        tokens_per_sample = getattr(self.train_set, "tokens_per_sample", 1)
        unit = "tokens" if tokens_per_sample > 1 else "samples"
        shown = self.where.master and self.sync.shows_progress
        report = StepReporter(self.run_dir, total_steps=t.steps, start_step=self.step, unit=unit,
                              progress_mode=self.cfg.log.progress if shown else "off", every=self.cfg.log.every,
                              tensorboard=self.cfg.log.tensorboard, writes_metrics=self.sync.writes_metrics,
                              average=lambda values: self.means_and_stop(values)[:2],
                              loggers=lambda: open_loggers(self.cfg, self.run_dir))
        # Outer-sync methods (DiLoCo) exist to keep the link quiet between syncs: their ranks' losses
        # wait in the reporter and are averaged every `log.every` steps in one all-reduce.
        every_step = self.outer_sync is None
        self.report = report
        if self.step:
            report.event("resumed", self.step)
        gather = getattr(self.sync, "timing_gather", None)
        timing = RankTiming(self.cfg.log.every, gather() if gather is not None else gather_over_group)
        self.model.train(True)
        try:
            while self.step < t.steps:
                if self.checkpointer is not None:
                    self.checkpointer.poll()
                self.data_seconds = 0.0
                started = self.step_started = time.perf_counter()
                outcome = self.train_step()
                if not outcome.applied:
                    continue
                loss, stop, gathered = outcome.loss, False, None
                compute = max(0.0, self.arrival_seconds - self.data_seconds)
                timing.add(data=self.data_seconds, compute=compute, arrival=self.arrival_seconds)
                if every_step and not outcome.loss_is_mean:  # gradients travel every step; so do the loss and a stop
                    # (and, at a window's end, every rank's timing, when no other channel carries it)
                    window = timing.due(self.step) if gather is None else None
                    loss, stop, gathered = self.means_and_stop(loss, window)
                seconds = time.perf_counter() - started
                report.add(loss, {
                    "time": round(time.time(), 3),  # when the step ended, not when its loss was averaged
                    "step": self.step, "lr": lr_at(self.step - 1, t), "step_seconds": seconds,
                    "data_seconds": self.data_seconds, "compute_seconds": compute,
                    "arrival_seconds": self.arrival_seconds, "comm_seconds": self.comm_seconds,
                    f"{unit}_per_second": t.batch_size * tokens_per_sample / seconds,
                    "samples": self.step * t.batch_size, "world_size": self.where.dp_size})
                if every_step or self.step % self.cfg.log.every == 0 or self.step == t.steps:
                    stop = report.publish(averaged=every_step) or stop
                self.move_to_outer_sync_step()  # after the step is reported under its own number; before any save
                ranks = timing.summary(self.step, gathered)
                if ranks is not None:
                    report.ranks(ranks, timing.straggler(ranks))
                if stop and self.step < t.steps:  # preempted: every rank stops after this same step
                    report.event("preempted", self.step, signal=signal.Signals(preempt.requested() or
                                                                               signal.SIGTERM).name)
                    self.save()
                    if self.checkpointer is not None:
                        self.checkpointer.wait()
                    raise preempt.Preempted(preempt.requested() or signal.SIGTERM, self.step)
                if t.eval_every and self.step % t.eval_every == 0:
                    report.evaluated(self.step, self.evaluate())
                if ck.every and self.step % ck.every == 0 and self.step < t.steps:
                    self.save()
            self.save()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            report.close()
            self.report = None
        return report.losses
