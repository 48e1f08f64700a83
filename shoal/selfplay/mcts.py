"""Monte Carlo tree search with PUCT, AlphaZero's, searching many games at once so that the
network sees batches of positions instead of one at a time.

Silver et al., "Mastering the game of Go without human knowledge" (Nature 2017) and "A general
reinforcement learning algorithm that masters chess, shogi, and Go through self-play" (Science
2018). Each simulation descends from the root by PUCT (Rosin, "Multi-armed bandits with episode
context", 2011, in AlphaGo's form):

    a = argmax_a  Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))

until it reaches a position not expanded yet (the leaf). The leaf's network evaluation gives the
priors P of its moves and its value v; v is backed up the path, negated at each ply because the
players alternate (every value is from the perspective of the player to move where it is kept).
A finished game's position is a leaf whose value is the result itself, with no network call. At
the root, Dirichlet noise is mixed into the priors, P = (1 - fraction) P + fraction Dir(alpha),
so that self-play tries moves the network does not yet like. The answer is the root's visit
counts; the move choice (temperature) is the caller's (play.py).

Batching (lockstep): every simulation step descends once in every game's tree (or
`leaves_per_game` times, each descent adding a virtual loss to its path so the next descent in
the same tree goes elsewhere, as AlphaGo's asynchronous search did), gathers the leaves of all the
games, and evaluates them with ONE call of `evaluate`. With one game this is the plain, unbatched
search, and a batch of games gives each game exactly the result it gets alone (same noise draws,
same visits), only faster.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from shoal.selfplay.games.base import Game, State, encode_states, playout

Evaluate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # planes (B, ...) -> priors (B, A), values (B,)
EvaluateStates = Callable[[list], tuple[np.ndarray, np.ndarray]]  # states -> priors (B, A), values (B,)


class Node:
    """One expanded-or-not position of a search tree. Statistics are per move, in arrays, from the
    perspective of the player to move here: `value_sum[a] / visits[a]` is Q(s, a)."""

    __slots__ = ("state", "result", "priors", "visits", "value_sum", "total", "blocked", "children", "pending")

    def __init__(self, state: State, result: float | None):
        self.state = state
        self.result = result  # the game's outcome when it is over here, else None
        self.priors: np.ndarray | None = None  # None until expanded
        self.children: dict[int, Node] = {}
        self.pending = False  # a leaf waiting for its evaluation in this simulation step

    def expand(self, priors: np.ndarray, legal: np.ndarray) -> None:
        masked = np.where(legal, priors, 0.0)
        total = masked.sum()
        self.priors = masked / total if total > 0 else legal / legal.sum()
        self.visits = np.zeros(len(legal))
        self.value_sum = np.zeros(len(legal))
        self.total = 0
        self.blocked = np.where(legal, 0.0, -np.inf)  # illegal moves are never selected

    def select(self, c_puct: float) -> int:
        q = self.value_sum / np.maximum(self.visits, 1.0)
        u = (c_puct * math.sqrt(max(self.total, 1))) * self.priors / (1.0 + self.visits)
        return int(np.argmax(q + u + self.blocked))

    def q_value(self) -> float:
        """The mean value of the moves searched here, for the player to move."""
        return float(self.value_sum.sum() / self.total) if self.total else 0.0


def _backup(path: list[tuple[Node, int]], leaf_value: float) -> None:
    """Add the leaf's value (for the player to move at the leaf) along the path, negated per ply;
    the +1 takes back the virtual loss the descent added."""
    value = -leaf_value
    for node, action in reversed(path):
        node.value_sum[action] += 1.0 + value
        value = -value


def _undo(path: list[tuple[Node, int]]) -> None:
    for node, action in path:
        node.visits[action] -= 1.0
        node.value_sum[action] += 1.0
        node.total -= 1


def _descend(game: Game, root: Node, c_puct: float) -> tuple[Node, list[tuple[Node, int]]]:
    """Walk from `root` by PUCT to the first position not expanded (or finished), adding a visit
    and a virtual loss on each edge; the leaf and the path to it."""
    node, path = root, []
    while True:
        action = node.select(c_puct)
        node.visits[action] += 1.0
        node.value_sum[action] -= 1.0  # virtual loss: the edge looks lost until the backup
        node.total += 1
        path.append((node, action))
        child = node.children.get(action)
        if child is None:
            state = game.play(node.state, action)
            child = Node(state, game.outcome(state))
            node.children[action] = child
        if child.result is not None or child.priors is None:
            return child, path
        node = child


def add_dirichlet_noise(root: Node, alpha: float, fraction: float, rng: np.random.Generator) -> None:
    """AlphaZero's root noise over the legal moves: P = (1 - fraction) P + fraction Dir(alpha)."""
    legal = np.flatnonzero(np.isfinite(root.blocked))
    noise = rng.dirichlet(np.full(len(legal), alpha))
    root.priors[legal] = (1.0 - fraction) * root.priors[legal] + fraction * noise


