"""A Connect Four solver (negamax with alpha-beta pruning, a transposition table, threat-based
move ordering and a null-window search for the score) and the fixed position set that measures
how often a player's move is one the solver calls optimal.

After Pascal Pons, "Solving Connect 4: how to build a perfect AI" (2019,
http://blog.gamesolver.org), itself after Allis (1988) and Tromp (1995), rewritten here on the
bitboards of shoal/selfplay/games/connect4.py. A score is from the perspective of the player to
move: positive when they win, (22 - their stones at the win) for a win, 0 a draw, negative a
loss (so a quicker win scores more). `weak=True` only asks the sign (win, draw or loss): a
window of (-1, 1), far faster.

Pure Python: a position with ~20 or more stones solves in well under a second (weakly); an early
position can take minutes, so the position set holds positions of `min_stones` stones or more,
and nothing earlier is solved (the set says so in its header).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shoal.selfplay.games.connect4 import BOARD, BOTTOM_ROW, CELLS, GAME, HEIGHT, TOP, WIDTH, column_mask

H1 = HEIGHT + 1
MIN_SCORE = -CELLS // 2 + 3  # the lowest score a search can return; table entries are stored above it
COLUMN_ORDER = (3, 2, 4, 1, 5, 0, 6)  # centre first: centre moves are more often the best
COLUMNS = tuple(column_mask(c) for c in range(WIDTH))
TABLE_LIMIT = 2_000_000  # entries before the transposition table is cleared (~300 MB of Python dict)


def winning_cells(position: int, mask: int) -> int:
    """Empty cells where `position`'s player would complete four (Pons' compute_winning_position)."""
    r = (position << 1) & (position << 2) & (position << 3)  # vertical
    for shift in (H1, HEIGHT, H1 + 1):  # horizontal and both diagonals
        p = (position << shift) & (position << 2 * shift)
        r |= p & (position << 3 * shift)
        r |= p & (position >> shift)
        p = (position >> shift) & (position >> 2 * shift)
        r |= p & (position << shift)
        r |= p & (position >> 3 * shift)
    return r & (BOARD ^ mask)


def popcount(x: int) -> int:
    return bin(x).count("1")


class Solver:
    """Scores of Connect Four positions; the transposition table lives as long as the object, so
    solving many related positions (a position's children) with one Solver is much faster."""

    def __init__(self):
        self.table: dict[int, int] = {}  # key -> upper bound of the score (Pons' table)
        self.nodes = 0

    def _negamax(self, current: int, mask: int, moves: int, alpha: int, beta: int) -> int:
        self.nodes += 1
        possible = (mask + BOTTOM_ROW) & BOARD
        opponent_wins = winning_cells(current ^ mask, mask)
        forced = possible & opponent_wins
        if forced:
            if forced & (forced - 1):  # two threats to block at once: lost
                return -((CELLS - moves) // 2)
            possible = forced
        non_losing = possible & ~(opponent_wins >> 1)  # never play just below an opponent's winning cell
        if not non_losing:
            return -((CELLS - moves) // 2)
        if moves >= CELLS - 2:
            return 0
        low = -((CELLS - 2 - moves) // 2)
        if alpha < low:
            alpha = low
            if alpha >= beta:
                return alpha
        high = (CELLS - 1 - moves) // 2
        key = current + mask
        bound = self.table.get(key)
        if bound is not None:
            high = bound + MIN_SCORE - 1
        if beta > high:
            beta = high
            if alpha >= beta:
                return beta
        # order the moves by the threats they create (most first), centre first among equals
        ordered = []
        for col in COLUMN_ORDER:
            move = non_losing & COLUMNS[col]
            if move:
                ordered.append((-popcount(winning_cells(current | move, mask)), len(ordered), move))
        ordered.sort()
        opponent = current ^ mask
        for _, _, move in ordered:
            score = -self._negamax(opponent, mask | move, moves + 1, -beta, -alpha)
            if score >= beta:
                return score
            if score > alpha:
                alpha = score
        if len(self.table) >= TABLE_LIMIT:
            self.table.clear()
        self.table[key] = alpha - MIN_SCORE + 1
        return alpha

    def solve(self, state: tuple[int, int], weak: bool = False) -> int:
        """The score of `state` (a position where the game goes on) for the player to move; with
        `weak` only its sign is exact (+1 win, 0 draw, -1 loss)."""
        current, mask = state
        moves = popcount(mask)
        if winning_cells(current, mask) & ((mask + BOTTOM_ROW) & BOARD):  # a win at once
            score = (CELLS + 1 - moves) // 2
            return 1 if weak else score
        low, high = -((CELLS - moves) // 2), (CELLS + 1 - moves) // 2
        if weak:
            low, high = -1, 1
        while low < high:  # null-window searches narrowing [low, high] onto the score
            mid = low + (high - low) // 2
            # C's integer division truncates toward zero (Pons' code relies on it): int(x / 2)
            if mid <= 0 and int(low / 2) < mid:
                mid = int(low / 2)
            elif mid >= 0 and high // 2 > mid:
                mid = high // 2
            result = self._negamax(current, mask, moves, mid, mid + 1)
            if result <= mid:
                high = result
            else:
                low = result
        # a weak search may end outside (-1, 1) (fail-soft bounds), its sign exact
        return max(-1, min(1, low)) if weak else low

    def move_values(self, state: tuple[int, int], weak: bool = True) -> dict[int, int]:
        """Each legal move's score for the player to move (its sign only, +1/0/-1, when `weak`)."""
        values = {}
        for col in range(WIDTH):
            if state[1] & TOP[col]:
                continue
            child = GAME.play(state, col)
            result = GAME.outcome(child)
            if result is not None:  # the move ends the game: won, or the board's last cell drawn
                values[col] = (1 if weak else (CELLS + 1 - popcount(state[1])) // 2) if result < 0 else 0
            else:
                score = -self.solve(child, weak)
                values[col] = int(np.sign(score)) if weak else score
        return values

    def optimal_moves(self, state: tuple[int, int]) -> list[int]:
        """The moves that keep the position's game-theoretic value (win, draw or loss)."""
        values = self.move_values(state, weak=True)
        best = max(values.values())
        return sorted(m for m, v in values.items() if v == best)


def random_position(rng: np.random.Generator, stones: int) -> tuple[int, int] | None:
    """A position after `stones` uniformly random moves, or None when the game ended before."""
    state = GAME.initial()
    for _ in range(stones):
        legal = np.flatnonzero(GAME.legal(state))
        state = GAME.play(state, int(legal[rng.integers(len(legal))]))
        if GAME.outcome(state) is not None:
            return None
    return state


def solved_positions(count: int = 100, min_stones: int = 20, max_stones: int = 28, seed: int = 0,
                     cache: Path | None = None) -> list[dict]:
    """A fixed set of `count` Connect Four positions with their optimal moves: each reached by
    random moves (`min_stones`..`max_stones` stones, drawn by `seed`), still open, with no win in
    one for the mover (too easy) and at least one move that throws the result away (so that
    agreeing means something). Each entry: {"moves": played columns, "optimal": [columns],
    "values": {column: +1/0/-1}}. With `cache` (a JSON file, e.g. under the run directory) the set
    is read from it when it was made with the same arguments, else made and written there."""
    header = {"count": count, "min_stones": min_stones, "max_stones": max_stones, "seed": seed,
              "optimal": "moves keeping the game-theoretic value (win/draw/loss) by a weak solve"}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("header") == header:
            return saved["positions"]
    rng = np.random.default_rng(seed)
    solver = Solver()
    positions: list[dict] = []
    seen: set[tuple[int, int]] = set()
    while len(positions) < count:
        stones = int(rng.integers(min_stones, max_stones + 1))
        state, moves = GAME.initial(), []
        for _ in range(stones):
            legal = np.flatnonzero(GAME.legal(state))
            moves.append(int(legal[rng.integers(len(legal))]))
            state = GAME.play(state, moves[-1])
            if GAME.outcome(state) is not None:
                break
        if GAME.outcome(state) is not None or state in seen:
            continue
        if winning_cells(state[0], state[1]) & ((state[1] + BOTTOM_ROW) & BOARD):
            continue
        values = solver.move_values(state, weak=True)
        best = max(values.values())
        if all(v == best for v in values.values()):
            continue
        seen.add(state)
        positions.append({"moves": "".join(str(m + 1) for m in moves),
                          "optimal": sorted(m for m, v in values.items() if v == best),
                          "values": {str(m): v for m, v in values.items()}})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps({"header": header, "positions": positions}))
        tmp.replace(cache)
    return positions
