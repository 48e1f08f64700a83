"""Local SGD: every replica trains alone and the replicas average parameters every H steps.

Local SGD (Stich 2019, arXiv 1805.09767; Lin et al. 2020, "Don't use large
mini-batches, use local SGD", arXiv 1808.07217) cuts communication by H at
some cost in loss. It is DiLoCo (shoal/sync/diloco.py) with outer lr 1 and no
outer momentum, but keeps no outer copy of the model, so it costs no memory.

    with LocalSGD(model, optimizer, group=replicas, inner_steps=8):
        ...  # the unchanged training loop
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.sync.replica_state import load_replica_state, local_tensor, make_replicas_equal, replica_state

__all__ = ["LocalSGD"]


class LocalSGD(contextlib.AbstractContextManager):
    """Average `model`'s parameters over `group` after every `inner_steps` optimizer steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 group: dist.ProcessGroup | None = None, inner_steps: int = 8):
        if inner_steps < 1:
            raise ValueError(f"inner_steps = {inner_steps} must be at least 1")
        self.model = model
        self.optimizer = optimizer
        self.group = group or dist.group.WORLD
        self.inner_steps = inner_steps
        self.inner_step = 0  # optimizer steps taken inside this context
        self.outer_syncs = 0
        self._handle: Any = None

    def __enter__(self) -> LocalSGD:
        # Replicas must start equal, or averaging mixes unrelated models.
        make_replicas_equal([local_tensor(p) for p in self.model.parameters()], self.group)
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The step counts and this replica's own parameters and optimizer state, so a resumed
        run averages at the same steps from the same values (replicas differ between averages)."""
        return {"inner_step": self.inner_step, "outer_syncs": self.outer_syncs,
                "replica": replica_state(self.model, self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; call it inside the context (entry broadcasts rank 0's model)."""
        self.inner_step, self.outer_syncs = int(state["inner_step"]), int(state["outer_syncs"])
        load_replica_state(self.model, self.optimizer, state["replica"])

    def _after_step(self, *_: Any) -> None:
        self.inner_step += 1
        if self.inner_step % self.inner_steps == 0:
            self.average()

    @torch.no_grad()
    def average(self) -> None:
        """Replace every replica's parameters by their mean over the group (one all-reduce)."""
        # Shards under FSDP: replicas average their matching shards.
        params = [local_tensor(p) for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.group)
        flat.div_(dist.get_world_size(self.group))
        start = 0
        for param in params:
            param.copy_(flat[start:start + param.numel()].view_as(param))
            start += param.numel()
        self.outer_syncs += 1
