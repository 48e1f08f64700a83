"""The tests' one multi-process harness: run a function on a small Gloo world on this host."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.runtime.env import end_distributed  # (importing it comes before any init_process_group)
from tests.conftest import free_port


def _rank(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # 2 cores shared by up to 4 ranks
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    fn(rank, world, *args)
    end_distributed()  # a rank that raised exits without it: its peers may still be in a collective


def run_world(fn: Callable[..., Any], world: int = 2, *args: Any) -> None:
    """Run fn(rank, world, *args) on `world` Gloo ranks (fn must be importable: module level);
    a failure on any rank fails the test."""
    for attempt in range(3):
        try:
            mp.spawn(_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as err:
            # Another process on this shared machine may take the free port before rank 0 binds it.
            if "ddress already in use" not in str(err) or attempt == 2:
                raise
