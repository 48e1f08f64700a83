"""Krum: keep the update closest to its n - f - 2 nearest neighbours.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017. Needs n > 2f + 2 updates; with fewer, `aggregate.Aggregator` takes the coordinate-wise
median for that round instead (logged, and an event in the run directory), so a dropout never freezes it.
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy


def krum_scores(deltas: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each update's sum of squared distances to its n - f - 2 nearest other updates."""
    n = deltas.shape[0]
    neighbours = n - byzantine - 2
    if n <= 2 * byzantine + 2:
        raise ValueError(f"Krum with byzantine = {byzantine} needs more than {2 * byzantine + 2} updates, got {n}")
    distances = torch.cdist(deltas, deltas) ** 2
    distances.fill_diagonal_(float("inf"))  # a point is not its own neighbour
    return distances.sort(dim=1).values[:, :neighbours].sum(1)


class Krum(Strategy):
    @property
    def min_updates(self) -> int:
        return 2 * self.cfg.byzantine + 3

    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        deltas = torch.stack([u.delta for u in updates])
        return global_params + deltas[krum_scores(deltas, self.cfg.byzantine).argmin()]
