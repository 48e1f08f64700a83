"""MultiKrum: average the m updates with the best Krum scores (m = n - f by default).

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017, section 5 (Multi-Krum).
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy
from shoal.federated.strategies.krum import krum_scores


class MultiKrum(Strategy):
    @property
    def min_updates(self) -> int:
        return 2 * self.cfg.byzantine + 3

    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        deltas = torch.stack([u.delta for u in updates])
        keep = self.cfg.krum_keep or len(updates) - self.cfg.byzantine
        best = krum_scores(deltas, self.cfg.byzantine).argsort()[:max(1, keep)]
        return global_params + deltas[best].mean(0)