def search_trees(game: Game, states: Sequence[State], evaluate_states: EvaluateStates, simulations: int,
                 c_puct: float, dirichlet_alpha: float, dirichlet_fraction: float, rng: np.random.Generator,
                 leaves_per_game: int = 1) -> list[Node]:
    """The searched trees of `states` (positions where the game goes on), all searched together:
    each step evaluates the leaves of every tree in one `evaluate_states` call. `simulations`
    descents per tree (a descent that meets a leaf another descent of the same step is waiting for
    is dropped, so with `leaves_per_game` > 1 a root may end with a few visits less).
    `dirichlet_fraction` 0 means no noise (evaluation)."""
    if simulations < 1:
        raise ValueError(f"search: simulations = {simulations}; it must be >= 1")
    if leaves_per_game < 1:
        raise ValueError(f"search: leaves_per_game = {leaves_per_game}; it must be >= 1")
    roots = []
    for state in states:
        result = game.outcome(state)
        if result is not None:
            raise ValueError(f"search: a root is a finished game (result {result}):\n{game.render(state)}")
        roots.append(Node(state, None))
    if not roots:
        return roots
    priors, _ = evaluate_states([r.state for r in roots])
    for root, p in zip(roots, priors):
        root.expand(p, game.legal(root.state))
        if dirichlet_fraction > 0:
            add_dirichlet_noise(root, dirichlet_alpha, dirichlet_fraction, rng)
    for start in range(0, simulations, leaves_per_game):
        leaves: list[tuple[Node, list[tuple[Node, int]]]] = []
        for root in roots:
            for _ in range(min(leaves_per_game, simulations - start)):
                leaf, path = _descend(game, root, c_puct)
                if leaf.result is not None:
                    _backup(path, leaf.result)
                elif leaf.pending:  # another descent of this step already waits on this leaf
                    _undo(path)
                else:
                    leaf.pending = True
                    leaves.append((leaf, path))
        if not leaves:
            continue
        priors, values = evaluate_states([leaf.state for leaf, _ in leaves])
        for (leaf, path), p, v in zip(leaves, priors, values):
            leaf.pending = False
            leaf.expand(p, game.legal(leaf.state))
            _backup(path, float(v))
    return roots


def network_leaves(game: Game, evaluate: Evaluate) -> EvaluateStates:
    """Leaves evaluated by a network: the states encoded and stacked into one batch."""
    def evaluate_states(states: list) -> tuple[np.ndarray, np.ndarray]:
        return evaluate(encode_states(game, states))
    return evaluate_states


def rollout_leaves(game: Game, rng: np.random.Generator, rollouts: int = 1) -> EvaluateStates:
    """Leaves evaluated as plain MCTS does: uniform priors and the mean result of `rollouts`
    uniformly random games from the leaf (Kocsis and Szepesvari 2006; Coulom 2006)."""
    def evaluate_states(states: list) -> tuple[np.ndarray, np.ndarray]:
        priors = np.full((len(states), game.action_size), 1.0 / game.action_size)
        values = np.array([sum(playout(game, s, rng) for _ in range(rollouts)) / rollouts for s in states])
        return priors, values
    return evaluate_states


def search(game: Game, states: Sequence[State], evaluate: Evaluate, simulations: int, c_puct: float,
           dirichlet_alpha: float, dirichlet_fraction: float, rng: np.random.Generator,
           leaves_per_game: int = 1) -> list[np.ndarray]:
    """The root visit counts (float64, action_size each) of a PUCT search from each of `states`,
    with the network's `evaluate` called on batches of leaves (one per game per simulation step,
    or `leaves_per_game` with virtual loss). One state is the unbatched search."""
    roots = search_trees(game, states, network_leaves(game, evaluate), simulations, c_puct, dirichlet_alpha,
                         dirichlet_fraction, rng, leaves_per_game)
    return [root.visits.copy() for root in roots]
