"""The search: it takes a win in one and blocks a loss in one, with an uninformed evaluator; a
batch of games searched together gives each game exactly what it gets searched alone; virtual
loss spreads a game's leaves; the root noise and the visit counts add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.selfplay.games import get_game
from shoal.selfplay.mcts import rollout_leaves, search, search_trees
from shoal.selfplay.network import PolicyValueNet, evaluator

TTT = get_game("tictactoe")
C4 = get_game("connect4")


def uniform(game):
    """No knowledge at all: uniform priors and value 0, so only the search finds the move."""
    def evaluate(planes):
        return np.full((len(planes), game.action_size), 1.0 / game.action_size), np.zeros(len(planes))
    return evaluate


def hashed(game):
    """A deterministic evaluator that differs per position (from the planes' bytes), to compare
    batched and unbatched searches exactly."""
    def evaluate(planes):
        priors, values = [], []
        for p in planes:
            rng = np.random.default_rng(abs(hash(p.tobytes())) % (2 ** 32))
            priors.append(rng.dirichlet(np.ones(game.action_size)))
            values.append(rng.uniform(-0.9, 0.9))
        return np.array(priors), np.array(values)
    return evaluate


def best(game, state, simulations=200, evaluate=None, seed=0):
    visits = search(game, [state], evaluate or uniform(game), simulations, 1.5, 0.3, 0.0, np.random.default_rng(seed))
    return int(np.argmax(visits[0]))


def test_takes_a_win_in_one():
    # X: 0 4, O: 1 3; X to move wins with 8 (diagonal)
    assert best(TTT, TTT.play(TTT.play(TTT.play(TTT.play(TTT.initial(), 0), 1), 4), 3)) == 8
    # Connect Four: the first player has three in column 4 (index 3); dropping a fourth wins
    assert best(C4, C4.from_moves("414141")) == 3
    assert best(C4, C4.from_moves("112233")) == 3  # horizontal 1-2-3, win at 4


def test_blocks_a_loss_in_one():
    # O threatens the top row (0 1); X must take 2
    state = TTT.initial()
    for move in (4, 0, 8, 1):
        state = TTT.play(state, move)
    assert best(TTT, state, 400) == 2
    # Connect Four: the opponent has three in a row at the bottom (columns 2-4); the mover must block
    assert best(C4, C4.from_moves("2737477"), 800) in (0, 4)  # either open end, 1 or 5 (0-based 0, 4)


def test_batched_search_equals_each_game_searched_alone():
    rng = np.random.default_rng(3)
    states = []
    for _ in range(6):
        state = C4.initial()
        for _ in range(int(rng.integers(0, 10))):
            legal = np.flatnonzero(C4.legal(state))
            nxt = C4.play(state, int(rng.choice(legal)))
            if C4.outcome(nxt) is not None:
                break
            state = nxt
        states.append(state)
    evaluate = hashed(C4)
    together = search(C4, states, evaluate, 48, 1.5, 0.5, 0.0, np.random.default_rng(11))
    alone = [search(C4, [s], evaluate, 48, 1.5, 0.5, 0.0, np.random.default_rng(11))[0] for s in states]
    for t, a in zip(together, alone):
        assert np.array_equal(t, a)
        assert t.sum() == 48


def test_batched_search_with_noise_draws_it_per_root_in_order():
    states = [C4.initial(), C4.from_moves("4"), C4.from_moves("44")]
    evaluate = hashed(C4)
    rng = np.random.default_rng(5)
    together = search(C4, states, evaluate, 32, 1.5, 0.5, 0.25, rng)
    # the same roots searched alone but with the noise each one drew in the batch
    rng_replay = np.random.default_rng(5)
    noises = [rng_replay.dirichlet(np.full(7, 0.5)) for _ in states]
    for state, noise, visits in zip(states, noises, together):
        class Fixed:  # replays one recorded draw
            def dirichlet(self, alpha):
                return noise
        alone = search(C4, [state], evaluate, 32, 1.5, 0.5, 0.25, Fixed())
        assert np.array_equal(alone[0], visits)


def test_a_network_evaluates_the_same_in_a_batch_and_alone():
    torch.manual_seed(0)
    net = PolicyValueNet(C4, channels=16, blocks=1).eval()
    evaluate = evaluator(net)
    states = [C4.initial(), C4.from_moves("44"), C4.from_moves("4455")]
    together = search(C4, states, evaluate, 32, 1.5, 0.3, 0.0, np.random.default_rng(0))
    alone = [search(C4, [s], evaluate, 32, 1.5, 0.3, 0.0, np.random.default_rng(0))[0] for s in states]
    # a batched convolution may round differently in the last bit; a visit or two may move
    for t, a in zip(together, alone):
        assert np.abs(t - a).sum() <= 4, (t, a)


def test_virtual_loss_spreads_a_games_leaves():
    evaluate = uniform(C4)
    roots = search_trees(C4, [C4.initial()], lambda states: evaluate(np.zeros((len(states), 1))), 64, 1.5, 0.3, 0.0,
                         np.random.default_rng(0), leaves_per_game=8)
    visits = roots[0].visits
    # 8 descents per step into a fresh tree: virtual loss sends them to 7 different columns first
    assert (visits > 0).all() and 56 <= visits.sum() <= 64


def test_rollout_search_plays_a_forced_win():
    state = C4.from_moves("414141")
    roots = search_trees(C4, [state], rollout_leaves(C4, np.random.default_rng(0)), 100, 2.0, 0.3, 0.0,
                         np.random.default_rng(0))
    assert int(np.argmax(roots[0].visits)) == 3


def test_a_finished_game_is_not_searched():
    with pytest.raises(ValueError, match="finished game"):
        search(C4, [C4.from_moves("1212121")], uniform(C4), 8, 1.5, 0.3, 0.0, np.random.default_rng(0))
