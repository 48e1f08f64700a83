"""Helpers for the sync tests: compare replicas (worlds start with tests/world.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.world import run_world  # noqa: F401  (the sync tests' harness)


def params_equal_across_ranks(params: list[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical values (compared with rank 0's)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
