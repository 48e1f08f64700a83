"""DiLoCo whose replicas come and go: the outer sync on top of per-step membership.

In fault-tolerant mode (shoal/fault/elastic.py) the replicas of a generation average their
gradients every step. With `sync.method = "diloco"` they talk only at outer syncs, so
membership changes there too:

- Between syncs nobody regroups: a replica that dies mid-phase is noticed at the next sync
  (its all-reduce fails, or the coordinator has aborted the generation); what it trained
  since the last sync is lost, and the survivors' syncs go on without it.
- At a sync, a failed average is retried over the next generation with the same
  pseudo-gradients (the survivors' local parameters have not moved).
- A replica joins at a sync: the coordinator's request to regroup travels with the
  average, and after the outer step the members regroup with the joiner, which receives
  the outer parameters, the outer momentum and the inner state from a live peer.
- A replica that received state during a failed sync holds another replica's unsynced
  progress; it takes part in the retry with weight 0, so no replica counts twice.

The average is weighted: one small all-reduce agrees on the weights (and on whether to
regroup afterwards), then the pseudo-gradients travel as configured (fp32, fp16, bf16,
int8, int4, fp4, topk), each scaled by its weight's share. A failed sync leaves top-k's
error-feedback residual as it was before the attempt, so the retry sends the same values.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import nn

from shoal.fault.elastic import Replicas
from shoal.fault.errors import GenerationBroken
from shoal.fault.state import TrainingHost, materialize_optimizer_state
from shoal.sync.diloco import WIRE_DTYPE, DiLoCo, Fragment
from shoal.sync.encoding import decode_average
from shoal.sync.outer_settings import outer_options

log = logging.getLogger("shoal")


class ElasticDiLoCo(DiLoCo):
    """DiLoCo over the changing replicas of a fault-tolerant job (no overlap: a sync that
    fails must be retried before the outer step). It changes DiLoCo only through its hooks:
    replicas start equal without a collective (`start_equal`), the average is the retried,
    weighted one below (`reduce_outer_gradient`), and each outer step is recorded for the
    tests (`outer_stepped`)."""

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, replicas: Replicas,
                 host: TrainingHost, **options: Any):
        options["overlap"] = False
        super().__init__(model, inner_optimizer, group=None, **options)
        self.replicas, self.host = replicas, host
        self.generation = replicas.generation
        # A replica whose local fragment is another's unsynced progress (received mid-sync).
        self.borrowed = [False] * len(self.fragments)
        self.syncing = -1  # the fragment whose sync is under way (a joiner received mid-way finishes it)
        self.owed = -1
        self._counters = torch.zeros(3, dtype=torch.int64)
        self.last_weight = 0.0  # replicas that counted in the last average
        for fragment in self.fragments:
            # Present from the start, so every replica's transferable state has one layout; a
            # zero buffer makes SGD's first momentum step equal to the one without a buffer.
            if fragment.optimizer.defaults["momentum"]:
                for outer in fragment.outer:
                    fragment.optimizer.state[outer]["momentum_buffer"] = torch.zeros_like(outer)

    def __enter__(self) -> ElasticDiLoCo:
        # The inner optimizer's state must exist before the hook counts steps: creating it later
        # (for a state transfer) takes an optimizer step that is not an inner step.
        materialize_optimizer_state(self.inner_optimizer)
        super().__enter__()
        self.replicas.follow_outer_sync(self)  # and membership changes wait for the next sync
        self.host.follow_outer_sync(self)  # a joiner receives the outer state with the inner
        return self

    def start_equal(self) -> None:
        """Replicas start equal without a collective: the first launch's share one seed (or one
        checkpoint), every later one receives its state from a live peer."""

    def __exit__(self, *exc) -> None:
        self.replicas.follow_outer_sync(None)
        self.host.follow_outer_sync(None)
        super().__exit__(*exc)

    # -- state that travels to a joining replica ---------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """The outer state, as tensors in an order every replica agrees on (copied into in place)."""
        self._counters.copy_(torch.tensor([self.inner_step, self.outer_syncs, self.syncing]))
        tensors = [self._counters]
        for fragment in self.fragments:
            tensors += fragment.outer
            tensors += [fragment.optimizer.state[o]["momentum_buffer"] for o in fragment.outer
                        if "momentum_buffer" in fragment.optimizer.state[o]]
        return tensors

    def state_received(self) -> None:
        """After `state_tensors()` (and the model) were overwritten by a peer's."""
        self.inner_step, self.outer_syncs, self.owed = (int(v) for v in self._counters)
        with torch.no_grad():
            self.borrowed = [any(not torch.equal(p.float(), o) for p, o in zip(f.local, f.outer))
                             for f in self.fragments]

    def owed_sync(self, host: TrainingHost) -> bool:
        """A replica that received its state in the middle of a sync takes part in the rest of it
        (with weight 0) and completes the step the sender was in; True when it did."""
        if self.owed < 0:
            return False
        fragment, self.owed = self.fragments[self.owed], -1
        log.info("joined during the outer sync of step %d: taking part with weight 0", host.step + 1)
        self.sync(fragment)
        host.set_step(host.step + 1)  # the sender's step ended with this sync
        return True

    # -- the sync ------------------------------------------------------------------------
    def reduce_outer_gradient(self, fragment: Fragment, pseudo: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """The weighted average over the generation, retried over the next one until it completes."""
        index = self.fragments.index(fragment)
        replicas, host = self.replicas, self.host
        self.syncing = index
        # The retry of a failed sync sends the same values: top-k's residual goes back to before it.
        residual = fragment.encoding.state_dict() if fragment.encoding is not None else {}
        while True:
            try:
                average, regroup = self._average(index, pseudo)
                break
            except GenerationBroken as err:
                if residual:
                    fragment.encoding.load_state_dict(residual)
                log.warning("outer sync at step %d failed in generation %d: %s; retrying with the next",
                            host.step, self.generation.number, err)
                replicas.regroup()
                host.place(*replicas.begin_step())  # no sync is owed here: always a placement
                # A state received while regrouping may have moved the local parameters.
                pseudo = fragment.pseudo_gradient()
        self.borrowed[index], self.syncing = False, -1
        if regroup:  # joiners wait (or a member left): regroup after this sync, joiners get the result
            replicas.regroup()
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(average)
        return done

    def _average(self, index: int, pseudo: torch.Tensor) -> tuple[torch.Tensor, bool]:
        generation, step = self.generation, self.host.step
        fragment = self.fragments[index]
        weight = 0.0 if self.borrowed[index] else 1.0
        reconfigure = 1.0 if generation.reconfigure_requested() else 0.0
        head = torch.tensor([weight, reconfigure], dtype=torch.float64)
        generation.mark(step, "in outer sync")
        generation.fire("during", step)
        generation.wait(generation.pg.allreduce([head]), "outer sync (weights)", step)
        self.last_weight = float(head[0])
        share = weight / self.last_weight
        if fragment.encoding is not None:  # int8, int4, fp4, topk: one payload per replica, gathered
            # The gathered payloads are averaged; scaled by the group size, the average is the sum.
            future = self._gather_encoded(fragment, pseudo * (share * generation.size))
        else:
            wire = (pseudo * share).to(WIRE_DTYPE[self.compression])
            future = generation.pg.allreduce([wire]).get_future().then(lambda _: wire.float())
        average = generation.wait(future, "outer sync", step)
        self.replicas.progress.publish(step, float("nan"), outer_syncs=self.outer_syncs + 1)
        return average, head[1] > 0

    def _gather_encoded(self, fragment: Fragment, scaled: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """An encoded outer gradient over the generation's Gloo group: one all-gather of every replica's
        payload (for int8/int4 the same codes and arithmetic as compress.quantized_all_reduce)."""
        encoding, size = fragment.encoding, self.generation.size
        payload = encoding.encode(scaled)
        gathered = torch.empty(size * payload.numel(), dtype=torch.uint8)
        work = self.generation.pg.allgather([list(gathered.view(size, -1).unbind())], [payload])
        return work.get_future().then(lambda _: decode_average(gathered.view(size, -1), encoding))

    def outer_stepped(self, fragment: Fragment) -> None:
        """What the tests check: every replica holds the same outer parameters after each sync."""
        replicas = self.replicas
        if replicas.sample_log is None:
            return
        outer = torch.cat([o.reshape(-1) for o in fragment.outer])
        record = {"sync": self.outer_syncs, "step": self.host.step + 1, "member": replicas.replica.member,
                  "gen": self.generation.number, "size": self.generation.size, "weight": self.last_weight,
                  "outer": hashlib.sha1(outer.numpy().tobytes()).hexdigest()}
        with open(replicas.sample_log.with_suffix(".outer"), "a") as f:
            f.write(json.dumps(record) + "\n")


def elastic_outer_sync(cfg, model: nn.Module, optimizer: torch.optim.Optimizer, replicas: Replicas,
                       host: TrainingHost) -> ElasticDiLoCo:
    """`[sync]` diloco under per-step fault tolerance (shoal/launch/supervisor.py checks the rest)."""
    # The outer step is tuned for the replicas the job is launched with (no generation exists yet
    # here); it stays when one drops out.
    launched = max(1, replicas.cfg.launch.nproc // replicas.replica.group_size)
    return ElasticDiLoCo(model, optimizer, replicas=replicas, host=host, fragments=1,
                         **outer_options(cfg, launched))
