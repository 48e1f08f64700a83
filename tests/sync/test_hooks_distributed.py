"""Each DDP comm hook on 2 Gloo ranks: the first averaged gradient is close to the true mean,
training lowers the loss, and both replicas hold identical parameters after every step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sync_helpers import params_equal_across_ranks, run_world
from shoal.config import SyncConfig
from shoal.sync import comm_hook_for

pytestmark = pytest.mark.distributed

# Relative error allowed on the first step's averaged gradient (powersgd's first steps are exact).
TOLERANCE = {"allreduce": 1e-6, "fp16": 2e-3, "bf16": 1e-2, "int8": 2e-2, "int4": 0.25, "powersgd": 1e-6}


def make_task(rank: int, steps: int, batch: int = 16) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    teacher = nn.Linear(32, 4)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    data = []
    for _ in range(steps):
        x = torch.randn(batch, 32, generator=gen)
        data.append((x, teacher(x).detach()))
    return model, data


def train_with_hooks(rank: int, world: int) -> None:
    for method in TOLERANCE:
        model, data = make_task(rank, steps=40)
        reference = [p.detach().clone() for p in model.parameters()]
        ddp = DDP(model)
        hook = comm_hook_for(SyncConfig(method=method, powersgd_rank=2, powersgd_warmup=2))
        if hook is not None:
            ddp.register_comm_hook(*hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        losses = []
        for step, (x, y) in enumerate(data):
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            if step == 0:
                # The true mean gradient, computed without DDP on a copy of the start weights.
                copy = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
                with torch.no_grad():
                    for p, r in zip(copy.parameters(), reference):
                        p.copy_(r)
                nn.functional.mse_loss(copy(x), y).backward()
                true = torch.cat([p.grad.reshape(-1) for p in copy.parameters()])
                dist.all_reduce(true)
                true /= world
                got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                rel = ((got - true).norm() / true.norm()).item()
                assert rel <= TOLERANCE[method], f"{method}: first gradient off by {rel:.3g}"
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            assert params_equal_across_ranks(list(model.parameters())), f"{method}: replicas differ at step {step}"
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, f"{method}: loss {first:.3f} -> {last:.3f} did not fall"


def test_every_hook_trains_and_keeps_replicas_equal():
    run_world(train_with_hooks, 2)
