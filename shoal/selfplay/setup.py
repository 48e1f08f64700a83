"""The engine's pieces as a self-play run's config asks for them: the game by name, the network,
the replay buffer, the search settings of self-play, an actor's random stream.

The learner, the actors and the evaluator build them here, so the three agree.
"""

from __future__ import annotations

import dataclasses

import torch

from shoal.config import Config, ConfigError


def load_game(name: str):
    """The game `name` (selfplay.game), or a ConfigError naming the games there are."""
    from shoal.selfplay.games import get_game
    try:
        return get_game(name)
    except ValueError as err:
        raise ConfigError(f"selfplay.game: {err}") from None


def build_network(game, cfg: Config) -> torch.nn.Module:
    from shoal.selfplay.network import PolicyValueNet
    return PolicyValueNet(game, channels=cfg.selfplay.channels, blocks=cfg.selfplay.blocks)


def build_buffer(game, cfg: Config):
    from shoal.selfplay.replay import ReplayBuffer
    return ReplayBuffer(cfg.selfplay.replay_size)


def record_type() -> type:
    from shoal.selfplay.play import GameRecord
    return GameRecord


def record_length(record) -> int:
    """Positions in one game record (the rows of its first tensor field)."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 0


def make_evaluate(net: torch.nn.Module):
    from shoal.selfplay.network import evaluator
    return evaluator(net)


def selfplay_settings(cfg: Config):
    from shoal.selfplay.play import SelfPlaySettings
    sp = cfg.selfplay
    return SelfPlaySettings(simulations=sp.simulations, c_puct=sp.c_puct, dirichlet_alpha=sp.dirichlet_alpha,
                            dirichlet_fraction=sp.dirichlet_fraction, temperature_moves=sp.temperature_moves,
                            value_target_q=sp.value_target_q)


def actor_rng(seed: int, slot: int, incarnation: int):
    """A random stream of its own for each actor process: a replacement plays other games than its
    predecessor, and two runs of the same config play the same ones."""
    import numpy as np
    return np.random.default_rng([seed, slot, incarnation])
