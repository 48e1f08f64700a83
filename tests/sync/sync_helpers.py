"""Helpers for the sync tests: start a small Gloo world on 127.0.0.1, compare replicas."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shoal.runtime import before_init  # noqa: F401  (before any init_process_group)
from tests.conftest import free_port


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two cores shared by every test worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world: int = 2, *args: Any) -> None:
    """Run fn(rank, world, *args) on `world` Gloo ranks; a failure on any rank fails the test."""
    for attempt in range(3):
        try:
            mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            # Another process on this shared machine may take the free port before rank 0 binds it.
            if "ddress already in use" not in str(err) or attempt == 2:
                raise


def params_equal_across_ranks(params: list[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical values (compared with rank 0's)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
