"""FedTrimmedAvg: per coordinate, drop the largest and smallest `trim_fraction` of values, average the rest.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018 (arXiv:1803.01498), the coordinate-wise trimmed mean.
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy


class FedTrimmedAvg(Strategy):
    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        ordered = torch.stack([u.delta for u in updates]).sort(dim=0).values
        cut = int(self.cfg.trim_fraction * len(updates))
        kept = ordered[cut:len(updates) - cut]
        return global_params + kept.mean(0)
