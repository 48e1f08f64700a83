"""The self-play learner as a run's config builds it (shoal/selfplay/learner.py), in one process:
it trains on the game's symmetric copies of its positions when `selfplay.augment` is on, and on the
positions as played when it is off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal import config as config_module
from shoal.selfplay.learn import decayed_lr
from shoal.selfplay.learner import Learner
from shoal.selfplay.network import evaluator
from shoal.selfplay.play import GameRecord
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "selfplay" / "tictactoe.toml"
CORNERS = [0, 2, 6, 8]


def opening_policy_after_training(augment: bool) -> np.ndarray:
    """The learner's policy on the empty board after one version trained on a buffer that holds the
    empty board with the whole visit mass on the top-left corner (square 0)."""
    cfg = config_module.load(EXAMPLE, ["selfplay.train_steps_per_version=80", "selfplay.batch_size=16",
                                       "train.lr=0.03", f"selfplay.augment={str(augment).lower()}"])
    torch.manual_seed(0)
    learner = Learner(cfg)
    game = learner.game
    policy = torch.zeros(1, game.action_size)
    policy[0, 0] = 1.0
    learner.buffer.add([GameRecord(planes=torch.from_numpy(game.encode(game.initial()))[None], policy_targets=policy,
                                   value_targets=torch.zeros(1), weight_version=0, moves=1, result=0.0)])
    learner.train_version(cfg.train.lr)
    priors, _ = evaluator(learner.net.eval())(game.encode(game.initial())[None])
    return priors[0]


def test_learner_trains_on_the_games_symmetric_copies():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second: a tiny net's steps only wait on each other's threads
    try:
        augmented, plain = opening_policy_after_training(True), opening_policy_after_training(False)
    finally:
        torch.set_num_threads(threads)
    # The empty board is its own image under the square's 8 symmetries, and they carry square 0 to
    # each corner: trained on symmetric copies the net spreads its prior over the 4 corners alike.
    others = [square for square in range(9) if square not in CORNERS]
    assert all(0.15 < augmented[c] < 0.35 for c in CORNERS), augmented.round(3)
    assert all(augmented[square] < 0.06 for square in others), augmented.round(3)
    # Trained on the position as played, it learns square 0 alone: the test tells the two apart.
    assert plain[0] > 0.5 and all(plain[square] < 0.1 for square in range(1, 9)), plain.round(3)


def test_learning_rate_decays_over_the_runs_last_part():
    assert decayed_lr(1e-3, 0.3, final=0.1, start=0.5) == 1e-3
    assert decayed_lr(1e-3, 0.75, final=0.1, start=0.5) == pytest.approx(0.55e-3)
    assert decayed_lr(1e-3, 1.0, final=0.1, start=0.5) == pytest.approx(1e-4)
    assert decayed_lr(1e-3, 2.0, final=0.1, start=0.5) == pytest.approx(1e-4)  # past the end: the final rate
    assert decayed_lr(1e-3, 0.9, final=1.0, start=0.5) == 1e-3  # lr_final = 1: constant


def test_learner_decays_by_versions_or_minutes_whichever_is_further():
    cfg = config_module.load(EXAMPLE, ["selfplay.versions=10", "selfplay.minutes=0", "selfplay.lr_final=0.1",
                                       "selfplay.lr_decay_from=0.5", "train.lr=0.01"])
    learner = Learner(cfg)
    assert learner.next_lr() == 0.01
    learner.state.version = 9  # the next is the last
    assert learner.next_lr() == pytest.approx(0.001)
    learner.state.version = 0
    learner.cfg = config_module.load(EXAMPLE, ["selfplay.versions=10", "selfplay.minutes=1", "selfplay.lr_final=0.1",
                                               "selfplay.lr_decay_from=0.5", "train.lr=0.01"])
    learner.state.seconds = 45.0  # three quarters of the minute: the cosine's midpoint
    assert learner.next_lr() == pytest.approx(0.0055, rel=1e-2)
