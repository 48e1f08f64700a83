"""Per-step membership: the coordinator that forms each generation of replicas.

It runs in the launcher, beside the TCPStore it hosts, so it outlives any worker. Workers
post a request (`ft/ready/<member>`: JSON with a sequence number, the generation they
leave, their committed step and whether they hold state) and wait for their assignment
(`ft/assign/<member>/<seq>`). The coordinator:

- aborts the running generation (`ft/gen/<g>/abort`, which workers poll while they wait
  on a collective) as soon as a member exits or asks to leave, so survivors that are not
  directly connected to a dead peer do not wait out the step timeout;
- asks the running generation to regroup at the next step boundary
  (`ft/gen/<g>/reconfigure`, read by every member before its all-reduce and agreed through
  it) when joiners wait and there is room;
- forms generation g+1 from the requests once every old member has either asked or exited,
  or `settle` seconds passed (a hung member is then left out and named in the log);
- picks the state source: the member with state at the highest committed step, and asks for
  a state transfer when anyone lacks it.

A member is a replica: one worker, or a replica group of workers that share one member
number (its rank 0 asks for all of it; see shoal/fault/join.py). The coordinator does
not tell the two apart, so every lane of a replica group sees the same generations.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from shoal.config import Config, ConfigError
from shoal.runtime import protocol

if TYPE_CHECKING:  # the launcher validates [fault] before it spends seconds importing torch
    import torch.distributed as dist


def validate_fault(cfg: Config, nproc: int, group_size: int = 1) -> None:
    """Rules of [fault] that span fields, checked before any worker starts. `group_size` is
    the number of workers per replica (parallel.dp_shard for replica groups)."""
    f = cfg.fault
    max_workers = f.max_workers or nproc
    if f.min_workers > max_workers:
        raise ConfigError(f"fault.min_workers = {f.min_workers} is above fault.max_workers = {max_workers}")
    if nproc > max_workers:
        raise ConfigError(f"launch.nproc = {nproc} is above fault.max_workers = {max_workers}")
    if f.min_workers > nproc:
        raise ConfigError(f"fault.min_workers = {f.min_workers} is above the {nproc} workers launched (launch.nproc)")
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    if micro_batch < max_workers:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro_batch} samples per micro-batch cannot give "
                          f"each of fault.max_workers = {max_workers} workers a sample")
    if group_size > 1 and micro_batch % group_size:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro_batch} samples per micro-batch must divide "
                          f"by parallel.dp_shard = {group_size}, so the workers of a replica group get equal shares")
    if group_size > 1 and (f.max_workers or nproc) != nproc:
        raise ConfigError(f"fault.max_workers = {f.max_workers} is above launch.nproc = {nproc}: replica groups "
                          f"(parallel.dp_shard = {group_size}) run on one host and cannot take workers from "
                          f"elsewhere; use fault.max_workers = 0")
    if f.step_timeout < 1.0:
        raise ConfigError(f"fault.step_timeout = {f.step_timeout}s is too small to ever succeed: a worker cannot "
                          f"even connect a process group that fast; use 1s or more (the default is 30s)")


@dataclass
class Request:
    seq: int
    after: int
    step: int
    has_state: bool
    leaving: int = 0
    """The stop signal this member received (it leaves after its committed step); 0 when it stays."""


@dataclass
class Coordinator:
    store: "dist.Store"
    min_workers: int
    max_workers: int
    settle: float
    """Seconds to wait for members that neither asked to regroup nor exited (hung ones)."""
    initial: list[int]
    """Members started at launch; the first generation waits for them (up to join_timeout)."""
    join_timeout: float
    log: Callable[[str], None] = print
    unit: str = "worker"
    """What a member is, for the log: a worker, or a replica group."""
    gen: int = 0
    members: list[int] = field(default_factory=list)
    forming: bool = True
    broken_since: float = field(default_factory=time.monotonic)
    exited: set[int] = field(default_factory=set)
    handled: dict[int, int] = field(default_factory=dict)
    pending: dict[int, Request] = field(default_factory=dict)
    stopped: str = ""
    """Why the job cannot go on ('' while it can)."""
    history: list[dict] = field(default_factory=list)
    """(time, generation, members, source) of each generation formed, for the benchmark."""
    left_out: list[int] = field(default_factory=list)
    """Members left out as hung and not yet taken by `take_left_out` (the launcher kills hung replica groups)."""
    latest_checkpoint: Callable[[], int] = lambda: -1
    """The step of the job's latest complete checkpoint (-1: none): where the job restarts from when
    every worker holding the training state is gone."""
    preempting: int = 0
    """The stop signal the launcher received: every member stops at the next step boundary."""
    ended: bool = False
    """The job was stopped (`stop`): no generation is formed any more."""
    _asked_reconfigure: int = -1

    def preempt(self, signum: int) -> None:
        """Stop the whole job after the step in flight: members regroup, and are told to stop
        together (rank 0 of the last generation saves a checkpoint)."""
        self.preempting = signum
        if not self.forming:
            self.store.set(protocol.reconfigure(self.gen), "1")

    def take_left_out(self) -> list[int]:
        taken, self.left_out = self.left_out, []
        return taken

    def mark_exited(self, member: int) -> None:
        self.exited.add(member)
        self.pending.pop(member, None)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._collect()
        if self.ended:  # members that ask after the job was stopped are told the same
            self._tell_pending_to_stop()
            return
        if not self.forming:
            leaving = [m for m in self.members if m in self.exited or m in self.pending]
            if leaving:
                self.store.set(protocol.abort(self.gen), "1")
                self.forming, self.broken_since = True, now
            elif (self.gen != self._asked_reconfigure and len(self.members) < self.max_workers
                  and any(m not in self.members for m in self.pending)):
                self.store.set(protocol.reconfigure(self.gen), "1")
                self._asked_reconfigure = self.gen
        if self.forming:
            self._form(now)

    def _collect(self) -> None:
        # Members are numbered by one counter in the store, so workers started elsewhere are seen too.
        for member in range(self.store.add(protocol.NEXT_MEMBER, 0)):
            if member in self.exited:
                continue
            key = protocol.ready(member)
            if not self.store.check([key]):
                continue
            raw = json.loads(self.store.get(key))
            if raw["seq"] > self.handled.get(member, 0) and member not in self.pending:
                self.pending[member] = Request(raw["seq"], raw["after"], raw["step"], raw["has_state"],
                                               raw.get("leaving", 0))

    def _form(self, now: float) -> None:
        expected = self.members if self.gen else self.initial
        waiting = [m for m in expected if m not in self.exited and m not in self.pending]
        limit = self.settle if self.gen or self.preempting else self.join_timeout
        if self.gen and waiting and not any(m in self.pending for m in self.members):
            # The settle clock starts when the first old member reports: replicas that only meet
            # at outer syncs (DiLoCo) report at their next sync, not when a peer dies.
            self.broken_since = now
        if waiting and now - self.broken_since < limit:
            return
        leavers = [m for m in self.pending if self.pending[m].leaving]
        old = [m for m in self.members if m in self.pending and m not in leavers]
        if self.preempting or (leavers and not old):  # the whole job was asked to stop
            self.stop(f"stopped by signal {self.preempting or self.pending[leavers[0]].leaving}",
                      preempt=self.preempting or self.pending[leavers[0]].leaving)
            return
        candidates = (old + sorted(m for m in self.pending if m not in old and m not in leavers))[:self.max_workers]
        if len(candidates) < self.min_workers or not candidates:
            return  # the launcher restarts workers or gives up; requests stay pending meanwhile
        if waiting:
            self.log(f"generation {self.gen}: {self.unit}(s) {waiting} neither reported nor exited within "
                     f"{limit:.1f}s; left out as hung")
            self.left_out += waiting
        stateful = [m for m in candidates if self.pending[m].has_state]
        restore = -1
        if not stateful:
            restore = self.latest_checkpoint()
            if restore < 0:
                self.stop("every worker holding the training state is gone and no checkpoint was saved")
                return
            self.log(f"every worker holding the training state is gone: restarting from the checkpoint of step "
                     f"{restore}")
        step = max(self.pending[m].step for m in stateful) if stateful else restore
        source = min(m for m in stateful if self.pending[m].step == step) if stateful else -1
        sync = bool(stateful) and any(not self.pending[m].has_state or self.pending[m].step != step
                                      for m in candidates)
        self.gen += 1
        self.members = candidates
        # holders: members that hold the state before this generation; one alone saves a checkpoint
        self.store.set(protocol.generation(self.gen), json.dumps({"members": candidates, "source": source, "sync": sync,
                                                         "step": step, "holders": len(stateful),
                                                         "restore": restore}))
        for member in candidates + leavers:  # a leaver sees it is not a member, and exits (no restart)
            request = self.pending.pop(member)
            self.store.set(protocol.assignment(member, request.seq), str(self.gen))
            self.handled[member] = request.seq
        self.forming = False
        self.history.append({"t": time.time(), "gen": self.gen, "members": candidates, "source": source,
                             "sync": sync, "step": step})
        self.log(f"generation {self.gen}: {self.unit}s {candidates} at step {step}"
                 + (f", state from {self.unit} {source}" if sync else ""))

    def stop(self, reason: str, *, preempt: int = 0) -> None:
        """End the job: every waiting worker gets a generation that tells it to stop. With `preempt`
        (a signal number) it is a clean stop: rank 0 of the last generation saves a checkpoint."""
        self.stopped = "" if preempt else reason
        self.preempting = self.preempting or preempt
        self.gen += 1
        self.store.set(protocol.generation(self.gen), json.dumps({"stop": reason, "preempt": preempt}))
        self.ended = True
        self._tell_pending_to_stop()
        self.log(f"stopping: {reason}")

    def _tell_pending_to_stop(self) -> None:
        for member, request in list(self.pending.items()):
            self.store.set(protocol.assignment(member, request.seq), str(self.gen))
            self.handled[member] = request.seq
            del self.pending[member]
