"""Replicated data parallelism: DistributedDataParallel over the data-parallel group."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Wrap `model` in DDP over the 1-D data-parallel `mesh`; weights are broadcast from its rank 0."""
    return DistributedDataParallel(model, process_group=mesh.get_group(),
                                   device_ids=[device.index] if device.type == "cuda" else None)
