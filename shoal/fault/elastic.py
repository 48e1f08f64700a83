"""Per-step membership for fault-tolerant data parallelism: the worker's side.

In fault-tolerant mode the unit of membership is a *replica*: one worker holding the whole
model (DDP-like), or a replica group of `parallel.dp_shard` workers that shard it with FSDP2
over a default process group of their own (HSDP-like). Each step the replicas average their
gradients over the process group of the current *generation*, a `ProcessGroupGloo` built on
`PrefixStore("shoal/ft/pg/<g>")` over the launcher's TCPStore, so a new generation never
meets the keys of an old one. In a replica group, rank j of every group is in *lane* j: the
generation has one such group per lane (`shoal/ft/pg/<g>/lane<j>`) that averages the local
gradient shards FSDP's reduce-scatter left, and the ranks of a group agree on every
decision (commit or abandon, regroup, accept a state transfer) by one small all-reduce over
their own group, so a group never splits. When the all-reduce fails (a
peer died), times out (a peer hangs) or the coordinator aborts the generation (the
launcher saw a peer exit), the step is abandoned before anything is applied and the
worker asks the coordinator (shoal/fault/membership.py, in the launcher) for the next
generation. A worker without current state (a replacement, a joiner, or one that missed
a step the others committed) receives parameters, optimizer state, step, RNG and data
position from a live peer by one broadcast over the new group (per lane: each rank receives
its own shards from the same rank of the source group). The approach follows
torchft's per-step quorum (Rice et al., "TorchFT", 2025), with membership kept in the
c10d store of the launcher instead of a separate lighthouse.

Nothing is unpickled: requests and generations are JSON in the store, state is raw
tensor bytes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from shoal.config import Config
from shoal.fault import chaos
from shoal.fault.agreement import StepOutcome
from shoal.fault.audit import write_record
from shoal.fault.groups import Collective, GenerationGroups, finished
from shoal.fault.state import TrainingHost, pack_state, unpack_state
from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from shoal.runtime import preempt
from shoal.runtime import protocol as keys
from shoal.runtime.protocol import CHAOS_ENV, INCARNATION_ENV, MEMBER_ENV, SAMPLE_LOG_ENV, SLOT_ENV, STORE_ENV
from shoal.sync.replica_state import local_tensor

log = logging.getLogger("shoal")

"""A folder: each worker appends the global sample ids of every step it commits (tests, benchmark)."""
POLL = timedelta(milliseconds=20)
PUBLISH_EVERY = 0.1
"""Seconds between progress records (the launcher's display reads one every 0.25 s): a store round
trip per step costs a few percent of a small model's step."""
SAMPLES, LOSS_SUM, RECONFIGURE = -3, -2, -1
"""The slots after the gradients in the vector each step's all-reduce sums: the replicas' samples, their
sample-weighted losses, and whether any of them was asked to regroup after this step."""


class GenerationBroken(Exception):
    """The current generation cannot finish this step; a new one must be formed."""


class StoreLost(RuntimeError):
    """The launcher's membership store is unreachable: the job stops with a checkpoint."""


class JobStopped(RuntimeError):
    """The coordinator ended the job (every worker with current state is gone)."""


class GroupBroken(RuntimeError):
    """A peer of this worker's own replica group is gone: the group cannot go on, and the
    supervisor restarts all of it (it kills the rest of the group in any case)."""


class Replicas:
    """This worker's membership in the changing group of replicas; the Trainer asks it for the
    step's data-parallel rank and size (`begin_step`) and for the gradient average (`reduce`).

    `member` numbers the replica (a worker, or a replica group whose workers share it);
    `lane` is this worker's rank inside its replica group (0 for a whole-model replica)."""

    agrees_on_stop = True
    """A stop signal makes every member regroup after the step, which the stopped worker leaves."""
    shows_progress = False
    """The launcher shows the job's progress (shoal/observe/fleet.py): any worker may die."""
    weights_by_samples = True
    """`reduce` weights each replica's gradients by its sample count (each counts its own items)."""

    def __init__(self, store: dist.Store, *, member: int, slot: int, incarnation: int, cfg: Config,
                 lane: int = 0, group_size: int = 1,
                 chaos_points: chaos.ChaosPoints | None = None, sample_log: Path | None = None):
        self.store, self.member, self.slot, self.cfg = store, member, slot, cfg
        self.lane, self.group_size = lane, group_size
        self.timeout = timedelta(seconds=cfg.fault.step_timeout)
        self.chaos = chaos_points
        name = f"member{member}.jsonl" if group_size == 1 else f"member{member}.lane{lane}.jsonl"
        self.sample_log = sample_log / name if sample_log else None
        self.gen, self.members, self.rank = -1, [member], 0
        self.groups = GenerationGroups(self.timeout)
        # A worker of the first launch has the state every first-launch worker has (same seed or
        # the same checkpoint); a restarted one must receive it from a peer.
        self.has_state = incarnation == 0
        self.needs_join = True
        self.committed = False  # whether the launcher was told that this member committed a step
        self.published = -PUBLISH_EVERY  # when progress was last published (time.monotonic())
        self.saved_alone = 0  # the step of the last checkpoint saved as the only holder of the state
        self.save_alone_pending = False
        self.outer = None
        """The outer sync (DiLoCo, shoal/fault/outer.py) when replicas average parameters at syncs."""
        self.seq = 0
        self.step_start: dict | None = None
        self.step_started = -1
        self.regroup_on_abort = True
        """False under an outer sync (DiLoCo): replicas then regroup only at syncs, where they meet."""
        self.host: TrainingHost | None = None
        """The training run this replica belongs to (`attach`)."""
        self.store_lost: StoreLost | None = None
        """In a replica group, the store failure a lane saw mid-step: it skips its other store calls
        and the lanes stop together where they next agree (`reduce`, `_join`)."""

    def attach(self, host: TrainingHost) -> None:
        """Train `host` (shoal/fault/host.py adapts the Trainer) from now on."""
        self.host = host

    def average_at_outer_syncs(self, outer) -> None:
        """From now on the replicas average parameters at `outer`'s syncs (DiLoCo, shoal/fault/outer.py),
        not gradients every step, and membership changes wait for those syncs, where they meet."""
        self.outer, self.regroup_on_abort = outer, False

    def average_every_step(self) -> None:
        """Back to averaging gradients every step (the outer sync's context ended)."""
        self.outer, self.regroup_on_abort = None, True

    def regroup(self) -> None:
        """Form a new generation before the next collective (a sync failed, or joiners wait)."""
        self.needs_join = True

    def rollback(self) -> None:
        """Undo the data position of a step interrupted before its optimizer step (the store
        was lost mid-step), so a checkpoint saved now resumes at that step's batch."""
        if self.step_start is not None and self.step_started == self.host.step:
            self.host.set_data_position(self.step_start)

    @classmethod
    def from_env(cls, cfg: Config) -> "Replicas":
        host, _, port = os.environ[STORE_ENV].rpartition(":")
        store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=max(cfg.fault.step_timeout, 10.0)),
                              wait_for_workers=False)
        # A worker not started by the supervisor (another host, a test) numbers itself and joins.
        started_here = MEMBER_ENV in os.environ
        member = int(os.environ[MEMBER_ENV]) if started_here else store.add(keys.NEXT_MEMBER, 1) - 1
        incarnation = int(os.environ.get(INCARNATION_ENV, 0)) if started_here else 1
        slot = int(os.environ.get(SLOT_ENV, -1))
        # A replica group's workers get RANK/WORLD_SIZE inside their group from the supervisor.
        lane, group_size = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if started_here \
            else (0, 1)
        if group_size > 1:
            # The group's own default process group, for FSDP: its keys are under the group's
            # member number, which a restarted group never reuses (docs/torch.md).
            dist.init_process_group("gloo", store=dist.PrefixStore(keys.replica_group_prefix(member), store), rank=lane,
                                    world_size=group_size,
                                    timeout=timedelta(seconds=max(2 * cfg.fault.step_timeout, 30.0)))
        spec = os.environ.get(CHAOS_ENV)
        points = chaos.ChaosPoints(chaos.parse(spec), slot=slot, nproc=cfg.launch.nproc, seed=cfg.train.seed,
                                   claim=lambda k, gen: chaos.claim(store, k, gen),
                                   fired_in=lambda k: chaos.fired_in(store, k)) if spec else None
        sample_log = Path(os.environ[SAMPLE_LOG_ENV]) if os.environ.get(SAMPLE_LOG_ENV) else None
        return cls(store, member=member, slot=slot, incarnation=incarnation, cfg=cfg, lane=lane,
                   group_size=group_size, chaos_points=points, sample_log=sample_log)

    @property
    def size(self) -> int:
        """Replicas (workers or replica groups) in the current generation."""
        return len(self.members)

    @property
    def pg(self) -> dist.ProcessGroup | None:
        """The current generation's process group (None between generations)."""
        return self.groups.pg

    @property
    def grouped(self) -> bool:
        return self.group_size > 1

    @property
    def log_id(self) -> int:
        """A number naming this worker's log file, unique in the job."""
        return self.member if not self.grouped else self.member * self.group_size + self.lane

    def writes_metrics(self) -> bool:
        """The first worker of the current generation writes metrics.jsonl (they go on when worker 0 dies)."""
        return self.is_master and self.lane == 0

    def saves_checkpoints(self) -> bool:
        return self.is_master

    def timing_gather(self):
        """How per-rank timing reaches the logging member (shoal/observe/ranks.py): through the
        store, as there is no default process group; a rank is named `member` (`member.lane` in
        a replica group)."""
        from shoal.observe.ranks import gather_over_store
        label = str(self.member) if not self.grouped else f"{self.member}.{self.lane}"
        gather = gather_over_store(
            self.store, label=label, logs=self.writes_metrics,
            members=lambda: [str(m) if not self.grouped else f"{m}.{lane}"
                             for m in self.members for lane in range(self.group_size)])
        return lambda window, values: self._store_call(lambda: gather(window, values), None)

    @property
    def is_master(self) -> bool:
        """Rank 0 of the current generation saves checkpoints and writes metrics (a worker that
        never joined a generation holds no training state to save)."""
        return self.rank == 0 and self.gen >= 0 and self.has_state

    # -- store access: a lost store ends the job cleanly instead of hanging it -----------
    def _store_call(self, call, fallback):
        """`call()`, or `fallback` once the store is lost. A whole-model replica stops at once; the
        lanes of a replica group may each see the loss at a different store call, so a lane only
        remembers it and carries on through the step's group collectives to the next agreement."""
        if self.store_lost is not None:
            return fallback
        try:
            return call()
        except (dist.DistNetworkError, ConnectionError) as err:
            self.store_lost = StoreLost(f"membership store unreachable: {str(err).splitlines()[0]}")
            if not self.grouped:
                raise self.store_lost from None
            return fallback

    def _check(self, key: str) -> bool:
        return self._store_call(lambda: self.store.check([key]), False)

    def _set(self, key: str, value: str) -> None:
        self._store_call(lambda: self.store.set(key, value), None)

    def _stop_if_lost(self, lost: float) -> None:
        """Raise StoreLost on every lane of a replica group when one of them lost the store (`lost`
        is the count the lanes agreed on)."""
        if lost > 0:
            raise self.store_lost or StoreLost("another lane of this replica group lost the membership store")

    # -- the step ----------------------------------------------------------------------
    def begin_step(self) -> tuple[int, int] | None:
        """Join a generation if this worker has none (or its generation was aborted); returns
        this step's (dp_rank, dp_size), or None when there is no step of its own to train (it
        joined in the middle of an outer sync and completed it)."""
        host = self.host
        self.groups.reap()
        if self.save_alone_pending and host.step > self.saved_alone:  # a step after it was left alone
            self.save_alone_pending = False
            self._save_alone(host)
        # A replica group learns of an abort inside `reduce`, where its ranks agree on it; read
        # here, one rank could see it and another not, and the group would split.
        while self.needs_join or (not self.grouped and self.regroup_on_abort
                                  and self._check(keys.abort(self.gen))):
            self.needs_join = True
            try:
                self._join(host)
            except GenerationBroken as err:
                log.warning("generation %d broke while forming: %s", self.gen, err)
        if self.outer is not None and self.outer.owed_sync(host):
            return None
        self.step_start = host.data_position()
        self.step_started = host.step
        self.mark(host.step, "forward/backward")
        # Split the global batch among the replicas, then among the ranks of each group: with a
        # micro-batch that divides by the group size, the ranks of a group get equal shares, so
        # FSDP's plain mean inside the group is the group's sample-weighted mean.
        return self.rank * self.group_size + self.lane, self.size * self.group_size

    def mark(self, step: int, what: str) -> None:
        """Say where this rank is ('step 7: in allreduce'): a hung rank's place is then named."""
        self._set(self._where_key(self.rank), f"step {step}: {what}")

    def reconfigure_requested(self) -> bool:
        """The coordinator asked the generation to regroup at its next agreement (joiners wait)."""
        return self._check(keys.reconfigure(self.gen))

    def _where_key(self, rank: int) -> str:
        return keys.where(self.gen, rank, self.lane if self.grouped else None)

    def _agree(self, values: dict[str, float], what: str) -> dict[str, float]:
        """Each value summed over the ranks of this replica group (its own process group), in one
        all-reduce. A failure means a peer of the group is gone: the whole group stops and is restarted."""
        total = torch.tensor(list(values.values()), dtype=torch.float64)
        if self.grouped:
            try:
                dist.all_reduce(total)
            except RuntimeError as err:
                raise GroupBroken(f"replica group {self.member} lost a worker ({what}): "
                                  f"{str(err).splitlines()[0][:200]}") from None
        return dict(zip(values, total.tolist()))

    def publish(self, step: int, loss: float, **extra) -> None:
        """Tell the launcher's progress display that `step` steps are done (shoal/observe/fleet.py):
        every PUBLISH_EVERY seconds, and always the first step, the last and an outer sync."""
        now = time.monotonic()
        if extra or not self.committed or step >= self.cfg.train.steps or now - self.published >= PUBLISH_EVERY:
            self._set(keys.PROGRESS, json.dumps({"step": step, "loss": loss, "gen": self.gen, "size": self.size,
                                                 **extra}))
            self.published = now
        self._say_committed()

    def publish_progress(self, step: int, loss: float) -> None:
        """Step `step` is done without a gradient average (an outer sync averages parameters
        every few steps instead): tell the launcher, and fire chaos set for this step."""
        self.fire("before", step - 1)
        self.publish(step, loss)

    def reduce(self, samples: int, loss: torch.Tensor) -> StepOutcome:
        """Average gradients over the generation, weighted by each replica's sample count: committed
        with the global mean loss (regrouped when the members regroup before the next step), or
        abandoned (nothing may be applied). Under an outer sync (DiLoCo) the replicas average
        parameters every few steps instead (shoal/fault/outer.py): committed with this replica's loss."""
        host = self.host
        if self.outer is not None:
            self.publish_progress(host.step + 1, float(loss))
            return StepOutcome.committed(loss)
        step = host.step
        params = list(host.parameters())
        # In a replica group these are the local shards FSDP's reduce-scatter left: lane j
        # averages shard j of every group.
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in params]
        # A stop signal to this worker makes every member regroup after this step, which it leaves.
        reconfigure = 1.0 if preempt.requested() or self._check(keys.reconfigure(self.gen)) else 0.0
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = torch.cat([flat * samples, torch.tensor([float(samples), float(loss) * samples, reconfigure])])
        failure = None
        try:
            self.fire("before", step)
            work = self.pg.allreduce([flat])
            self.fire("during", step)
            self.wait(work, "allreduce", step)
            self.fire("after", step)
        except GenerationBroken as err:
            failure = err
        # A group commits only if every lane's all-reduce completed; it regroups if any lane
        # was asked to, or the generation was aborted meanwhile.
        ok = failure is None
        regroup = float(ok and flat[RECONFIGURE] > 0) + float(self.grouped and self._check(keys.abort(self.gen)))
        agreed = self._agree({"completed": float(ok), "regroup": regroup,
                              "loss_sum": float(flat[LOSS_SUM]) if ok else 0.0,
                              "samples": float(flat[SAMPLES]) if ok else 0.0,
                              "store_lost": float(self.store_lost is not None)}, f"step {step}")
        self._stop_if_lost(agreed["store_lost"])  # before anything is applied: every lane stops at this step
        if agreed["completed"] < self.group_size:
            log.warning("step %d abandoned in generation %d: %s", step, self.gen,
                        failure or "another lane of this replica group failed")
            self.needs_join = True
            return StepOutcome.abandoned()
        total = flat[SAMPLES]
        offset = 0
        for p, g in zip(params, grads):
            mean = flat[offset:offset + g.numel()] / total
            if self.grouped:
                g.copy_(mean.view_as(g))  # g aliases the DTensor gradient's local shard
            else:
                p.grad = mean.view_as(p)
            offset += g.numel()
        if agreed["regroup"] > 0:  # joiners wait (or a replica left): every member regroups after this step
            self.needs_join = True
        mean_loss = torch.tensor(agreed["loss_sum"] / agreed["samples"]).float()  # every lane: all the step's samples
        self.publish(step + 1, float(mean_loss))
        if self.sample_log is not None:
            write_record(self.sample_log, step=step, ids=host.global_batch_ids(self.step_start),
                         epoch=self.step_start["epoch"], params=host.parameters(),
                         loss=float(mean_loss), member=self.member, lane=self.lane, gen=self.gen, size=self.size)
        return StepOutcome.committed(mean_loss, loss_is_mean=True, regroup=agreed["regroup"] > 0)

    def _save_alone(self, host: TrainingHost) -> None:
        log.info("the only worker holding the training state: saving a checkpoint at step %d", host.step)
        host.save_checkpoint(background=True)
        self.saved_alone = host.step

    def _say_committed(self) -> None:
        """Tell the launcher once that this member committed a step (a later crash is then no crash loop)."""
        if not self.committed:
            self._set(keys.committed(self.member), "1")
            self.committed = True

    def fire(self, point: str, step: int, *, is_source: bool = False) -> None:
        """Fire the chaos injections set for this point of this step (tests, benchmarks)."""
        if self.chaos is not None:
            self.chaos.fire(point, step, size=self.size, gen=self.gen, is_source=is_source)

    def wait(self, work: Collective, op: str, step: int):
        """Wait for a collective of this generation (its Work, or a Future chained on one), giving
        up when it fails, when the coordinator aborts the generation, or after step_timeout (then
        naming the ranks that never arrived). Returns what a Future holds."""
        self.groups.track(work)
        deadline = time.monotonic() + self.timeout.total_seconds()
        abort_key = keys.abort(self.gen)
        marked = False
        while True:
            if isinstance(work, dist.Work):
                try:
                    work.wait(POLL)  # returns as soon as it completes
                except RuntimeError:
                    pass
            elif not work.done():
                time.sleep(POLL.total_seconds())
            if finished(work):  # done, or failed: a peer died mid-way, or Gloo's own timeout came first
                try:
                    return work.wait()
                except RuntimeError as err:
                    if "Timed out" in str(err):  # a peer hangs
                        raise GenerationBroken(self._diagnose(op, step)) from None
                    raise GenerationBroken(f"{op} failed: {str(err).splitlines()[0][:200]}") from None
            if not marked:  # only a wait longer than one poll is marked: a hang's diagnosis needs no more
                self.mark(step, f"in {op}")
                marked = True
            if self._check(abort_key):
                raise GenerationBroken("the coordinator aborted the generation (a member left)")
            if self.store_lost is not None:
                raise GenerationBroken(str(self.store_lost))
            if time.monotonic() > deadline:
                raise GenerationBroken(self._diagnose(op, step))

    def _diagnose(self, op: str, step: int) -> str:
        """Which ranks of this generation did not reach `op`, and where they were last seen."""
        expected = f"step {step}: in {op}"
        missing = []
        for rank, member in enumerate(self.members):
            key = self._where_key(rank)
            seen = self._store_call(lambda: self.store.get(key).decode() if self.store.check([key]) else "not started",
                                    "unknown (store lost)")
            if seen != expected:
                who = f"worker {member}" if not self.grouped else f"replica group {member}, lane {self.lane}"
                missing.append(f"rank {rank} ({who}) last seen '{seen}'")
        text = (f"step {step}: {op} timed out after {self.timeout.total_seconds():.1f}s; did not arrive: "
                + ("; ".join(missing) or "none (all arrived; the network or the collective stalled)"))
        log.error(text)
        return text

    # -- membership --------------------------------------------------------------------
    def _join(self, host: TrainingHost) -> None:
        """Ask the coordinator for the next generation, build its group, sync state if needed."""
        self.groups.abandon()
        self.seq += 1
        if self.lane == 0:  # a replica group asks once; its ranks share step and state, and all join
            self._set(keys.ready(self.member), json.dumps({"seq": self.seq, "after": self.gen,
                                                             "step": host.step, "has_state": self.has_state,
                                                             "leaving": preempt.requested()}))
        log.info("asking to join after generation %d (step %d, %s)", self.gen, host.step,
                 "holding state" if self.has_state else "needing state")
        try:
            gen, info = self._store_call(self._await_assignment, (self.gen, None))
        except dist.DistStoreError:
            raise RuntimeError(f"worker {self.member} was not admitted within fault.join_timeout = "
                               f"{self.cfg.fault.join_timeout}s") from None
        if info is not None and info.get("stop"):
            if info.get("preempt"):  # every member stops at this committed step; the master saves
                raise preempt.Preempted(info["preempt"], host.step)
            raise JobStopped(info["stop"])
        if info is not None and self.member not in info["members"]:  # it asked to leave: no checkpoint of its own
            raise preempt.Preempted(preempt.requested() or signal.SIGTERM, host.step, save=False)
        # A lane that lost the store stops as a member of the generation it was in; so must its peers.
        previous = self.gen, self.members, self.rank
        if info is not None:
            self.gen, self.members = gen, info["members"]
            self.rank = self.members.index(self.member)
        started = time.perf_counter()
        # The only worker holding the training state: one more kill would lose it all, so it saves a
        # checkpoint (the job restarts from it if every holder dies, shoal/fault/membership.py).
        alone = (info is not None and info.get("holders") == 1 and info["source"] == self.member
                 and host.step > self.saved_alone)
        self.save_alone_pending = False
        prefix = keys.process_group_prefix(gen, self.lane if self.grouped else None)
        buffer, failure = None, None
        try:
            if info is None:
                raise GenerationBroken(str(self.store_lost))
            try:
                self.groups.connect(self.store, prefix, self.rank, self.size)
            except RuntimeError as err:
                raise GenerationBroken(f"could not connect generation {gen}: "
                                       f"{str(err).splitlines()[0][:200]}") from None
            if info["sync"]:
                if alone:  # one kill during the transfer would lose the state: it goes to disk first
                    self._save_alone(host)
                if info["source"] == self.member:
                    host.finish_saves()  # a background save of the state it sends lands first
                buffer = self._transfer(host, self.members.index(info["source"]))
        except GenerationBroken as err:
            failure = err
        # Every rank of a replica group must have connected (and received its shards) before
        # any of them goes on; otherwise the whole group asks again, copying nothing in.
        agreed = self._agree({"joined": float(failure is None), "store_lost": float(self.store_lost is not None)},
                             f"joining generation {gen}")
        if agreed["store_lost"] > 0:
            self.gen, self.members, self.rank = previous
        self._stop_if_lost(agreed["store_lost"])
        if agreed["joined"] < self.group_size:
            raise failure or GenerationBroken("another lane of this replica group could not join")
        # A member holding state at the source's step already has it (replicas in lockstep) or
        # must keep its own (DiLoCo replicas between syncs): only the others copy it in.
        if buffer is not None and (not self.has_state or host.step != info["step"]):
            unpack_state(host, buffer)
            self.has_state = True
        elif info.get("restore", -1) >= 0:  # every holder of the state died: all restart from the checkpoint
            host.load_checkpoint(info["restore"])
            self.has_state = True
            log.info("restored the checkpoint of step %d", host.step)
        # Without a joiner to hand the state to, it saves at the next step boundary, in the background.
        self.save_alone_pending = alone and not info["sync"]
        self.needs_join = False
        unit = "worker" if not self.grouped else "replica group"
        log.info("generation %d: %d %ss %s, this is rank %d at step %d (%.2fs%s)", gen, self.size, unit,
                 self.members, self.rank, host.step, time.perf_counter() - started,
                 f", state from {unit} {info['source']}" if info["sync"] else "")

    def _await_assignment(self) -> tuple[int, dict]:
        """Wait for the coordinator to place this replica in a generation: (generation, its record)."""
        key = keys.assignment(self.member, self.seq)
        self.store.wait([key], timedelta(seconds=self.cfg.fault.join_timeout))
        gen = int(self.store.get(key))
        return gen, json.loads(self.store.get(keys.generation(gen)))

    def _transfer(self, host: TrainingHost, source: int) -> torch.Tensor:
        """Broadcast the source's whole training state to the generation as one byte buffer
        (in a replica group: this lane's shards, from the same lane of the source group), and
        return what arrived; the caller copies it in.

        Members that already hold the source's state receive identical bytes, so even a
        broadcast cut short cannot corrupt them; nothing is copied in unless it completed."""
        buffer = pack_state(host)
        self.mark(host.step, "in state transfer")
        options = dist.BroadcastOptions()
        options.rootRank = source
        work = self.pg.broadcast([buffer], options)
        self.fire("transfer", host.step, is_source=self.rank == source)
        self.wait(work, "state transfer", host.step)
        return buffer
