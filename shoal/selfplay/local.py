"""Self-play in one process, the AlphaZero loop with nothing distributed: play a batch of games
with the current network, add them to the replay buffer, train on the buffer, repeat (Silver et
al. 2017, 2018). The test that tic-tac-toe learns to perfect play runs this; the distributed
runtime runs the same pieces (play.play_games, replay.ReplayBuffer, learn.train_steps) in actor
and learner processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from shoal.selfplay.games.base import Game
from shoal.selfplay.learn import train_steps
from shoal.selfplay.network import PolicyValueNet, evaluator
from shoal.selfplay.play import SelfPlaySettings, play_games
from shoal.selfplay.replay import ReplayBuffer


@dataclass(kw_only=True)
class LocalSettings:
    play: SelfPlaySettings = field(default_factory=SelfPlaySettings)
    versions: int = 20  # play-then-train rounds; each ends with a new weight version
    games_per_version: int = 32  # games played (all at once, one batched search) per version
    train_steps_per_version: int = 40
    batch_size: int = 64
    replay_size: int = 10_000  # positions
    lr: float = 2e-3
    weight_decay: float = 1e-4
    channels: int = 32
    blocks: int = 1
    augment: bool = True  # train on the game's symmetric copies of each position


@dataclass
class VersionStats:
    version: int
    games: int
    positions: int
    play_seconds: float
    train_seconds: float
    losses: dict[str, float]


def train_locally(game: Game, settings: LocalSettings, seed: int = 0,
                  on_version: Callable[[VersionStats, PolicyValueNet], None] | None = None
                  ) -> tuple[PolicyValueNet, list[VersionStats]]:
    """Train a fresh network by self-play for `settings.versions` versions; the network (in eval
    mode) and each version's statistics. `on_version` sees each version as it ends."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    net = PolicyValueNet(game, channels=settings.channels, blocks=settings.blocks)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    buffer = ReplayBuffer(settings.replay_size)
    history = []
    for version in range(settings.versions):
        started = time.perf_counter()
        net.eval()  # batch norm on running statistics: a position's evaluation ignores its batch
        records = play_games(game, evaluator(net), settings.games_per_version, settings.play, rng, version)
        buffer.add(records)
        played = time.perf_counter()
        losses = train_steps(net, optimizer, buffer, settings.train_steps_per_version, settings.batch_size, generator,
                             game.symmetries if settings.augment else None)
        stats = VersionStats(version=version + 1, games=len(records), positions=sum(r.moves for r in records),
                             play_seconds=played - started, train_seconds=time.perf_counter() - played, losses=losses)
        history.append(stats)
        if on_version is not None:
            on_version(stats, net)
    net.eval()
    return net, history
