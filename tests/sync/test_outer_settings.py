"""The outer step tuned per replica count and H: what `sync.method = "diloco"` alone resolves to."""

from __future__ import annotations

import logging

import pytest

from shoal.config import load
from shoal.sync.outer_settings import TUNED, outer_options, tuned_outer_settings


def test_the_nearest_swept_setting_is_taken():
    assert tuned_outer_settings(2, 30) == TUNED[(2, 30)]
    assert tuned_outer_settings(2, 25) == TUNED[(2, 30)]  # nearest in log H
    assert tuned_outer_settings(2, 60) == TUNED[(2, 100)]
    assert tuned_outer_settings(3, 10) == TUNED[(4, 10)]  # nearer to 4 than to 2 in log replicas
    assert tuned_outer_settings(16, 30) == TUNED[(4, 30)]
    with pytest.raises(ValueError, match="inner_steps"):
        tuned_outer_settings(2, 0)


def test_diloco_alone_gets_the_tuned_values_and_says_so(caplog):
    cfg = load(None, ["sync.method=diloco", "parallel.dp_replicate=4"]).sync
    with caplog.at_level(logging.INFO, logger="shoal"):
        options = outer_options(cfg, 4)
    tuned = TUNED[(4, 30)]
    assert (options["inner_steps"], options["compression"]) == (30, "int8")
    assert (options["outer_lr"], options["outer_momentum"], options["outer_warmup"]) == \
        (tuned.lr, tuned.momentum, tuned.warmup)
    assert "DiLoCo with 4 replicas, inner_steps 30: outer_lr 1.0" in caplog.text


def test_values_given_win_and_nothing_is_logged(caplog):
    cfg = load(None, ["sync.method=diloco", "parallel.dp_replicate=2", "sync.outer_lr=0.7",
                      "sync.outer_momentum=0.9", "sync.outer_warmup=0", "sync.compression=int8"]).sync
    with caplog.at_level(logging.INFO, logger="shoal"):
        options = outer_options(cfg, 2)
    assert (options["outer_lr"], options["outer_momentum"], options["outer_warmup"], options["compression"]) == \
        (0.7, 0.9, 0, "int8")
    assert "tuned defaults" not in caplog.text
