"""FedProx: FedAvg whose clients add (mu/2)||w - w_global||^2 to their loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).
The server side is FedAvg's; the proximal weight travels to the clients in the round's config.
"""

from __future__ import annotations

import random

from shoal.federated.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    def configure_train(self, rnd: int, available: list[str],
                        rng: random.Random) -> tuple[list[str], dict[str, float]]:
        chosen, config = super().configure_train(rnd, available, rng)
        return chosen, {**config, "proximal_mu": self.cfg.proximal_mu}
