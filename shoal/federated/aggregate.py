"""From a round's updates to the next global model, and what is refused on the way; the round record.

Shared by the server's round driver (`rounds.py`) and `fed simulate`, so both aggregate and
record a round the same way. Two guards stand between the clients and the global model:

1. Each update's L2 norm is bounded (`federated.max_update_norm`, or, when 0, ten times the
   round's median update norm and at most ten times max(1, norm of the global model)); a
   larger update is dropped and its client named in the log. The median is the lower one, so
   with two updates the smaller sets the bound. This is the norm bound that Flower's
   differential-privacy wrappers clip to, used here to refuse rather than to scale: a huge
   update is not a direction worth keeping.
2. Every strategy's next model is checked before it replaces the current one: finite (also as
   the float32 it is saved and sent as), and no parameter above ten times max(1, the current
   model's largest parameter). A refused round keeps the previous model and the strategy's state.
`fed simulate` keeps (2) and leaves (1) out: its robustness runs measure the strategies alone.

Under central DP the clip norm already bounds each update, so (1) is left to it (and under
secure aggregation the sum must fit within that many clip norms); under secure aggregation
without DP the server sees only the sum, so (1) bounds the mean instead.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.config import FederatedConfig
from shoal.federated.privacy import CentralDP, clip_update
from shoal.federated.strategies import ClientUpdate, Strategy
from shoal.federated.strategies.fedmedian import coordinate_median
from shoal.observe.metrics import MetricsLog

log = logging.getLogger("shoal.federated.server")
NORM_FACTOR = 10.0  # how far past the round's median update, or the model's own norm, is still honest
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def update_norm_bound(fed: FederatedConfig, norms: list[float], global_params: torch.Tensor) -> float:
    """The largest update norm accepted this round (see the module docstring)."""
    if fed.max_update_norm > 0:
        return fed.max_update_norm
    cap = NORM_FACTOR * max(1.0, float(global_params.norm()))
    if not norms:
        return cap
    lower_median = sorted(norms)[(len(norms) - 1) // 2]
    return min(cap, NORM_FACTOR * lower_median)


def drop_oversized(fed: FederatedConfig, rnd: int, updates: list[ClientUpdate],
                   global_params: torch.Tensor) -> tuple[list[ClientUpdate], list[str]]:
    """(kept updates, ids of the clients whose update was over the norm bound)."""
    norms = [float(u.delta.norm()) for u in updates]
    bound = update_norm_bound(fed, norms, global_params)
    kept = [u for u, n in zip(updates, norms) if n <= bound]
    dropped = [u.client_id for u, n in zip(updates, norms) if not n <= bound]
    if dropped:
        log.warning("round %d: dropped the updates of %s: norm %s over the bound %.4g (federated.max_update_norm)",
                    rnd, dropped, ", ".join(f"{n:.4g}" for u, n in zip(updates, norms) if not n <= bound), bound)
    return kept, dropped


def global_refusal(old: torch.Tensor, new: torch.Tensor) -> str:
    """Why `new` may not replace `old` ('' when it may)."""
    if not torch.isfinite(new).all():
        return "it holds NaN or infinity"
    if float(new.abs().max()) > FLOAT32_MAX:
        return "it overflows float32"
    # per parameter, not per vector: server optimizers (FedAdam) move every coordinate by about server_lr
    # whatever the update's norm, and DP noise grows with the model's size; neither makes one weight blow up
    largest, limit = float(new.abs().max()), NORM_FACTOR * max(1.0, float(old.abs().max()))
    if largest > limit:
        return (f"its largest parameter {largest:.4g} is over {limit:.4g} (ten times the current model's largest, "
                f"at least 10)")
    return ""


def saved_model_refusal(params: torch.Tensor) -> str:
    """Why a global model may not be written to disk ('' when it may): what every accepted model satisfies."""
    if not torch.isfinite(params).all():
        return "holds NaN or infinity"
    if float(params.abs().max()) > FLOAT32_MAX:
        return "overflows float32"
    return ""


class Aggregator:
    """One federation's strategy, central DP (optional) and the guards between them and the model."""

    def __init__(self, fed: FederatedConfig, strategy: Strategy, dp: CentralDP | None, bound_updates: bool = True):
        self.fed, self.strategy, self.dp = fed, strategy, dp
        self.bound_updates = bound_updates
        """False in simulation, whose robustness runs measure the strategies themselves."""
        self.fallback = ""
        """Why the last `from_updates` took the coordinate-wise median instead of the strategy ('' if it did not)."""

    def _accept(self, rnd: int, old: torch.Tensor, new: torch.Tensor, saved: Strategy, who: list[str]) -> torch.Tensor:
        reason = global_refusal(old, new)
        if not reason:
            return new
        self.strategy = saved  # the strategy's state (FedOpt's moments) must not keep what was refused
        log.error("round %d: refused the new global model: %s; the global model is unchanged (updates from %s)",
                  rnd, reason, who)
        return old

    def from_updates(self, rnd: int, global_params: torch.Tensor, updates: list[ClientUpdate], sampled: int,
                     sample_rate: float) -> tuple[torch.Tensor, list[str]]:
        """Next global model from single updates (what a plain round has); returns it and the dropped clients."""
        dropped: list[str] = []
        self.fallback = ""
        if self.dp is None and self.bound_updates:
            updates, dropped = drop_oversized(self.fed, rnd, updates, global_params)
        if not updates:
            log.warning("round %d: no update is left; the global model is unchanged", rnd)
            return global_params, dropped
        saved = copy.deepcopy(self.strategy)
        who = [u.client_id for u in updates]
        if self.dp is not None:
            clipped = [clip_update(u.delta, self.dp.clip) for u in updates]
            total = torch.stack([c for c, _ in clipped]).sum(0)
            unclipped = float(sum(fits for _, fits in clipped))
            new = self.strategy.apply_mean(rnd, global_params, self.dp.noisy_mean(total, sampled, unclipped,
                                                                                  sample_rate))
        elif len(updates) < self.strategy.min_updates:
            # a robust rule undefined for this few updates must not freeze the federation: the median needs
            # no count, and with a majority of honest updates it stays among them, coordinate by coordinate
            self.fallback = (f"{len(updates)} updates, fewer than the {self.strategy.min_updates} that "
                             f"{self.fed.strategy} with byzantine = {self.fed.byzantine} needs")
            log.warning("round %d: %s; this round takes the coordinate-wise median instead", rnd, self.fallback)
            new = global_params + coordinate_median(updates)
        else:
            try:
                new = self.strategy.aggregate_train(rnd, global_params, updates)
            except ValueError as err:
                log.error("round %d: %s; the global model is unchanged", rnd, err)
                return global_params, dropped
        return self._accept(rnd, global_params, new, saved, who), dropped

    def from_sum(self, rnd: int, global_params: torch.Tensor, total: torch.Tensor, weight: float, sampled: int,
                 unclipped: float, sample_rate: float, who: list[str]) -> torch.Tensor:
        """Next global model from a sum of updates (secure aggregation, simulation workers): mean-based
        strategies only. Without DP `total` is weighted and `weight` the sum of the weights; with DP it
        is the sum of clipped updates, each of weight 1."""
        saved = copy.deepcopy(self.strategy)
        if self.dp is not None:
            # each update was clipped to the clip norm (by the clients, under secure aggregation), so
            # their sum cannot be longer than that many clip norms; a client that skipped clipping shows here
            limit = len(who) * self.dp.clip * (1 + 1e-6) + 1e-3
            if self.bound_updates and not float(total.norm()) <= limit:
                log.error("round %d: the sum of clipped updates has norm %.4g, over %d x the clip norm %.4g: a "
                          "client did not clip; the global model is unchanged (updates from %s)", rnd,
                          float(total.norm()), len(who), self.dp.clip, who)
                return global_params
            mean = self.dp.noisy_mean(total, sampled, unclipped, sample_rate)
        else:
            if weight <= 0:
                log.warning("round %d: the total weight is %s; the global model is unchanged", rnd, weight)
                return global_params
            mean = total / weight
            bound = update_norm_bound(self.fed, [], global_params)
            if self.bound_updates and not float(mean.norm()) <= bound:
                log.error("round %d: the mean update's norm %.4g is over the bound %.4g (federated.max_update_norm); "
                          "the global model is unchanged (updates from %s)", rnd, float(mean.norm()), bound, who)
                return global_params
        return self._accept(rnd, global_params, self.strategy.apply_mean(rnd, global_params, mean), saved, who)


def mean_loss(losses: list[float]) -> float:
    return float(np.mean(losses)) if losses else math.nan


class RoundLog:
    """One line per round: to the log, and to <run dir>/metrics.jsonl through MetricsLog."""

    def __init__(self, run_dir: Path, dp: CentralDP | None, logger: logging.Logger, total_rounds: int = 0):
        self.metrics = MetricsLog(run_dir, tensorboard=False)
        self.dp, self.log, self.total_rounds = dp, logger, total_rounds
        self.events_path = run_dir / "events.jsonl"

    def event(self, kind: str, **fields: Any) -> None:
        """One line in <run dir>/events.jsonl: what the federation did that a reader of the metrics
        would otherwise miss (a fallback taken, a site excluded, a model not saved)."""
        with open(self.events_path, "a") as out:
            out.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")

    def record(self, row: dict[str, Any]) -> None:
        if self.dp is not None:
            row["epsilon"] = self.dp.epsilon()
            row["dp_clip"] = self.dp.clip
        where = f"{row['round']}/{self.total_rounds}" if self.total_rounds else f"{row['round']}"
        self.log.info("round %s: %s", where, ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "round"))
        self.metrics.log(row)

    def close(self) -> None:
        self.metrics.close()
