"""The Trainer in one process: schedule, gradient accumulation, precision, evaluation."""

import math

import pytest

from shoal import config
from shoal.train import lr_at
from tests.conftest import metric_records, one_process_trainer


def make_trainer(tmp_path, *overrides):
    cfg = config.load(None, ["model.name=mlp", "data.source=synthetic", "data.num_samples=512",
                             "train.batch_size=16", "train.warmup_steps=2", "train.eval_every=0", *overrides])
    return one_process_trainer(cfg, tmp_path)


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = config.load(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1", "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    whole = make_trainer(tmp_path / "a", "train.steps=5").fit()
    accumulated = make_trainer(tmp_path / "b", "train.steps=5", "train.grad_accum=4").fit()
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_training_learns_and_bf16_autocast_runs(tmp_path):
    losses = make_trainer(tmp_path / "a", "train.steps=60", "train.lr=0.01").fit()
    assert losses[-1] < 0.6 * losses[0]
    bf16 = make_trainer(tmp_path / "b", "train.steps=10", "train.precision=bf16").fit()
    assert all(math.isfinite(x) for x in bf16) and bf16[-1] < bf16[0]


def test_evaluation_does_not_disturb_training(tmp_path):
    plain = make_trainer(tmp_path / "a", "train.steps=6").fit()
    with_eval = make_trainer(tmp_path / "b", "train.steps=6", "train.eval_every=2").fit()
    assert with_eval == plain
    assert len(metric_records(tmp_path / "b", "eval")) == 3
