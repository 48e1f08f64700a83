"""Per-step membership for fault-tolerant data parallelism: the worker's side, as the Trainer sees it.

In fault-tolerant mode the unit of membership is a *replica*: one worker holding the whole model
(DDP-like), or a replica group of `parallel.dp_shard` workers that shard it with FSDP2 over a
default process group of their own (HSDP-like, shoal/fault/replica.py). Each step the replicas
average their gradients over the process group of the current *generation*
(shoal/fault/generation.py, shoal/fault/average.py). When the average fails (a peer died), times
out (a peer hangs) or the coordinator aborts the generation (the launcher saw a peer exit), the
step is abandoned before anything is applied and the worker asks the coordinator
(shoal/fault/membership.py, in the launcher) for the next generation, receiving the training state
from a live peer when it lacks it (shoal/fault/join.py). The approach follows torchft's per-step
quorum (Rice et al., "TorchFT", 2025), with membership kept in the c10d store of the launcher
(shoal/fault/store.py) instead of a separate lighthouse.

`Replicas` is the one object the Trainer knows of all this: `begin_step` gives the step's
data-parallel rank and size (joining a generation first when needed) and `reduce` returns a typed
`StepOutcome` (committed, regrouped or abandoned).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from shoal.config import Config
from shoal.fault import chaos
from shoal.fault.agreement import Outcome, StepOutcome
from shoal.fault.average import GradientAverage
from shoal.fault.errors import GenerationBroken
from shoal.fault.generation import Generation
from shoal.fault.join import Joiner
from shoal.fault.replica import Replica
from shoal.fault.state import TrainingHost
from shoal.fault.progress import Progress
from shoal.fault.store import ReplicaStore
from shoal.runtime.protocol import CHAOS_ENV, SAMPLE_LOG_ENV

log = logging.getLogger("shoal")


class OuterSync(Protocol):
    """An outer sync over the replicas (ElasticDiLoCo, shoal/fault/outer.py), as a step sees it."""

    def owed_sync(self, host: TrainingHost) -> bool:
        """Complete a sync this replica joined in the middle of; True when it did (no step of its own now)."""


class Replicas:
    """This worker's membership in the changing group of replicas: the gradient agreement the
    Trainer asks for the step's data-parallel rank and size (`begin_step`) and for the gradient
    average (`reduce`)."""

    agrees_on_stop = True
    """A stop signal makes every member regroup after the step, which the stopped worker leaves."""
    shows_progress = False
    """The launcher shows the job's progress (shoal/observe/fleet.py): any worker may die."""
    weights_by_samples = True
    """`reduce` weights each replica's gradients by its sample count (each counts its own items)."""

    def __init__(self, store: dist.Store, *, member: int, slot: int, incarnation: int, cfg: Config,
                 lane: int = 0, group_size: int = 1,
                 chaos_points: chaos.ChaosPoints | None = None, sample_log: Path | None = None):
        self.cfg = cfg
        self.replica = Replica(member, lane, group_size, slot, incarnation)
        self.store = ReplicaStore(store, self.replica)
        self.generation = Generation(self.store, self.replica, timeout=timedelta(seconds=cfg.fault.step_timeout),
                                     chaos_points=chaos_points)
        self.progress = Progress(self.store, self.generation, total_steps=cfg.train.steps)
        self.joiner = Joiner(self.store, self.generation, self.replica, join_timeout=cfg.fault.join_timeout)
        name = f"member{member}.jsonl" if group_size == 1 else f"member{member}.lane{lane}.jsonl"
        self.sample_log = sample_log / name if sample_log else None
        """Where the global sample ids of every committed step go (tests, benchmark); None: nowhere."""
        self.average = GradientAverage(self.store, self.generation, self.replica, self.progress,
                                       sample_log=self.sample_log)
        self.needs_join = True
        self.step_start: dict | None = None  # the data position the step in flight began at
        self.step_started = -1
        self.outer: OuterSync | None = None
        """The outer sync (DiLoCo, shoal/fault/outer.py) when replicas average parameters at syncs."""
        self.host: TrainingHost | None = None
        """The training run this replica belongs to (`attach`)."""

    @classmethod
    def from_env(cls, cfg: Config) -> Replicas:
        """The replica the fault-tolerant supervisor started (shoal/launch/supervisor.py), or a
        worker that joins a running job from elsewhere; a replica group's worker also joins its
        group's default process group here."""
        store = ReplicaStore.connect(cfg.fault.step_timeout)
        replica = Replica.from_env(store)
        if replica.grouped:
            replica.join_group(store, cfg.fault.step_timeout)
        spec = os.environ.get(CHAOS_ENV)
        points = chaos.ChaosPoints(chaos.parse(spec), slot=replica.slot, nproc=cfg.launch.nproc, seed=cfg.train.seed,
                                   claim=lambda k, gen: chaos.claim(store, k, gen),
                                   fired_in=lambda k: chaos.fired_in(store, k),
                                   hold=lambda until: chaos.hold(store, replica.slot, until)) if spec else None
        sample_log = Path(os.environ[SAMPLE_LOG_ENV]) if os.environ.get(SAMPLE_LOG_ENV) else None
        return cls(store, member=replica.member, slot=replica.slot, incarnation=replica.incarnation, cfg=cfg,
                   lane=replica.lane, group_size=replica.group_size, chaos_points=points, sample_log=sample_log)

    def attach(self, host: TrainingHost) -> None:
        """Train `host` (shoal/fault/host.py, built by the worker from the run's parts) from now on."""
        self.host = host

    def follow_outer_sync(self, outer: OuterSync | None) -> None:
        """From now on the replicas average parameters at `outer`'s syncs (DiLoCo, shoal/fault/outer.py),
        not gradients every step, and membership changes wait for those syncs, where they meet;
        None: back to averaging gradients every step (the outer sync's context ended)."""
        self.outer = outer

    def regroup(self) -> None:
        """Form a new generation before the next collective (a sync failed, or joiners wait)."""
        self.needs_join = True

    def rollback(self) -> None:
        """Undo the data position of a step interrupted before its optimizer step (the store
        was lost mid-step), so a checkpoint saved now resumes at that step's batch."""
        if self.step_start is not None and self.step_started == self.host.step:
            self.host.set_data_position(self.step_start)

    @property
    def is_master(self) -> bool:
        """Rank 0 of the current generation saves checkpoints and writes metrics (a worker that
        never joined a generation holds no training state to save)."""
        generation = self.generation
        return generation.rank == 0 and generation.number >= 0 and self.joiner.has_state

    # -- the step ----------------------------------------------------------------------
    def begin_step(self) -> tuple[int, int] | None:
        """Join a generation if this worker has none (or its generation was aborted); returns
        this step's (dp_rank, dp_size), or None when there is no step of its own to train (it
        joined in the middle of an outer sync and completed it)."""
        host, generation, replica = self.host, self.generation, self.replica
        generation.groups.reap()
        self.joiner.save_if_left_alone(host)
        # A replica group learns of an abort inside `reduce`, where its ranks agree on it; read
        # here, one rank could see it and another not, and the group would split. Under an outer
        # sync replicas regroup only at syncs, where they meet.
        while self.needs_join or (not replica.grouped and self.outer is None and generation.aborted()):
            self.needs_join = True
            try:
                self.joiner.join(host)
                self.needs_join = False
            except GenerationBroken as err:
                log.warning("generation %d broke while forming: %s", generation.number, err)
        if self.outer is not None and self.outer.owed_sync(host):
            return None
        self.step_start = host.data_position()
        self.step_started = host.step
        generation.mark(host.step, "forward/backward")
        # Split the global batch among the replicas, then among the ranks of each group: with a
        # micro-batch that divides by the group size, the ranks of a group get equal shares, so
        # FSDP's plain mean inside the group is the group's sample-weighted mean.
        return generation.rank * replica.group_size + replica.lane, generation.size * replica.group_size

    def reduce(self, samples: int, loss: torch.Tensor) -> StepOutcome:
        """Average gradients over the generation (shoal/fault/average.py): committed, regrouped (the
        members regroup before the next step) or abandoned (nothing may be applied). Under an outer
        sync (DiLoCo) the replicas average parameters every few steps instead (shoal/fault/outer.py):
        committed with this replica's loss."""
        host = self.host
        if self.outer is not None:  # done without a gradient average: tell the launcher, fire chaos set for it
            self.generation.fire("before", host.step)
            self.progress.publish(host.step + 1, float(loss))
            return StepOutcome.committed(loss)
        outcome = self.average.reduce(host, samples, loss, self.step_start)
        if outcome.outcome is not Outcome.COMMITTED:  # abandoned, or joiners wait (or a replica left)
            self.needs_join = True
        return outcome

    # -- what this worker does for the run -------------------------------------------------
    def writes_metrics(self) -> bool:
        """The first worker of the current generation writes metrics.jsonl (they go on when worker 0 dies)."""
        return self.is_master and self.replica.lane == 0

    def saves_checkpoints(self) -> bool:
        return self.is_master

    def timing_gather(self) -> Callable:
        """How per-rank timing reaches the logging member (shoal/observe/ranks.py): through the
        store, as there is no default process group; a rank is named `member` (`member.lane` in
        a replica group)."""
        from shoal.observe.ranks import gather_over_store
        replica, generation = self.replica, self.generation
        gather = gather_over_store(
            self.store.store, label=replica.label(replica.member, replica.lane), logs=self.writes_metrics,
            members=lambda: [replica.label(m, lane) for m in generation.members for lane in range(replica.group_size)])
        return lambda window, values: self.store.call(lambda: gather(window, values), None)
