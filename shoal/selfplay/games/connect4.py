"""Connect Four (7 columns x 6 rows) on bitboards, as in Pascal Pons' solver
("Solving Connect 4: how to build a perfect AI", 2019, http://blog.gamesolver.org).

A state is (mover, mask): `mask` has a bit for every stone, `mover` for the stones of the player
to move. Column c owns bits 7c .. 7c+6, bottom first; the 7th bit of each column stays empty so
that shifts never carry a line from one column into the next. Playing column c adds the lowest
empty bit of that column with one addition (`mask + bottom(c)`), and the new mover's stones are
the old `mover ^ mask`. The move is the column, 0 (left) to 6.
"""

from __future__ import annotations

import numpy as np

WIDTH, HEIGHT = 7, 6
H1 = HEIGHT + 1
CELLS = WIDTH * HEIGHT


def bottom_mask(col: int) -> int:
    return 1 << (col * H1)


def top_mask(col: int) -> int:
    return 1 << (HEIGHT - 1 + col * H1)


def column_mask(col: int) -> int:
    return ((1 << HEIGHT) - 1) << (col * H1)


BOTTOM = tuple(bottom_mask(c) for c in range(WIDTH))
TOP = tuple(top_mask(c) for c in range(WIDTH))
BOTTOM_ROW = sum(BOTTOM)
BOARD = BOTTOM_ROW * ((1 << HEIGHT) - 1)  # every playable cell
# (row from the top, column) of the encoded planes <- bit index of the bitboard
SHIFTS = np.array([[c * H1 + (HEIGHT - 1 - r) for c in range(WIDTH)] for r in range(HEIGHT)], dtype=np.uint64)


def alignment(stones: int) -> bool:
    """True when `stones` hold four in a row (horizontal, both diagonals, vertical)."""
    for shift in (H1, HEIGHT, H1 + 1, 1):
        pairs = stones & (stones >> shift)
        if pairs & (pairs >> (2 * shift)):
            return True
    return False


class ConnectFour:
    name = "connect4"
    action_size = WIDTH
    input_shape = (2, HEIGHT, WIDTH)

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def legal(self, state: tuple[int, int]) -> np.ndarray:
        if self.outcome(state) is not None:
            return np.zeros(WIDTH, dtype=bool)
        mask = state[1]
        return np.array([not mask & TOP[c] for c in range(WIDTH)])

    def play(self, state: tuple[int, int], action: int) -> tuple[int, int]:
        mover, mask = state
        if mask & TOP[action]:
            raise ValueError(f"connect4: column {action} is full in\n{self.render(state)}")
        return (mover ^ mask, mask | (mask + BOTTOM[action]))

    def outcome(self, state: tuple[int, int]) -> float | None:
        mover, mask = state
        if alignment(mover ^ mask):  # the player who just moved connected four
            return -1.0
        if mask == BOARD:
            return 0.0
        return None

    def encode(self, state: tuple[int, int]) -> np.ndarray:
        mover, mask = state
        ours = (np.uint64(mover) >> SHIFTS) & np.uint64(1)
        theirs = (np.uint64(mover ^ mask) >> SHIFTS) & np.uint64(1)
        return np.stack([ours, theirs]).astype(np.float32)

    def encode_batch(self, states: list) -> np.ndarray:
        """`encode` of many states at once (B, 2, 6, 7), one vectorised shift for all: the search
        encodes every leaf of a simulation step together (base.encode_states picks this)."""
        pairs = np.array(states, dtype=np.uint64)  # (B, 2): mover, mask
        ours = (pairs[:, 0, None, None] >> SHIFTS) & np.uint64(1)
        theirs = ((pairs[:, 0] ^ pairs[:, 1])[:, None, None] >> SHIFTS) & np.uint64(1)
        return np.stack([ours, theirs], axis=1).astype(np.float32)

    def symmetries(self, planes: np.ndarray, policy: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The identity and the left-right mirror."""
        return [(planes, policy), (np.ascontiguousarray(np.flip(planes, -1)), np.ascontiguousarray(np.flip(policy, -1)))]

    def random_playout(self, state: tuple[int, int], rng: np.random.Generator) -> float:
        """A uniformly random game from `state` on plain ints (a rollout of plain MCTS, ~10x
        faster than going through `legal`/`play`); the result for the player to move in `state`."""
        mover, mask = state
        sign = 1.0
        randoms = rng.random(CELLS).tolist()
        i = 0
        while True:
            if alignment(mover ^ mask):
                return -sign
            if mask == BOARD:
                return 0.0
            columns = [c for c in range(WIDTH) if not mask & TOP[c]]
            col = columns[int(randoms[i] * len(columns))]
            i += 1
            mover, mask = mover ^ mask, mask | (mask + BOTTOM[col])
            sign = -sign

    def moves_played(self, state: tuple[int, int]) -> int:
        return bin(state[1]).count("1")

    def from_moves(self, moves: str) -> tuple[int, int]:
        """The position after a sequence of columns written 1-based as in Pons' test sets ("4453")."""
        state = self.initial()
        for ch in moves:
            state = self.play(state, int(ch) - 1)
        return state

    def render(self, state: tuple[int, int]) -> str:
        mover, mask = state
        symbols = ("X", "O") if self.moves_played(state) % 2 == 0 else ("O", "X")  # X moved first
        rows = []
        for r in range(HEIGHT - 1, -1, -1):
            row = ""
            for c in range(WIDTH):
                bit = 1 << (c * H1 + r)
                row += "." if not mask & bit else symbols[0] if mover & bit else symbols[1]
            rows.append(row)
        return "\n".join(rows) + f"\n({symbols[0]} to move)"


GAME = ConnectFour()
