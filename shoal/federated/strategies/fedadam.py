"""FedAdam: Adam on the server, v <- beta2 v + (1 - beta2) delta^2.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.cfg.beta2 * v + (1 - self.cfg.beta2) * delta ** 2
