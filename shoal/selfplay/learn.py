"""The learner's optimizer steps on replay-buffer samples: AlphaZero's training half (Silver et al.
2017, 2018), shared by the one-process loop (local.py) and the distributed learner.

With `symmetries` (a game's `symmetries` method) each sampled position is replaced by one of its
symmetric copies chosen by the same generator (AlphaGo Zero's data augmentation), so that a
resumed run still samples bit for bit the same batches.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from shoal.selfplay.network import loss
from shoal.selfplay.replay import ReplayBuffer

Symmetries = Callable[[np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]


def augment(planes: torch.Tensor, policy: torch.Tensor, symmetries: Symmetries,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position of the batch as one of its symmetric copies, drawn uniformly by `generator`."""
    copies = symmetries(planes.numpy(), policy.numpy())
    pick = torch.randint(len(copies), (planes.shape[0],), generator=generator).numpy()
    rows = np.arange(planes.shape[0])
    all_planes = np.stack([p for p, _ in copies])  # (copies, B, ...)
    all_policy = np.stack([q for _, q in copies])
    return torch.from_numpy(all_planes[pick, rows]), torch.from_numpy(all_policy[pick, rows])


def decayed_lr(lr: float, progress: float, *, final: float, start: float) -> float:
    """`lr` until `progress` (the share of the run done, 0..1) reaches `start`, then a half cosine down
    to `lr * final` at the run's end: a constant learning rate leaves the last versions' network as
    noisy as the middle ones'."""
    if final >= 1.0 or progress <= start:
        return lr
    done = min(1.0, (progress - start) / max(1e-9, 1.0 - start))
    return lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * done)))


def train_steps(net: torch.nn.Module, optimizer: torch.optim.Optimizer, buffer: ReplayBuffer, steps: int,
                batch_size: int, generator: torch.Generator, symmetries: Symmetries | None = None) -> dict[str, float]:
    """`steps` optimizer steps, each on `batch_size` positions sampled from `buffer` by `generator`;
    the mean losses {"loss", "policy_loss", "value_loss"} over the steps (a dict rather than one
    float so that the learner logs the two halves). `net` may be DDP-wrapped: each rank then
    samples its own batch and DDP averages the gradients. The net is left in train mode."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_steps: steps = {steps}, batch_size = {batch_size}; both must be >= 1")
    net.train()
    device = next(net.parameters()).device
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
    for _ in range(steps):
        planes, policy, value = buffer.sample(batch_size, generator)
        if symmetries is not None:
            planes, policy = augment(planes, policy, symmetries, generator)
        losses = loss(net, planes.to(device), policy.to(device), value.to(device))
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        sums["loss"] += losses.total.item()
        sums["policy_loss"] += losses.policy.item()
        sums["value_loss"] += losses.value.item()
    return {name: total / steps for name, total in sums.items()}
