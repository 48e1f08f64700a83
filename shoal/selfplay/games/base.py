"""What a game is to the self-play engine: the rules of a two-player, alternating, zero-sum game
with perfect information, seen from the player to move.

A game is one module of shoal/selfplay/games/ that defines a `Game`-shaped object named `GAME`
(the registry in `__init__.py` finds it by the module's name). Search, self-play, the replay
buffer and the network know a game only through this protocol, as AlphaZero's algorithm knows
only the rules (Silver et al., "A general reinforcement learning algorithm that masters chess,
shogi, and Go through self-play", Science 2018).

States are immutable and hashable (tuples of ints, bitboards) so that a search may key on them.
Every value is from the perspective of the player TO MOVE in the state it describes; since the
players alternate, the value of a position for the player who just moved is its negation.
"""

from __future__ import annotations

from typing import Hashable, Protocol, runtime_checkable

import numpy as np

State = Hashable


@runtime_checkable
class Game(Protocol):
    """The rules of one game (see the module docstring for the conventions)."""

    name: str  # the registry name, the module's name in shoal/selfplay/games/
    action_size: int  # moves are integers 0 .. action_size-1; the policy has one entry each
    input_shape: tuple[int, int, int]  # (planes, height, width) of `encode`'s output

    def initial(self) -> State:
        """The position before the first move."""
        ...

    def legal(self, state: State) -> np.ndarray:
        """Bool mask of shape (action_size,): the moves allowed in `state` (none once it is over)."""
        ...

    def play(self, state: State, action: int) -> State:
        """The position after the player to move plays `action` (a legal move)."""
        ...

    def outcome(self, state: State) -> float | None:
        """+1 if the player to move has won, -1 if lost, 0 for a draw, None while the game goes on."""
        ...

    def encode(self, state: State) -> np.ndarray:
        """float32 planes (planes, height, width), the mover's stones first: the network's input."""
        ...

    def symmetries(self, planes: np.ndarray, policy: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every symmetric copy of a batch of training positions, the identity first: `planes`
        (B, planes, h, w) and `policy` (B, action_size) map to the same game under the board's
        symmetries (data augmentation, as AlphaGo Zero did with the dihedral group of Go).
        A game without symmetries returns [(planes, policy)]."""
        ...

    def render(self, state: State) -> str:
        """The position as text, for logs and test failures."""
        ...


def encode_states(game: Game, states: list) -> np.ndarray:
    """`encode` of many states stacked (B, planes, h, w), by the game's own vectorised
    `encode_batch(states)` when it has one."""
    own = getattr(game, "encode_batch", None)
    return own(states) if own is not None else np.stack([game.encode(s) for s in states])


def random_playout(game: Game, state: State, rng: np.random.Generator) -> float:
    """The result of uniformly random moves from `state` to the end, from the perspective of the
    player to move in `state`: the rollout of plain Monte Carlo tree search. A game may offer a
    faster `random_playout(state, rng)` of its own; `playout` picks it when there is one."""
    sign = 1.0
    while True:
        result = game.outcome(state)
        if result is not None:
            return sign * result
        moves = np.flatnonzero(game.legal(state))
        state = game.play(state, int(moves[rng.integers(len(moves))]))
        sign = -sign


def playout(game: Game, state: State, rng: np.random.Generator) -> float:
    """A random playout's result from the mover's perspective, by the game's own fast version if any."""
    own = getattr(game, "random_playout", None)
    return own(state, rng) if own is not None else random_playout(game, state, rng)
