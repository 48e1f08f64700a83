"""One step's gradient average over the replicas of a generation, and what they agree on.

The replicas sum, in one all-reduce over the generation's group, their gradients weighted by their
sample counts, their sample-weighted losses and whether any of them was asked to regroup. In a
replica group these are the local shards FSDP's reduce-scatter left (lane j averages shard j of
every group), and the lanes then agree, by one small all-reduce over their own group, on whether
every lane's average completed: a group commits or abandons a step as one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shoal.fault.agreement import StepOutcome
from shoal.fault.audit import write_record
from shoal.fault.errors import GenerationBroken
from shoal.fault.generation import Generation
from shoal.fault.replica import Replica
from shoal.fault.state import TrainingHost
from shoal.fault.progress import Progress
from shoal.fault.store import ReplicaStore
from shoal.runtime import preempt
from shoal.sync.replica_state import local_tensor

log = logging.getLogger("shoal")

SAMPLES, LOSS_SUM, RECONFIGURE = -3, -2, -1
"""The slots after the gradients in the vector each step's all-reduce sums: the replicas' samples, their
sample-weighted losses, and whether any of them was asked to regroup after this step."""


class GradientAverage:
    """The per-step reduce of a fault-tolerant replica (`Replicas.reduce` between outer syncs)."""

    def __init__(self, store: ReplicaStore, generation: Generation, replica: Replica, progress: Progress, *,
                 sample_log: Path | None = None):
        self.store, self.generation, self.replica, self.progress = store, generation, replica, progress
        self.sample_log = sample_log
        """A file this worker appends the global sample ids of every step it commits to (tests, benchmark)."""

    def reduce(self, host: TrainingHost, samples: int, loss: torch.Tensor, step_start: dict) -> StepOutcome:
        """Average gradients over the generation, weighted by each replica's sample count: committed
        with the global mean loss (regrouped when the members regroup before the next step), or
        abandoned (nothing may be applied). `step_start` is the data position the step began at."""
        generation, replica, step = self.generation, self.replica, host.step
        params = list(host.parameters())
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in params]
        # A stop signal to this worker makes every member regroup after this step, which it leaves.
        reconfigure = 1.0 if preempt.requested() or generation.reconfigure_requested() else 0.0
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = torch.cat([flat * samples, torch.tensor([float(samples), float(loss) * samples, reconfigure])])
        failure = self._all_reduce(flat, step)
        # A group commits only if every lane's all-reduce completed; it regroups if any lane
        # was asked to, or the generation was aborted meanwhile.
        ok = failure is None
        regroup = float(ok and flat[RECONFIGURE] > 0) + float(replica.grouped and generation.aborted())
        agreed = replica.agree({"completed": float(ok), "regroup": regroup,
                                "loss_sum": float(flat[LOSS_SUM]) if ok else 0.0,
                                "samples": float(flat[SAMPLES]) if ok else 0.0,
                                "store_lost": float(self.store.lost is not None)}, f"step {step}")
        self.store.stop_if_lost(agreed["store_lost"])  # before anything is applied: every lane stops at this step
        if agreed["completed"] < replica.group_size:
            log.warning("step %d abandoned in generation %d: %s", step, generation.number,
                        failure or "another lane of this replica group failed")
            return StepOutcome.abandoned()
        self._apply(params, grads, flat)
        mean_loss = torch.tensor(agreed["loss_sum"] / agreed["samples"]).float()  # every lane: all the step's samples
        self.progress.publish(step + 1, float(mean_loss))
        if self.sample_log is not None:
            write_record(self.sample_log, step=step, ids=host.global_batch_ids(step_start),
                         epoch=step_start["epoch"], params=host.parameters(), loss=float(mean_loss),
                         member=replica.member, lane=replica.lane, gen=generation.number, size=generation.size)
        return StepOutcome.committed(mean_loss, loss_is_mean=True, regroup=agreed["regroup"] > 0)

    def _all_reduce(self, flat: torch.Tensor, step: int) -> GenerationBroken | None:
        """Sum `flat` over the generation in place; the failure when the generation broke."""
        generation = self.generation
        try:
            generation.fire("before", step)
            work = generation.pg.allreduce([flat])
            generation.fire("during", step)
            generation.wait(work, "allreduce", step)
            generation.fire("after", step)
        except GenerationBroken as err:
            return err
        return None

    def _apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Put the sample-weighted mean of every gradient where the optimizer reads it."""
        total = flat[SAMPLES]
        offset = 0
        for p, g in zip(params, grads):
            mean = flat[offset:offset + g.numel()] / total
            if self.replica.grouped:
                g.copy_(mean.view_as(g))  # g aliases the DTensor gradient's local shard
            else:
                p.grad = mean.view_as(p)
            offset += g.numel()
