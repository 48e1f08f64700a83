"""Time spent in gradient communication, measured around a DDP comm hook.

Each bucket's all-reduce is timed from launch to completion of its future (`seconds`, busy
time that overlaps the rest of backward). `arrived` is when the last bucket of a step was
handed to the hook: this rank's backward is done there and it waits for the others, so its
arrival time tells a compute straggler apart (shoal/observe/ranks.py). Whatever hook runs
(plain, compressed, PowerSGD) is wrapped the same way.
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
        self.seconds = 0.0
        self.arrived = 0.0  # time.perf_counter() of the latest bucket's hook call

    def wrap(self, hook: Hook) -> Hook:
        def timed(state, bucket):  # unannotated: DDP checks annotations against the real GradBucket type
            started = self.arrived = time.perf_counter()

            def done(fut: torch.futures.Future) -> torch.Tensor:
                self.seconds += time.perf_counter() - started
                return fut.value()

            return hook(state, bucket).then(done)

        return timed

    def attach(self, ddp: torch.nn.Module, state: Any = None, hook: Hook | None = None) -> None:
        """Register `hook` (plain all-reduce by default) on `ddp`, timed."""
        if hook is None:
            state, hook = ddp.process_group, default_hooks.allreduce_hook
        ddp.register_comm_hook(state, self.wrap(hook))
