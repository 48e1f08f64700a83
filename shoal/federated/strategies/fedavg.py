"""FedAvg: the sample-weighted mean of the clients' models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (arXiv:1602.05629).
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy, weighted_mean


class FedAvg(Strategy):
    linear = True

    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        return self.apply_mean(rnd, global_params, weighted_mean(updates))

    def apply_mean(self, rnd: int, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return global_params + mean_delta
