"""Aggregation strategies, one file and one class each; `build_strategy` picks one by name."""

from __future__ import annotations

import importlib

from shoal.config import ConfigError, FederatedConfig
from shoal.federated.strategies.base import ClientUpdate, Strategy

STRATEGIES = {
    "fedavg": "fedavg:FedAvg", "fedprox": "fedprox:FedProx", "fedadam": "fedadam:FedAdam",
    "fedyogi": "fedyogi:FedYogi", "fedadagrad": "fedadagrad:FedAdagrad", "fedmedian": "fedmedian:FedMedian",
    "fedtrimmedavg": "fedtrimmedavg:FedTrimmedAvg", "krum": "krum:Krum", "multikrum": "multikrum:MultiKrum",
    "fedbuff": "fedbuff:FedBuff",
}

__all__ = ["ClientUpdate", "Strategy", "STRATEGIES", "build_strategy"]


def build_strategy(cfg: FederatedConfig) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"federated.strategy = '{cfg.strategy}' is unknown (valid: {', '.join(STRATEGIES)})")
    module, _, cls = STRATEGIES[cfg.strategy].partition(":")
    return getattr(importlib.import_module(f"shoal.federated.strategies.{module}"), cls)(cfg)
