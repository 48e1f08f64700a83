"""Self-play: many games at once, each move chosen from a batched MCTS over all of them, every
position kept as a training example (AlphaZero; Silver et al. 2017, 2018).

A position's example is its encoded planes, the search's visit distribution as the policy target
pi, and the game's final result from the perspective of the player who was to move there as the
value target z (optionally mixed with the root search's own value q, z' = (1 - w) z + w q, which
lowers the noise of z in games full of exploratory moves; "Lessons from AlphaZero", Prasad et
al. 2018; w = 0 is AlphaZero). The first `temperature_moves` moves of a game are sampled in proportion to the
visit counts (temperature 1) so that games differ; later moves take the most visited move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shoal.selfplay.games.base import Game
from shoal.selfplay.mcts import Evaluate, network_leaves, search_trees


@dataclass(kw_only=True)
class SelfPlaySettings:
    simulations: int = 64  # MCTS simulations per move
    c_puct: float = 1.5  # PUCT exploration constant
    dirichlet_alpha: float = 0.3  # root noise concentration (AlphaZero: ~10 / typical legal moves)
    dirichlet_fraction: float = 0.25  # share of the root prior replaced by noise; 0 means none
    temperature_moves: int = 8  # moves sampled by visit counts, then the most visited
    leaves_per_game: int = 1  # leaves per game per simulation step (> 1 adds virtual loss)
    value_target_q: float = 0.0  # w of z' = (1 - w) z + w q; 0 is AlphaZero's z alone

    def __post_init__(self) -> None:
        for name, low in (("simulations", 1), ("temperature_moves", 0), ("leaves_per_game", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"SelfPlaySettings.{name} = {getattr(self, name)}; it must be >= {low}")
        for name in ("dirichlet_fraction", "value_target_q"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SelfPlaySettings.{name} = {getattr(self, name)}; it must be in [0, 1]")


@dataclass
class GameRecord:
    """One finished game as training examples, one row per position played. The tensor fields
    travel as tensors (shoal/selfplay/transport.py); the others are plain values."""

    planes: torch.Tensor  # float32 (moves, planes, h, w): each position from its mover's perspective
    policy_targets: torch.Tensor  # float32 (moves, action_size): the search's visit distribution
    value_targets: torch.Tensor  # float32 (moves,): the final result for the position's mover (or z')
    weight_version: int  # the network weights that played the game
    moves: int  # plies played
    result: float  # the final result for the player who moved first: +1, 0 or -1


def choose_move(visits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Temperature 1 samples in proportion to the visits; 0 takes the most visited (ties by the
    lowest move, so that evaluation is deterministic)."""
    if temperature > 0:
        weights = visits ** (1.0 / temperature)
        return int(rng.choice(len(visits), p=weights / weights.sum()))
    return int(np.argmax(visits))


def play_games(game: Game, evaluate: Evaluate, n_games: int, settings: SelfPlaySettings, rng: np.random.Generator,
               weight_version: int) -> list[GameRecord]:
    """Play `n_games` games of self-play at once, every search step's leaves of all unfinished games
    evaluated in one `evaluate` call; the games in the order they were started."""
    states = [game.initial() for _ in range(n_games)]
    leaves = network_leaves(game, evaluate)
    planes: list[list[np.ndarray]] = [[] for _ in range(n_games)]
    policies: list[list[np.ndarray]] = [[] for _ in range(n_games)]
    searched_values: list[list[float]] = [[] for _ in range(n_games)]  # root q, for the mover
    results: list[float | None] = [None] * n_games
    ply = 0
    while True:
        live = [g for g in range(n_games) if results[g] is None]
        if not live:
            break
        roots = search_trees(game, [states[g] for g in live], leaves, settings.simulations, settings.c_puct,
                             settings.dirichlet_alpha, settings.dirichlet_fraction, rng, settings.leaves_per_game)
        temperature = 1.0 if ply < settings.temperature_moves else 0.0
        for g, root in zip(live, roots):
            counts = root.visits
            planes[g].append(game.encode(states[g]))
            policies[g].append(counts / counts.sum())
            searched_values[g].append(root.q_value())
            states[g] = game.play(states[g], choose_move(counts, temperature, rng))
            outcome = game.outcome(states[g])
            if outcome is not None:
                # `outcome` is for the player to move after the last ply; the first player moved
                # at even plies, so it is theirs when the game lasted an even number of plies.
                moves = len(planes[g])
                results[g] = outcome if moves % 2 == 0 else -outcome
        ply += 1
    records = []
    for g in range(n_games):
        moves = len(planes[g])
        first = results[g]
        values = np.array([first if i % 2 == 0 else -first for i in range(moves)])
        w = settings.value_target_q
        if w > 0:
            values = (1.0 - w) * values + w * np.array(searched_values[g])
        values = values.astype(np.float32)
        records.append(GameRecord(planes=torch.from_numpy(np.stack(planes[g])),
                                  policy_targets=torch.from_numpy(np.stack(policies[g]).astype(np.float32)),
                                  value_targets=torch.from_numpy(values), weight_version=int(weight_version),
                                  moves=moves, result=float(first)))
    return records
