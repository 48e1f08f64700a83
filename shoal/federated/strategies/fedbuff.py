"""FedBuff: asynchronous buffered aggregation with staleness-discounted updates.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022
(arXiv:2106.06639). Clients train whenever they are free on whatever model version they
last received; the server buffers K = `buffer_size` updates, scales each by
1 / sqrt(1 + staleness), and steps x <- x + eta * (1/K) * sum of the scaled updates.
"""

from __future__ import annotations

import math

import torch

from shoal.federated.strategies.base import ClientUpdate, Strategy


def staleness_weight(staleness: int) -> float:
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(Strategy):
    asynchronous = True

    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        """`rnd - 1` is the version the buffer is applied to: staleness counts versions since a client's base."""
        current = rnd - 1
        total = torch.zeros_like(global_params)
        for update in updates:
            total += staleness_weight(current - update.base_version) * update.delta
        return global_params + self.cfg.server_lr * total / len(updates)
