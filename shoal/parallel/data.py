"""Replicated data parallelism: DistributedDataParallel over the data-parallel group."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Wrap `model` in DDP over the 1-D data-parallel `mesh`; weights are broadcast from its rank 0.

    The gradients are views into DDP's communication buckets (`gradient_as_bucket_view`): backward
    writes them where the all-reduce reads them, which saves a copy of every gradient into its
    bucket and back each step, and a model's worth of memory."""
    return DistributedDataParallel(model, process_group=mesh.get_group(), gradient_as_bucket_view=True,
                                   device_ids=[device.index] if device.type == "cuda" else None)
