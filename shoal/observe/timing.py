"""When this rank's gradients were ready, seen from a DDP comm hook.

`arrived` is when the last bucket of a step was handed to the hook: this rank's backward is
done there and it waits for the others, so its arrival time tells a compute straggler apart
(shoal/observe/ranks.py), and the Trainer counts what follows as communication. Whatever
hook runs (plain, compressed, PowerSGD) is wrapped the same way. The wrapper only reads the
clock: a callback on each bucket's future would run Python on the collective's thread every
step, contending for the interpreter with the backward pass it overlaps.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


class CommTimer:
    def __init__(self) -> None:
        self.arrived = 0.0  # time.perf_counter() of the latest bucket's hook call

    def wrap(self, hook: Hook) -> Hook:
        def timed(state, bucket):  # unannotated: DDP checks annotations against the real GradBucket type
            self.arrived = time.perf_counter()
            return hook(state, bucket)

        return timed

    def attach(self, ddp: torch.nn.Module, state: Any = None, hook: Hook | None = None) -> None:
        """Register `hook` (plain all-reduce by default) on `ddp`, timed."""
        if hook is None:
            state, hook = ddp.process_group, default_hooks.allreduce_hook
        ddp.register_comm_hook(state, self.wrap(hook))
