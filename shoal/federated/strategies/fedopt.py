"""Server optimizers over the mean client update (shared by FedAdam, FedYogi, FedAdagrad).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2:
the mean update is a pseudo-gradient; m and v follow the paper (v starts at tau^2, no bias
correction), and x <- x + eta * m / (sqrt(v) + tau).
"""

from __future__ import annotations

import abc

import torch

from shoal.config import FederatedConfig
from shoal.federated.strategies.base import ClientUpdate, Strategy, weighted_mean


class FedOpt(Strategy):
    linear = True

    def __init__(self, cfg: FederatedConfig):
        super().__init__(cfg)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The server optimizer's second-moment update: what tells FedAdam, FedYogi and FedAdagrad apart."""

    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        return self.apply_mean(rnd, global_params, weighted_mean(updates))

    def apply_mean(self, rnd: int, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(mean_delta)
            self.v = torch.full_like(mean_delta, cfg.tau ** 2)
        self.m = cfg.beta1 * self.m + (1 - cfg.beta1) * mean_delta
        self.v = self.second_moment(self.v, mean_delta)
        return global_params + cfg.server_lr * self.m / (self.v.sqrt() + cfg.tau)
