"""THE goal of self-play on a small game: tic-tac-toe trained from scratch, in one process
(shoal/selfplay/local.py), never loses to perfect minimax in 200 games as the first player and
200 as the second; the same search with the untrained network does lose, so the games test
what training learned. About a minute on one core."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.selfplay.evaluate import Minimax, match, network_player, perfect_player
from shoal.selfplay.games import get_game
from shoal.selfplay.local import LocalSettings, train_locally
from shoal.selfplay.network import PolicyValueNet, evaluator
from shoal.selfplay.play import SelfPlaySettings

pytestmark = pytest.mark.slow

TTT = get_game("tictactoe")
EVAL_SIMULATIONS = 16  # the network player's noiseless search per move
# temperature on every move (tic-tac-toe has at most 9): the games visit the positions a
# perfect opponent leads into, which the most-visited move alone would never play
SETTINGS = LocalSettings(play=SelfPlaySettings(simulations=32, c_puct=1.5, dirichlet_alpha=1.0, dirichlet_fraction=0.25,
                                               temperature_moves=9),
                         versions=40, games_per_version=32, train_steps_per_version=40, batch_size=64,
                         replay_size=10_000, lr=2e-3, channels=64, blocks=2)


def test_tictactoe_from_scratch_never_loses_to_perfect_play():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on every run of this test
    try:
        minimax = Minimax(TTT)
        untrained = network_player(TTT, evaluator(PolicyValueNet(TTT, channels=64, blocks=2).eval()), EVAL_SIMULATIONS)
        before = match(TTT, untrained, perfect_player(TTT, np.random.default_rng(1), minimax), 40,
                       np.random.default_rng(2))
        assert before.losses > 0, f"the untrained player never lost ({before}): the match cannot tell"

        net, history = train_locally(TTT, SETTINGS, seed=0)
        assert history[-1].losses["loss"] < history[0].losses["loss"]
        player = network_player(TTT, evaluator(net), EVAL_SIMULATIONS)
        result = match(TTT, player, perfect_player(TTT, np.random.default_rng(1), minimax), 400, np.random.default_rng(2))
        assert sum(result.first) == 200 and sum(result.second) == 200
        assert result.losses == 0, f"lost to minimax: first {result.first}, second {result.second} (wins, draws, losses)"
    finally:
        torch.set_num_threads(threads)
