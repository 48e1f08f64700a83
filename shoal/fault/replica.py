"""Which replica this worker is, and how the workers of one replica group agree.

In fault-tolerant mode the unit of membership is a *replica*: one worker holding the whole model
(DDP-like), or a replica group of `parallel.dp_shard` workers that shard it with FSDP2 over a
default process group of their own (HSDP-like). The ranks of a group agree on every decision
(commit or abandon a step, regroup, accept a state transfer) by one small all-reduce over that
group, so a group never splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shoal.fault.errors import GroupBroken
from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from shoal.runtime import protocol as keys
from shoal.runtime.protocol import INCARNATION_ENV, MEMBER_ENV, SLOT_ENV


@dataclass(frozen=True)
class Replica:
    """This worker's place in the job."""

    member: int
    """Numbers the replica (a worker, or a replica group whose workers share it); never reused."""
    lane: int = 0
    """This worker's rank inside its replica group (0 for a whole-model replica)."""
    group_size: int = 1
    """Workers in the replica group (1: the worker holds the whole model)."""
    slot: int = -1
    """The supervisor's slot this worker runs in (-1 when another launcher started it)."""
    incarnation: int = 0
    """0 for a worker of the first launch (it holds the first launch's state); more for a restart."""

    @classmethod
    def from_env(cls, store: dist.Store) -> Replica:
        """From the supervisor's environment; a worker it did not start (another host, a test)
        numbers itself through the store and joins as a restarted one."""
        started_here = MEMBER_ENV in os.environ
        member = int(os.environ[MEMBER_ENV]) if started_here else store.add(keys.NEXT_MEMBER, 1) - 1
        incarnation = int(os.environ.get(INCARNATION_ENV, 0)) if started_here else 1
        # A replica group's workers get RANK/WORLD_SIZE inside their group from the supervisor.
        lane, group_size = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if started_here \
            else (0, 1)
        return cls(member, lane, group_size, int(os.environ.get(SLOT_ENV, -1)), incarnation)

    @property
    def grouped(self) -> bool:
        return self.group_size > 1

    @property
    def log_id(self) -> int:
        """A number naming this worker's log file, unique in the job."""
        return self.member if not self.grouped else self.member * self.group_size + self.lane

    def label(self, member: int, lane: int) -> str:
        """How a rank is named in per-rank timing: `member`, or `member.lane` in a replica group."""
        return str(member) if not self.grouped else f"{member}.{lane}"

    def join_group(self, store: dist.Store, step_timeout: float) -> None:
        """The group's own default process group, for FSDP: its keys are under the group's member
        number, which a restarted group never reuses (docs/torch.md)."""
        dist.init_process_group("gloo", store=dist.PrefixStore(keys.replica_group_prefix(self.member), store),
                                rank=self.lane, world_size=self.group_size,
                                timeout=timedelta(seconds=max(2 * step_timeout, 30.0)))

    def agree(self, values: dict[str, float], what: str) -> dict[str, float]:
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
