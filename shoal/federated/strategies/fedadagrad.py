"""FedAdagrad: Adagrad on the server, v <- v + delta^2.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).
"""

from __future__ import annotations

import torch

from shoal.federated.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta ** 2
