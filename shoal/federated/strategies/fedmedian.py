"""FedMedian: the coordinate-wise median of the client updates (robust to outliers).

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018 (arXiv:1803.01498). With an even count the two middle values are averaged.
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy


def coordinate_median(updates: list[ClientUpdate]) -> torch.Tensor:
    """The coordinate-wise median of the updates' deltas (also Krum's fallback with too few updates)."""
    ordered = torch.stack([u.delta for u in updates]).sort(dim=0).values
    n = len(updates)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class FedMedian(Strategy):
    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        return global_params + coordinate_median(updates)
