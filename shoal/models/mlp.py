"""A multi-layer perceptron for tabular features (classification or regression)."""

from __future__ import annotations

from torch import nn

FLAVOURS: dict[str, dict[str, int]] = {
    "debug": {"dim": 64, "n_layers": 2},
    "small": {"dim": 256, "n_layers": 3},
    "medium": {"dim": 1024, "n_layers": 3},
    "125m": {"dim": 4096, "n_layers": 8},
}


class MLP(nn.Sequential):
    """Linear -> ReLU blocks, then a linear head. A Sequential so tensor-parallel plans can
    name the layers by index ("0", "2", ...)."""

    def __init__(self, in_features: int, out_features: int, dim: int = 64, n_layers: int = 2,
                 dropout: float = 0.0):
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_layers):
            layers += [nn.Linear(width, dim), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = dim
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def build_mlp(in_features: int, out_features: int, flavour: str = "debug", *, dim: int = 0,
              n_layers: int = 0, dropout: float = 0.0) -> MLP:
    preset = FLAVOURS[flavour]
    return MLP(in_features, out_features, dim=dim or preset["dim"], n_layers=n_layers or preset["n_layers"],
               dropout=dropout)
