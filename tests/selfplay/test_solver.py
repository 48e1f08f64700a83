"""The Connect Four solver against exhaustive search and known positions; the position set is
fixed and cached; matches count both colours; minimax plays tic-tac-toe perfectly."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from shoal.selfplay.evaluate import (Minimax, agreement, match, mcts_player, perfect_player, play_game,
                                     reference_positions)
from shoal.selfplay.games import get_game
from shoal.selfplay.solver import Solver, random_position, solved_positions

C4 = get_game("connect4")
TTT = get_game("tictactoe")


@lru_cache(maxsize=None)
def exhaustive(state) -> int:
    """Pons' score by plain negamax over every move: (43 - stones before the winning move) // 2
    for the player who wins, 0 for a draw."""
    stones = bin(state[1]).count("1")
    best = -99
    for col in np.flatnonzero(C4.legal(state)):
        child = C4.play(state, int(col))
        result = C4.outcome(child)
        best = max(best, (43 - stones) // 2 if result == -1 else 0 if result == 0 else -exhaustive(child))
    return best


def test_the_solver_agrees_with_exhaustive_search_on_late_positions():
    rng = np.random.default_rng(0)
    checked = 0
    signs = set()
    while checked < 40:
        state = random_position(rng, int(rng.integers(30, 34)))
        if state is None:
            continue
        exact = exhaustive(state)
        assert Solver().solve(state) == exact, C4.render(state)
        assert Solver().solve(state, weak=True) == np.sign(exact)
        signs.add(int(np.sign(exact)))
        checked += 1
    assert signs == {-1, 0, 1}  # wins, draws and losses were all among them


def test_the_solver_on_known_positions():
    solver = Solver()
    # a win in one: (43 - 6 stones) // 2
    assert solver.solve(C4.from_moves("414141")) == 18
    # from Pons' end-game test set; the scores agree with exhaustive search
    for moves, score in (("2252576253462244111563365343671351441", -1),
                         ("7422341735647741166133573473242566", 1),
                         ("65214673556155731566316327373221417", -1)):
        state = C4.from_moves(moves)
        assert solver.solve(state) == score == exhaustive(state)
        assert solver.solve(state, weak=True) == score
        # the optimal moves: those whose exhaustive value has the best sign
        signs = {int(c): int(np.sign(-exhaustive(C4.play(state, int(c)))))
                 if C4.outcome(C4.play(state, int(c))) is None else -int(C4.outcome(C4.play(state, int(c))))
                 for c in np.flatnonzero(C4.legal(state))}
        assert solver.optimal_moves(state) == sorted(c for c, v in signs.items() if v == max(signs.values()))


def test_the_position_set_is_fixed_cached_and_discriminating(tmp_path):
    cache = tmp_path / "positions.json"
    made = solved_positions(count=6, min_stones=22, max_stones=26, seed=3, cache=cache)
    assert json.loads(cache.read_text())["positions"] == made
    again = solved_positions(count=6, min_stones=22, max_stones=26, seed=3, cache=cache)
    assert again == made
    for entry in made:
        state = C4.from_moves(entry["moves"])
        assert 22 <= len(entry["moves"]) <= 26 and C4.outcome(state) is None
        values = {int(k): v for k, v in entry["values"].items()}
        assert entry["optimal"] == sorted(m for m, v in values.items() if v == max(values.values()))
        assert len(entry["optimal"]) < len(values)  # some move throws the result away
    cache.write_text(json.dumps({"header": {"seed": 99}, "positions": []}))  # made with other settings
    assert solved_positions(count=6, min_stones=22, max_stones=26, seed=3, cache=cache) == made


def test_minimax_plays_tictactoe_perfectly_and_mcts_never_beats_it():
    minimax = Minimax(TTT)
    assert minimax.value(TTT.initial()) == 0.0
    rng = np.random.default_rng(0)
    perfect = perfect_player(TTT, rng, minimax)
    assert play_game(TTT, perfect, perfect_player(TTT, rng, minimax)) == 0.0
    result = match(TTT, mcts_player(TTT, 50, rng), perfect, 20, rng)
    assert result.wins == 0 and result.games == 20 and sum(result.first) == sum(result.second) == 10


def test_match_counts_both_colours_and_a_stronger_search_wins():
    rng = np.random.default_rng(1)
    strong, weak = mcts_player(C4, 300, rng), mcts_player(C4, 5, rng)
    result = match(C4, strong, weak, 8, rng)
    assert result.first[0] + result.second[0] == result.wins and result.wins >= 6, result


def test_agreement_counts_optimal_moves():
    positions = reference_positions(TTT, count=50)
    assert len(positions) == 50
    minimax = Minimax(TTT)
    assert agreement(perfect_player(TTT, np.random.default_rng(0), minimax), positions) == 1.0
    first_legal = lambda state: int(np.flatnonzero(TTT.legal(state))[0])  # noqa: E731
    assert agreement(first_legal, positions) < 0.8


def test_solver_player_moves_are_optimal():
    from shoal.selfplay.evaluate import solver_player
    rng = np.random.default_rng(4)
    player = solver_player(np.random.default_rng(0))
    for _ in range(5):
        state = None
        while state is None:
            state = random_position(rng, 24)
        assert player(state) in Solver().optimal_moves(state)
