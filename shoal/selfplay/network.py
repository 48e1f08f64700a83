"""The policy-value network of AlphaZero: one residual convolutional trunk, a policy head (a
logit per move) and a value head (the expected result for the player to move, in (-1, 1)).

Silver et al., "Mastering the game of Go without human knowledge" (AlphaGo Zero), Nature 2017:
a tower of residual blocks (He et al. 2016), each two 3x3 convolutions with batch norm; the
policy head a 1x1 convolution to 2 planes and a linear layer, the value head a 1x1 convolution
to 1 plane, a hidden linear layer and tanh. The loss is theirs without the L2 term (the
optimizer's weight decay holds it): cross-entropy of the policy against the search's visit
distribution plus the squared error of the value against the game's result.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Evaluate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class PolicyValueNet(nn.Module):
    """forward(x [B, planes, h, w]) -> (policy logits [B, action_size], value [B] in (-1, 1)).

    `channels` is the trunk's width, `blocks` its residual blocks (0: the stem alone). The game
    only fixes the input planes, the board size and the number of moves.
    """

    def __init__(self, game, channels: int = 64, blocks: int = 4, value_hidden: int = 64):
        super().__init__()
        if channels < 1:
            raise ValueError(f"PolicyValueNet: channels = {channels}; it must be >= 1")
        if blocks < 0:
            raise ValueError(f"PolicyValueNet: blocks = {blocks}; it must be >= 0")
        planes, height, width = game.input_shape
        self.game_name = game.name
        self.action_size = game.action_size
        cells = height * width
        self.stem = nn.Sequential(nn.Conv2d(planes, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.trunk = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.policy_conv = nn.Sequential(nn.Conv2d(channels, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU())
        self.policy_fc = nn.Linear(2 * cells, game.action_size)
        self.value_conv = nn.Sequential(nn.Conv2d(channels, 1, 1, bias=False), nn.BatchNorm2d(1), nn.ReLU())
        self.value_fc = nn.Sequential(nn.Linear(cells, value_hidden), nn.ReLU(), nn.Linear(value_hidden, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(self.stem(x))
        logits = self.policy_fc(self.policy_conv(h).flatten(1))
        value = torch.tanh(self.value_fc(self.value_conv(h).flatten(1))).squeeze(1)
        return logits, value


class Losses(NamedTuple):
    total: torch.Tensor  # policy + value: what the optimizer minimises
    policy: torch.Tensor  # cross-entropy against the visit distribution (mean over the batch)
    value: torch.Tensor  # squared error against the result (mean over the batch)


def loss(net: nn.Module, planes: torch.Tensor, policy_targets: torch.Tensor, value_targets: torch.Tensor) -> Losses:
    """AlphaZero's loss on a batch: (z - v)^2 - pi . log p, averaged (`net` may be DDP-wrapped)."""
    logits, value = net(planes)
    policy_loss = -(policy_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    value_loss = F.mse_loss(value, value_targets)
    return Losses(policy_loss + value_loss, policy_loss, value_loss)


def evaluator(net: nn.Module) -> Evaluate:
    """The search's view of `net`: planes (B, ...) as numpy -> (priors (B, action_size) summing to 1,
    values (B,)), both float64 numpy, computed without gradients in the net's current mode (put it
    in eval mode first: batch norm then uses its running statistics, so a position's evaluation
    does not depend on the others in its batch)."""
    device = next(net.parameters()).device

    def evaluate(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, value = net(torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)).to(device))
            priors = torch.softmax(logits.double(), dim=1)
        return priors.cpu().numpy(), value.double().cpu().numpy()

    return evaluate
