"""Time spent in gradient communication, measured around a DDP comm hook.

Each bucket's all-reduce is timed from launch to completion of its future. Under DDP the
reduction overlaps the rest of backward, so this is communication time, not all of it
exposed; the report labels it so.
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

    def wrap(self, hook: Hook) -> Hook:
        def timed(state, bucket):  # unannotated: DDP checks annotations against the real GradBucket type
            started = time.perf_counter()

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
