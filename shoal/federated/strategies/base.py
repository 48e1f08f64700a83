"""What every strategy shares: the update record, client sampling and metric averaging.

A round has four phases and a strategy has one method per phase: `configure_train` (who
trains, with which settings), `aggregate_train` (client updates -> next global model),
`configure_evaluate` and `aggregate_evaluate`. Updates are flat float64 vectors of
`client model - model it started from`, so every rule below is a rule on vectors.
"""

from __future__ import annotations

import abc
import math
import random
from dataclasses import dataclass, field

import torch

from shoal.config import FederatedConfig


@dataclass
class ClientUpdate:
    client_id: str
    delta: torch.Tensor
    """Flat float64 vector: trained parameters minus the parameters the client received."""
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    base_version: int = 0
    """Server model version the client trained from (FedBuff measures staleness with it)."""


class Strategy(abc.ABC):
    """Sampling and metric averaging; subclasses define `aggregate_train`."""

    asynchronous = False
    """True when the server applies updates as they arrive instead of in synchronous rounds."""
    linear = False
    """True when the rule needs only the (weighted) mean of the updates, so it works under secure
    aggregation and central differential privacy, where the server never sees one update."""

    @property
    def min_updates(self) -> int:
        """Fewest updates the rule is defined for; with fewer, the aggregator falls back to the
        coordinate-wise median for that round (and says so) rather than leave the model frozen."""
        return 1

    def __init__(self, cfg: FederatedConfig):
        self.cfg = cfg

    def configure_train(self, rnd: int, available: list[str],
                        rng: random.Random) -> tuple[list[str], dict[str, float]]:
        """Sample `fraction` of the available clients (at least `min_clients`, at most all)."""
        wanted = max(self.cfg.min_clients, int(math.ceil(self.cfg.fraction * len(available))))
        chosen = sorted(rng.sample(sorted(available), min(wanted, len(available))))
        return chosen, {"local_epochs": float(self.cfg.local_epochs)}

    @abc.abstractmethod
    def aggregate_train(self, rnd: int, global_params: torch.Tensor,
                        updates: list[ClientUpdate]) -> torch.Tensor:
        """The next global model from this round's client updates."""

    def apply_mean(self, rnd: int, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        """Next global model from the mean update alone (linear strategies only)."""
        raise TypeError(f"{type(self).__name__} needs every update, not only their mean (it is not linear)")

    def configure_evaluate(self, rnd: int, available: list[str], rng: random.Random) -> list[str]:
        """Every available client evaluates the new global model on its held-out data."""
        return sorted(available)

    def aggregate_evaluate(self, rnd: int, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Sample-weighted mean of each metric."""
        total = sum(n for n, _ in results)
        if total == 0:
            return {}
        keys = set().union(*(m.keys() for _, m in results))
        return {k: sum(n * m.get(k, 0.0) for n, m in results) / total for k in sorted(keys)}


def site_spread(results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Per metric, the median, smallest and largest of the sites' own values, unweighted: the
    weighted mean beside them trusts each site's declared count, these do not."""
    spread: dict[str, float] = {}
    keys = set().union(*(m.keys() for n, m in results if n > 0)) if results else set()
    for key in sorted(keys):
        values = torch.tensor([m[key] for n, m in results if n > 0 and key in m], dtype=torch.float64)
        spread[f"{key}_median"] = float(values.quantile(0.5))
        spread[f"{key}_min"], spread[f"{key}_max"] = float(values.min()), float(values.max())
    return spread


def weighted_mean(updates: list[ClientUpdate]) -> torch.Tensor:
    """Mean of the deltas weighted by each client's sample count (FedAvg's weights)."""
    weights = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    stacked = torch.stack([u.delta for u in updates])
    return (weights[:, None] * stacked).sum(0) / weights.sum()
