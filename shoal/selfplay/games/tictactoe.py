"""Tic-tac-toe on 3x3 bitboards, from the perspective of the player to move.

A state is (mover, opponent): two 9-bit ints, bit `3 * row + col` set where that player has a
stone. Playing a move swaps the pair, so the player to move always comes first and a position
reached by either colour is one state (it is the same problem for the player to move).
"""

from __future__ import annotations

import numpy as np

LINES = tuple(sum(1 << i for i in line) for line in (
    (0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)))
FULL = (1 << 9) - 1
BITS = np.array([1 << i for i in range(9)], dtype=np.int64)


def has_line(stones: int) -> bool:
    return any(stones & line == line for line in LINES)


class TicTacToe:
    name = "tictactoe"
    action_size = 9
    input_shape = (2, 3, 3)

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def legal(self, state: tuple[int, int]) -> np.ndarray:
        if self.outcome(state) is not None:
            return np.zeros(9, dtype=bool)
        return ((state[0] | state[1]) & BITS) == 0

    def play(self, state: tuple[int, int], action: int) -> tuple[int, int]:
        mover, opponent = state
        bit = 1 << action
        if (mover | opponent) & bit:
            raise ValueError(f"tic-tac-toe: square {action} is taken in\n{self.render(state)}")
        return (opponent, mover | bit)

    def outcome(self, state: tuple[int, int]) -> float | None:
        mover, opponent = state
        if has_line(opponent):  # the player who just moved completed a line
            return -1.0
        if has_line(mover):  # unreachable in play; a hand-built position may hold it
            return 1.0
        if (mover | opponent) == FULL:
            return 0.0
        return None

    def encode(self, state: tuple[int, int]) -> np.ndarray:
        mover, opponent = state
        planes = np.stack([(mover & BITS) != 0, (opponent & BITS) != 0])
        return planes.reshape(2, 3, 3).astype(np.float32)

    def symmetries(self, planes: np.ndarray, policy: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The 8 symmetries of the square (4 rotations, each with and without a mirror)."""
        board_policy = policy.reshape(*policy.shape[:-1], 3, 3)
        out = []
        for flip in (False, True):
            p = np.flip(planes, -1) if flip else planes
            q = np.flip(board_policy, -1) if flip else board_policy
            for turns in range(4):
                out.append((np.ascontiguousarray(np.rot90(p, turns, axes=(-2, -1))),
                            np.ascontiguousarray(np.rot90(q, turns, axes=(-2, -1))).reshape(policy.shape)))
        return out

    def render(self, state: tuple[int, int]) -> str:
        mover, opponent = state
        cells = ["X" if mover >> i & 1 else "O" if opponent >> i & 1 else "." for i in range(9)]
        return "\n".join("".join(cells[r * 3:r * 3 + 3]) for r in range(3)) + "\n(X to move)"


GAME = TicTacToe()
