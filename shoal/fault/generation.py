"""The generation a fault-tolerant replica is in: who its members are, its process group, and
waiting on its collectives without hanging.

Each step the replicas average over the process group of the current *generation*, a
`ProcessGroupGloo` built on `PrefixStore("shoal/ft/pg/<g>")` over the launcher's TCPStore, so a
new generation never meets the keys of an old one (in a replica group, one such group per lane:
`shoal/ft/pg/<g>/lane<j>`). A collective gives up when it fails (a peer died), when the
coordinator aborts the generation (the launcher saw a peer exit) or after `fault.step_timeout`
(a peer hangs: the ranks that never arrived are named, from where each last said it was).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from shoal.fault import chaos
from shoal.fault.errors import GenerationBroken
from shoal.fault.groups import Collective, GenerationGroups, finished
from shoal.fault.replica import Replica
from shoal.fault.store import ReplicaStore
from shoal.runtime import protocol as keys

log = logging.getLogger("shoal")

POLL = timedelta(milliseconds=20)


class Generation:
    """This replica's view of its current generation (number -1 and no group before the first)."""

    def __init__(self, store: ReplicaStore, replica: Replica, *, timeout: timedelta,
                 chaos_points: chaos.ChaosPoints | None = None):
        self.store, self.replica, self.timeout, self.chaos = store, replica, timeout, chaos_points
        self.number, self.members, self.rank = -1, [replica.member], 0
        self.groups = GenerationGroups(timeout)

    @property
    def size(self) -> int:
        """Replicas (workers or replica groups) in the generation."""
        return len(self.members)

    @property
    def pg(self) -> dist.ProcessGroup | None:
        """The generation's process group (None between generations)."""
        return self.groups.pg

    def enter(self, number: int, members: list[int]) -> None:
        """Count as a member of generation `number` (its group is connected by `connect`)."""
        self.number, self.members = number, members
        self.rank = members.index(self.replica.member)

    def connect(self) -> None:
        """Build the generation's process group (this lane's, in a replica group)."""
        prefix = keys.process_group_prefix(self.number, self.replica.lane if self.replica.grouped else None)
        try:
            self.groups.connect(self.store.store, prefix, self.rank, self.size)
        except RuntimeError as err:
            raise GenerationBroken(f"could not connect generation {self.number}: "
                                   f"{str(err).splitlines()[0][:200]}") from None

    def aborted(self) -> bool:
        """The coordinator aborted this generation (a member left)."""
        return self.store.check(keys.abort(self.number))

    def reconfigure_requested(self) -> bool:
        """The coordinator asked the generation to regroup at its next agreement (joiners wait)."""
        return self.store.check(keys.reconfigure(self.number))

    def mark(self, step: int, what: str) -> None:
        """Say where this rank is ('step 7: in allreduce'): a hung rank's place is then named."""
        self.store.set(self._where_key(self.rank), f"step {step}: {what}")

    def fire(self, point: str, step: int, *, is_source: bool = False) -> None:
        """Fire the chaos injections set for this point of this step (tests, benchmarks)."""
        if self.chaos is not None:
            self.chaos.fire(point, step, size=self.size, gen=self.number, is_source=is_source)

    def wait(self, work: Collective, op: str, step: int) -> Any:
        """Wait for a collective of this generation (its Work, or a Future chained on one), giving
        up when it fails, when the coordinator aborts the generation, or after step_timeout (then
        naming the ranks that never arrived). Returns what a Future holds."""
        self.groups.track(work)
        deadline = time.monotonic() + self.timeout.total_seconds()
        abort_key = keys.abort(self.number)
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
            if self.store.check(abort_key):
                raise GenerationBroken("the coordinator aborted the generation (a member left)")
            if self.store.lost is not None:
                raise GenerationBroken(str(self.store.lost))
            if time.monotonic() > deadline:
                raise GenerationBroken(self._diagnose(op, step))

    def _where_key(self, rank: int) -> str:
        return keys.where(self.number, rank, self.replica.lane if self.replica.grouped else None)

    def _diagnose(self, op: str, step: int) -> str:
        """Which ranks of this generation did not reach `op`, and where they were last seen."""
        expected = f"step {step}: in {op}"
        missing = []
        for rank, member in enumerate(self.members):
            seen = self.store.get(self._where_key(rank), missing="not started", lost="unknown (store lost)")
            if seen != expected:
                who = (f"worker {member}" if not self.replica.grouped
                       else f"replica group {member}, lane {self.replica.lane}")
                missing.append(f"rank {rank} ({who}) last seen '{seen}'")
        text = (f"step {step}: {op} timed out after {self.timeout.total_seconds():.1f}s; did not arrive: "
                + ("; ".join(missing) or "none (all arrived; the network or the collective stalled)"))
        log.error(text)
        return text
