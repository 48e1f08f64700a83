"""FedYogi: Yogi on the server, v <- v - (1 - beta2) delta^2 sign(v - delta^2).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295); Yogi from
Zaheer et al., NeurIPS 2018.
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta ** 2
        return v - (1 - self.cfg.beta2) * squared * torch.sign(v - squared)
