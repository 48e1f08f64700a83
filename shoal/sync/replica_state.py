"""One replica's own state between outer syncs, kept so that a resumed run repeats the uninterrupted one.

Between DiLoCo or LocalSGD syncs each replica holds its own parameters and its own
inner-optimizer moments. A DCP checkpoint keeps one copy of every tensor that all ranks
hold under the same name, so it cannot hold them; `replica_state` collects them as this
rank's local tensors (the shard under FSDP) for a per-rank file, and `load_replica_state`
copies them back in place, so DTensor parameters and optimizer states keep their layout.
`make_replicas_equal` starts the replicas from one state without sending a model that
every replica already holds.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.runtime.lazy import dtensor_type

__all__ = ["load_replica_state", "local_tensor", "make_replicas_equal", "replica_state"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of a DTensor (FSDP, TP), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, dtensor_type()) else tensor.detach()


def _optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def replica_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of this rank's parameters, buffers and per-parameter optimizer state (tensors and numbers)."""
    return {
        "params": [local_tensor(p).clone() for p in model.parameters()],
        "buffers": [local_tensor(b).clone() for b in model.buffers()],
        "optimizer": [{key: local_tensor(value).clone() if torch.is_tensor(value) else value
                       for key, value in optimizer.state[p].items()} for p in _optimized(optimizer)],
    }


@torch.no_grad()
def load_replica_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Copy `replica_state()` back into `model` and `optimizer`; shapes must match (same layout)."""
    params, buffers, optimized = list(model.parameters()), list(model.buffers()), _optimized(optimizer)
    if (len(state["params"]), len(state["buffers"]), len(state["optimizer"])) != \
            (len(params), len(buffers), len(optimized)):
        raise ValueError("the saved replica state does not match this model and optimizer "
                         f"({len(state['params'])} parameters saved, {len(params)} here)")
    for tensor, saved in zip(params + buffers, state["params"] + state["buffers"]):
        _copy_into(local_tensor(tensor), saved)
    for param, saved in zip(optimized, state["optimizer"]):
        current = optimizer.state[param]
        for key, value in saved.items():
            if torch.is_tensor(value) and torch.is_tensor(current.get(key)):
                _copy_into(local_tensor(current[key]), value)
            else:  # no state yet (the optimizer never stepped) or a plain number
                current[key] = value.clone() if torch.is_tensor(value) else value


def _copy_into(target: torch.Tensor, saved: torch.Tensor) -> None:
    if target.shape != saved.shape:
        raise ValueError(f"the saved replica state holds a tensor of shape {tuple(saved.shape)} where this "
                         f"layout has {tuple(target.shape)}: resume an outer-sync run on the layout it was saved on")
    target.copy_(saved)


@torch.no_grad()
def make_replicas_equal(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> bool:
    """Give every member of `group` group rank 0's `tensors`; True if they had to travel.

    Replicas seeded alike already hold the same values, and on a slow link sending the model
    to check is the cost to avoid: the members compare SHA-256 digests (32 bytes each) and
    broadcast only when one differs.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    device = tensors[0].device if tensors else torch.device("cpu")  # NCCL gathers on the GPU
    mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    if all(torch.equal(other, everyone[0]) for other in everyone):
        return False
    for tensor in tensors:
        dist.broadcast(tensor, group=group, group_src=0)
    return True
