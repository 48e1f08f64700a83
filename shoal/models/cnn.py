"""A small ResNet for images: the reference `model.name = "cnn"`.

He et al., "Deep Residual Learning for Image Recognition" (2016): a 3x3 stem, stages of
basic blocks (two 3x3 convolutions and a skip connection), each later stage halving the
resolution and doubling the width, then global average pooling and a linear head. Batch
norm is left out on purpose: its running statistics would differ between data-parallel
ranks and break the equivalence of layouts; GroupNorm gives the same stability per sample.
"""

from __future__ import annotations

import torch
from torch import nn

FLAVOURS: dict[str, dict[str, int]] = {
    "debug": {"dim": 8, "n_layers": 2},     # stages of one block: 8 -> 16 channels
    "small": {"dim": 32, "n_layers": 3},    # 32 -> 64 -> 128, two blocks each
    "medium": {"dim": 64, "n_layers": 4},
    "125m": {"dim": 128, "n_layers": 4},
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dim: int = 8, n_stages: int = 2, blocks: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim, 3, 1, 1, bias=False), _norm(dim), nn.ReLU())
        layers: list[nn.Module] = []
        width = dim
        for stage in range(n_stages):
            out = dim * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(width, out, 2 if stage and not b else 1))
                width = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_cnn(input_shape: tuple[int, ...], num_classes: int, flavour: str = "debug", *, dim: int = 0,
              n_layers: int = 0, dropout: float = 0.0) -> ResNet:
    """`n_layers` is the number of stages; the debug flavour has one block per stage, the others two."""
    preset = FLAVOURS[flavour]
    return ResNet(input_shape[0], num_classes, dim=dim or preset["dim"], n_stages=n_layers or preset["n_layers"],
                  blocks=1 if flavour == "debug" else 2, dropout=dropout)
