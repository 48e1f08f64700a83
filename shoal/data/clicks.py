"""A generated click log for recommendation models, with a known ground truth.

Each impression has a few dense features (think: time of day, position on the page) and
one id per categorical field (user, item, category, device), drawn with a heavy head
(Zipf-like) as real logs are. The click probability comes from a fixed "teacher": a
linear term in the dense features, a bias per id, and dot products between the latent
vectors of each pair of fields (the factorisation-machine form DLRM is built to learn).
Because the true probability of every sample is known, the best AUC any model could
reach (`ClickLog.bayes_auc`) is known too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.config import DataConfig
from shoal.data.datasets import Subset
from shoal.data.spec import DataSpec

DENSE_FEATURES = 4
TABLE_SIZES = (4096, 1024, 64, 12)
"""Ids per categorical field: two tall tables (users, items) and two short ones."""
LATENT = 4


@dataclass(frozen=True, kw_only=True)
class ClickSpec(DataSpec):
    dense_features: int = DENSE_FEATURES
    """Leading float columns of x; the rest are categorical ids, one per table."""
    table_sizes: tuple[int, ...] = TABLE_SIZES
    """Number of ids of each categorical field."""


class ClickLog:
    """x = [dense features..., ids as floats...] (exact below 2**24), y = 1 for a click."""

    def __init__(self, num_samples: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        dense = torch.randn(num_samples, DENSE_FEATURES, generator=g)
        ids = []
        for size in TABLE_SIZES:
            weights = 1.0 / torch.arange(1, size + 1, dtype=torch.float64) ** 1.05
            # shuffle which ids are popular, so popularity is not the id's order
            order = torch.randperm(size, generator=g)
            ids.append(order[torch.multinomial(weights, num_samples, replacement=True, generator=g)])
        ids_t = torch.stack(ids, dim=1)
        w_dense = torch.randn(DENSE_FEATURES, generator=g) * 0.5
        bias = [torch.randn(size, generator=g) * 0.7 for size in TABLE_SIZES]
        latent = [torch.randn(size, LATENT, generator=g) * 0.6 for size in TABLE_SIZES]
        logit = dense @ w_dense - 1.0
        for t in range(len(TABLE_SIZES)):
            logit = logit + bias[t][ids_t[:, t]]
            for u in range(t + 1, len(TABLE_SIZES)):
                logit = logit + (latent[t][ids_t[:, t]] * latent[u][ids_t[:, u]]).sum(1)
        self.prob = torch.sigmoid(logit)
        """The true click probability of each sample (the teacher's)."""
        self.x = torch.cat([dense, ids_t.float()], dim=1)
        self.y = torch.bernoulli(self.prob, generator=g).long()

    def __len__(self) -> int:
        return len(self.x)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[ids], self.y[ids]

    def bayes_auc(self, start: int = 0, stop: int | None = None) -> float:
        """AUC of the true probabilities on samples [start, stop): the best any model can do."""
        return auc(self.prob[start:stop], self.y[start:stop])


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random click scores above a random non-click
    (Mann-Whitney U from ranks; ties get their average rank)."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    unique, inverse = scores.unique(return_inverse=True)
    if len(unique) < len(scores):  # average the ranks of tied scores
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both clicks and non-clicks")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def build_clicks(cfg: DataConfig, seed: int = 0) -> tuple[Subset, Subset, ClickSpec]:
    """(train, validation, spec) for data.source = 'clicks'; validation is the tail."""
    log = ClickLog(cfg.num_samples, seed)
    n_val = int(len(log) * cfg.val_fraction)
    spec = ClickSpec(kind="classes", in_features=DENSE_FEATURES + len(TABLE_SIZES), num_classes=2)
    return Subset(log, 0, len(log) - n_val), Subset(log, len(log) - n_val, len(log)), spec
