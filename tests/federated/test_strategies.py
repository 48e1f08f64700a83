"""Each strategy's aggregate against its formula, on vectors small enough to check by hand."""

import math
import random

import pytest
import torch

from shoal.config import ConfigError, FederatedConfig
from shoal.federated.strategies import ClientUpdate, build_strategy


def updates(*rows, samples=None, versions=None):
    samples = samples or [1] * len(rows)
    versions = versions or [0] * len(rows)
    return [ClientUpdate(f"c{i}", torch.tensor(r, dtype=torch.float64), n, {}, v)
            for i, (r, n, v) in enumerate(zip(rows, samples, versions))]


def strategy(name, **fields):
    return build_strategy(FederatedConfig(strategy=name, **fields))


GLOBAL = torch.tensor([10.0, 20.0], dtype=torch.float64)


def test_fedavg_is_the_sample_weighted_mean():
    out = strategy("fedavg").aggregate_train(1, GLOBAL, updates([1.0, 2.0], [3.0, 4.0], samples=[1, 3]))
    assert torch.allclose(out, GLOBAL + torch.tensor([2.5, 3.5], dtype=torch.float64))


def test_fedprox_sends_mu_and_averages_like_fedavg():
    s = strategy("fedprox", proximal_mu=0.3, min_clients=1)
    chosen, config = s.configure_train(1, ["a", "b", "c"], random.Random(0))
    assert config["proximal_mu"] == 0.3 and chosen == ["a", "b", "c"]
    out = s.aggregate_train(1, GLOBAL, updates([1.0, 2.0], [3.0, 4.0], samples=[1, 3]))
    assert torch.allclose(out, GLOBAL + torch.tensor([2.5, 3.5], dtype=torch.float64))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_follows_reddi_et_al(name):
    b1, b2, tau, eta = 0.9, 0.99, 1e-3, 0.5
    s = strategy(name, beta1=b1, beta2=b2, tau=tau, server_lr=eta)
    delta = torch.tensor([0.2, -0.4], dtype=torch.float64)
    x, m, v = GLOBAL.clone(), torch.zeros(2, dtype=torch.float64), torch.full((2,), tau ** 2, dtype=torch.float64)
    for rnd in (1, 2):
        x_got = s.aggregate_train(rnd, x, updates(delta.tolist(), (delta * 3).tolist(), samples=[2, 0]))
        m = b1 * m + (1 - b1) * delta
        if name == "fedadam":
            v = b2 * v + (1 - b2) * delta ** 2
        elif name == "fedyogi":
            v = v - (1 - b2) * delta ** 2 * torch.sign(v - delta ** 2)
        else:
            v = v + delta ** 2
        x = x + eta * m / (v.sqrt() + tau)
        assert torch.allclose(x_got, x), rnd
        x = x_got


def test_fedmedian_takes_the_coordinate_median():
    s = strategy("fedmedian")
    assert torch.allclose(s.aggregate_train(1, GLOBAL, updates([1.0, 0.0], [5.0, 9.0], [3.0, -1.0])),
                          GLOBAL + torch.tensor([3.0, 0.0], dtype=torch.float64))
    # an even count averages the two middle values
    g = torch.zeros(1, dtype=torch.float64)
    assert s.aggregate_train(1, g, updates([1.0], [2.0], [3.0], [10.0])).item() == 2.5


def test_fedtrimmedavg_cuts_each_end():
    s = strategy("fedtrimmedavg", trim_fraction=0.2)
    out = s.aggregate_train(1, GLOBAL, updates([1.0, 7.0], [2.0, 6.0], [3.0, 5.0], [4.0, 4.0], [100.0, -50.0]))
    # per coordinate: drop min and max of 5 values, average the middle 3
    assert torch.allclose(out, GLOBAL + torch.tensor([3.0, 5.0], dtype=torch.float64))


def test_krum_and_multikrum_ignore_the_outlier():
    rows = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    # f = 1: each score sums the squared distances to the n - f - 2 = 2 nearest others:
    # 0 -> 1+4=5, 1 -> 1+1=2, 2 -> 1+1=2, 3 -> 1+4=5, 100 -> 97^2+98^2
    g = torch.zeros(1, dtype=torch.float64)
    assert strategy("krum", byzantine=1).aggregate_train(1, g, updates(*rows)).item() == 1.0
    # MultiKrum keeps the n - f = 4 best (1, 2, 0, 3) and averages them
    assert strategy("multikrum", byzantine=1).aggregate_train(1, g, updates(*rows)).item() == pytest.approx(1.5)
    assert strategy("multikrum", byzantine=1, krum_keep=2).aggregate_train(1, g, updates(*rows)).item() == 1.5
    with pytest.raises(ValueError, match="needs more than 4"):
        strategy("krum", byzantine=1).aggregate_train(1, g, updates(*rows[:4]))


def test_fedbuff_discounts_stale_updates():
    s = strategy("fedbuff", server_lr=2.0)
    assert s.asynchronous
    # applied as version 4 -> current version 3; staleness 0 and 3
    out = s.aggregate_train(4, GLOBAL, updates([1.0, 1.0], [4.0, -2.0], versions=[3, 0]))
    expected = GLOBAL + 2.0 * (torch.tensor([1.0, 1.0]) * 1.0 + torch.tensor([4.0, -2.0]) / math.sqrt(4)) / 2
    assert torch.allclose(out, expected.double())


def test_sampling_respects_fraction_and_min_clients():
    s = strategy("fedavg", fraction=0.1, min_clients=3)
    chosen, _ = s.configure_train(1, [f"c{i}" for i in range(100)], random.Random(1))
    assert len(chosen) == 10 and len(set(chosen)) == 10
    chosen, _ = s.configure_train(1, [f"c{i}" for i in range(10)], random.Random(1))
    assert len(chosen) == 3


def test_evaluate_metrics_are_sample_weighted():
    s = strategy("fedavg")
    assert s.aggregate_evaluate(1, [(1, {"accuracy": 1.0}), (3, {"accuracy": 0.0})]) == {"accuracy": 0.25}


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match="unknown"):
        build_strategy(FederatedConfig(strategy="fedfoo"))
