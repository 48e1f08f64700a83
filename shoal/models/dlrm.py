"""A DLRM-style recommendation model (Naumov et al., "Deep Learning Recommendation Model
for Personalization and Recommendation Systems", 2019): a bottom MLP for the dense
features, one embedding table per categorical field, pairwise dot products between all
of those vectors, and a top MLP on the result.

The tables are what grows past one worker's memory in production (billions of ids), so
they are the part tensor parallelism shards (see shoal/parallel/tensor.py).
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.config import ConfigError, ModelConfig
from shoal.data.spec import DataSpec

FLAVOURS: dict[str, dict[str, int]] = {
    "debug": {"dim": 16, "n_layers": 2},
    "small": {"dim": 64, "n_layers": 2},
    "medium": {"dim": 128, "n_layers": 3},
    "125m": {"dim": 256, "n_layers": 3},
}


def _mlp(width_in: int, width: int, n_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width_in = width
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, dense_features: int, table_sizes: tuple[int, ...], num_classes: int = 2, *,
                 dim: int = 16, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.dense_features = dense_features
        self.bottom = _mlp(dense_features, dim, n_layers, dropout)
        self.embeddings = nn.ModuleList(nn.Embedding(size, dim) for size in table_sizes)
        fields = len(table_sizes) + 1
        self.register_buffer("pairs", torch.triu_indices(fields, fields, offset=1), persistent=False)
        self.top = nn.Sequential(_mlp(dim + fields * (fields - 1) // 2, dim, n_layers, dropout),
                                 nn.Linear(dim, num_classes))
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, ids = x[:, :self.dense_features], x[:, self.dense_features:].long()
        bottom = self.bottom(dense)
        vectors = torch.stack([bottom] + [table(ids[:, i]) for i, table in enumerate(self.embeddings)], dim=1)
        dots = vectors @ vectors.transpose(1, 2)  # (batch, fields, fields): every pair's dot product
        interactions = dots[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, interactions], dim=1))


def build_dlrm(spec: DataSpec, cfg: ModelConfig) -> DLRM:
    """A DLRM for the click data described by `spec` (a shoal.data.clicks.ClickSpec)."""
    table_sizes = getattr(spec, "table_sizes", None)
    if not table_sizes:
        raise ConfigError("model.name = 'dlrm' needs categorical data; use data.source = 'clicks'")
    preset = FLAVOURS[cfg.flavour]
    return DLRM(spec.dense_features, tuple(table_sizes), spec.num_classes, dim=cfg.dim or preset["dim"],
                n_layers=cfg.n_layers or preset["n_layers"], dropout=cfg.dropout)
