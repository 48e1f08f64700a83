"""How strong a network is: players (the network with a small search and no noise, plain MCTS
with random rollouts, perfect minimax, a Connect Four solver), matches between two players with
both colours, and agreement with a perfect player on a fixed set of positions.

As AlphaZero's evaluations and OpenSpiel's `alpha_zero` evaluator do (Silver et al. 2018;
Lanctot et al., "OpenSpiel", 2019): the opponent is plain Monte Carlo tree search with random
rollouts (Kocsis and Szepesvari 2006; Coulom 2006) at fixed simulation counts, both colours.
A player is a callable state -> move; one with randomness holds its own generator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shoal.selfplay.games.base import Game, State
from shoal.selfplay.mcts import Evaluate, network_leaves, rollout_leaves, search_trees
from shoal.selfplay.network import evaluator

Player = Callable[[State], int]
ROLLOUT_C_PUCT = 2.5  # plain MCTS: uniform priors, so PUCT's exploration term needs a larger constant


def network_player(game: Game, evaluate: Evaluate, simulations: int, c_puct: float = 1.5) -> Player:
    """The network as a player: the most visited move of a noiseless PUCT search of `simulations`
    (0: the policy head's most likely legal move, no search)."""
    leaves = network_leaves(game, evaluate)

    def play(state: State) -> int:
        if simulations == 0:
            priors, _ = leaves([state])
            return int(np.argmax(np.where(game.legal(state), priors[0], -1.0)))
        root = search_trees(game, [state], leaves, simulations, c_puct, 1.0, 0.0, np.random.default_rng(0))[0]
        return int(np.argmax(root.visits))
    return play


def mcts_player(game: Game, simulations: int, rng: np.random.Generator, c_puct: float = ROLLOUT_C_PUCT) -> Player:
    """Plain MCTS: uniform priors, one random rollout per leaf, `simulations` per move, the most
    visited move (ties to the lowest)."""
    leaves = rollout_leaves(game, rng)

    def play(state: State) -> int:
        root = search_trees(game, [state], leaves, simulations, c_puct, 1.0, 0.0, rng)[0]
        return int(np.argmax(root.visits))
    return play


class Minimax:
    """Exact game values by memoised negamax: for games small enough to enumerate (tic-tac-toe)."""

    def __init__(self, game: Game):
        self.game = game
        self.values: dict = {}

    def value(self, state: State) -> float:
        """The result of perfect play from `state` for the player to move."""
        known = self.values.get(state)
        if known is not None:
            return known
        result = self.game.outcome(state)
        if result is None:
            result = max(-self.value(self.game.play(state, int(a))) for a in np.flatnonzero(self.game.legal(state)))
        self.values[state] = result
        return result

    def move_values(self, state: State) -> dict[int, float]:
        return {int(a): -self.value(self.game.play(state, int(a))) for a in np.flatnonzero(self.game.legal(state))}

    def optimal_moves(self, state: State) -> list[int]:
        values = self.move_values(state)
        best = max(values.values())
        return sorted(m for m, v in values.items() if v == best)


def perfect_player(game: Game, rng: np.random.Generator, minimax: Minimax | None = None) -> Player:
    """Perfect play by minimax, uniformly random among the moves that keep the game's value."""
    solver = minimax or Minimax(game)

    def play(state: State) -> int:
        moves = solver.optimal_moves(state)
        return moves[int(rng.integers(len(moves)))]
    return play


def solver_player(rng: np.random.Generator) -> Player:
    """Perfect Connect Four (by the sign of the solver's scores), random among the equal moves.
    Pure Python: fast from ~20 stones on, slow (minutes) from the opening."""
    from shoal.selfplay.solver import Solver
    solver = Solver()

    def play(state: State) -> int:
        moves = solver.optimal_moves(state)
        return moves[int(rng.integers(len(moves)))]
    return play


@dataclasses.dataclass
class MatchResult:
    """Games from player A's side; `first`/`second` split them by who moved first."""
    wins: int = 0
    draws: int = 0
    losses: int = 0
    first: tuple[int, int, int] = (0, 0, 0)  # (wins, draws, losses) with A moving first
    second: tuple[int, int, int] = (0, 0, 0)  # the same with A moving second

    @property
    def games(self) -> int:
        return self.wins + self.draws + self.losses


def play_game(game: Game, first: Player, second: Player, state: State | None = None) -> float:
    """One game from `state` (the start by default); the result for the player moving first."""
    state = game.initial() if state is None else state
    players, turn = (first, second), 0
    while (result := game.outcome(state)) is None:
        state = game.play(state, players[turn](state))
        turn = 1 - turn
    return result if turn == 0 else -result  # `result` is for the player to move, players[turn]


def match(game: Game, player_a: Player, player_b: Player, games: int, rng: np.random.Generator,
          opening_moves: int = 0) -> MatchResult:
    """`games` games, A moving first (from the start position) in the even ones and second in the odd ones. With
    `opening_moves`, each pair of games (one per colour) starts from the same position of that
    many random moves drawn by `rng`, so that two deterministic players play varied games."""
    tallies = {True: [0, 0, 0], False: [0, 0, 0]}
    start = game.initial()
    for index in range(games):
        a_first = index % 2 == 0
        if a_first:
            start = _random_opening(game, opening_moves, rng)
        result = play_game(game, player_a, player_b, start) if a_first else -play_game(game, player_b, player_a, start)
        tallies[a_first][0 if result > 0 else 1 if result == 0 else 2] += 1
    first, second = tuple(tallies[True]), tuple(tallies[False])
    return MatchResult(wins=first[0] + second[0], draws=first[1] + second[1], losses=first[2] + second[2],
                       first=first, second=second)


def _random_opening(game: Game, moves: int, rng: np.random.Generator) -> State:
    while True:
        state = game.initial()
        for _ in range(moves):
            state = game.play(state, int(rng.choice(np.flatnonzero(game.legal(state)))))
            if game.outcome(state) is not None:
                break
        if game.outcome(state) is None:
            return state


def agreement(player: Player, positions: list[tuple[State, list[int]]]) -> float:
    """The share of `positions` (state, optimal moves) where `player`'s move is optimal."""
    return sum(player(state) in optimal for state, optimal in positions) / len(positions)


def reference_positions(game: Game, count: int = 200, seed: int = 0,
                        cache_dir: Path | None = None) -> list[tuple[State, list[int]]]:
    """The fixed position set of a game with its optimal moves: for tic-tac-toe `count` of the
    reachable open positions where some move throws the result away (minimax); for Connect Four
    the solver's set (solver.solved_positions, 100 positions of 16-28 stones, cached as
    connect4_positions.json under `cache_dir`). Empty for a game with neither."""
    if game.name == "connect4":
        from shoal.selfplay.solver import solved_positions
        cache = None if cache_dir is None else Path(cache_dir) / "connect4_positions.json"
        solved = solved_positions(count=min(count, 100), min_stones=16, max_stones=28, seed=seed, cache=cache)
        return [(game.from_moves(p["moves"]), list(p["optimal"])) for p in solved]
    if game.name == "tictactoe":
        minimax = Minimax(game)
        minimax.value(game.initial())
        candidates = sorted((s for s, v in minimax.values.items() if game.outcome(s) is None), key=repr)
        chosen = []
        for state in candidates:
            values = minimax.move_values(state)
            if len(set(values.values())) > 1:
                chosen.append((state, minimax.optimal_moves(state)))
        picks = np.random.default_rng(seed).permutation(len(chosen))[:count]
        return [chosen[i] for i in sorted(picks)]
    return []


_POSITIONS: dict[tuple[str, str], list] = {}  # made once per process: the solver's set takes a minute


def evaluate_version(game: Game, net: torch.nn.Module, cfg, seed: int, cache_dir: Path | None = None) -> dict[str, float]:
    """One evaluation of `net` as `cfg.selfplay` asks: against plain MCTS at each of
    `eval_mcts_simulations` (`eval_games` games, both colours), against perfect minimax for
    tic-tac-toe, and the share of the fixed position set where its move is optimal. Keys:
    win_rate_<opponent>, draw_rate_<opponent>, loss_rate_<opponent>, win_rate_<opponent>_first,
    win_rate_<opponent>_second (opponent 'mcts200', 'minimax', ...), solver_agreement (the
    network's search), solver_agreement_policy (its policy head alone)."""
    sp = cfg.selfplay
    rng = np.random.default_rng(seed)
    net.eval()
    evaluate = evaluator(net)
    player = network_player(game, evaluate, sp.eval_simulations, sp.c_puct)
    opponents: dict[str, Player] = {f"mcts{n}": mcts_player(game, int(n), rng) for n in sp.eval_mcts_simulations}
    if game.name == "tictactoe":
        opponents["minimax"] = perfect_player(game, rng)
    results: dict[str, float] = {}
    for name, opponent in opponents.items():
        outcome = match(game, player, opponent, sp.eval_games, rng)
        half_first, half_second = max(1, sum(outcome.first)), max(1, sum(outcome.second))
        results.update({f"win_rate_{name}": outcome.wins / outcome.games, f"draw_rate_{name}": outcome.draws / outcome.games,
                        f"loss_rate_{name}": outcome.losses / outcome.games,
                        f"win_rate_{name}_first": outcome.first[0] / half_first,
                        f"win_rate_{name}_second": outcome.second[0] / half_second})
    key = (game.name, str(cache_dir))
    if key not in _POSITIONS:
        _POSITIONS[key] = reference_positions(game, cache_dir=cache_dir)
    positions = _POSITIONS[key]
    if positions:
        results["solver_agreement"] = agreement(player, positions)
        results["solver_agreement_policy"] = agreement(network_player(game, evaluate, 0), positions)
    return results
