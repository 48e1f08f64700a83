"""Central DP: clipping, the noise scale, adaptive clipping's direction, epsilon from opacus; local DP-SGD."""

import math

import pytest
import torch

from shoal.config import ConfigError, FederatedConfig, load
from shoal.federated.local import train_local
from shoal.federated.privacy import CentralDP, clip_update
from shoal.federated.rounds import check_federated


def test_clip_scales_long_updates_only():
    long, ok = clip_update(torch.tensor([3.0, 4.0], dtype=torch.float64), 1.0)
    assert not ok and torch.allclose(long, torch.tensor([0.6, 0.8], dtype=torch.float64))
    short, ok = clip_update(torch.tensor([0.3, 0.4], dtype=torch.float64), 1.0)
    assert ok and torch.equal(short, torch.tensor([0.3, 0.4], dtype=torch.float64))


def test_noise_has_the_gaussian_mechanism_scale_and_epsilon_grows():
    dp = CentralDP(FederatedConfig(dp="fixed", dp_noise=1.5, dp_clip=2.0), seed=0)
    total = torch.zeros(200_000, dtype=torch.float64)
    mean = dp.noisy_mean(total, sampled=10, unclipped=10, sample_rate=0.1)
    assert mean.mean().abs() < 0.01
    assert mean.std().item() == pytest.approx(1.5 * 2.0 / 10, rel=0.02)  # z * C / m
    eps = [dp.epsilon()]
    for _ in range(3):
        dp.noisy_mean(torch.zeros(4, dtype=torch.float64), 10, 10, 0.1)
        eps.append(dp.epsilon())
    assert 0 < eps[0] < eps[1] < eps[2] < eps[3] < math.inf
    quieter = CentralDP(FederatedConfig(dp="fixed", dp_noise=3.0, dp_clip=2.0))
    for _ in range(4):
        quieter.noisy_mean(torch.zeros(4, dtype=torch.float64), 10, 10, 0.1)
    assert quieter.epsilon() < eps[3]


def test_adaptive_clip_moves_toward_the_target_quantile():
    cfg = FederatedConfig(dp="adaptive", dp_noise=2.0, dp_clip=1.0, dp_quantile=0.5, dp_clip_lr=0.2)
    dp = CentralDP(cfg, seed=1)
    dp.noisy_mean(torch.zeros(4, dtype=torch.float64), sampled=100, unclipped=100, sample_rate=1.0)
    assert dp.clip < 0.95  # every update fit under the norm: shrink it (about exp(-0.2 * 0.5))
    grown = CentralDP(cfg, seed=1)
    grown.noisy_mean(torch.zeros(4, dtype=torch.float64), sampled=100, unclipped=0, sample_rate=1.0)
    assert grown.clip > 1.05


def test_config_rules_for_dp_and_secagg():
    with pytest.raises(ConfigError, match="mean-based"):
        check_federated(load(None, ["federated.dp=fixed", "federated.strategy=krum", "federated.min_clients=5"]))
    with pytest.raises(ConfigError, match="too small for adaptive"):
        check_federated(load(None, ["federated.dp=adaptive", "federated.dp_noise=0.5", "federated.min_clients=3"]))
    with pytest.raises(ConfigError, match="min_clients >= 4"):
        check_federated(load(None, ["federated.secagg=true", "federated.min_clients=3",
                                    "federated.secagg_threshold=4"]))
    with pytest.raises(ConfigError, match="only the mean"):
        check_federated(load(None, ["federated.secagg=true", "federated.strategy=fedmedian",
                                    "federated.min_clients=3"]))


def test_local_dp_sgd_through_opacus_reports_epsilon():
    from opacus import PrivacyEngine

    cfg = load(None, ["train.optimizer=sgd", "train.lr=0.1", "train.batch_size=16", "federated.local_dp=true",
                      "federated.local_dp_noise=1.0", "federated.local_dp_clip=1.0"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    engine = PrivacyEngine(accountant="rdp")
    first = train_local(model, x, y, cfg, {"local_epochs": 1.0}, g, engine)
    second = train_local(model, x, y, cfg, {"local_epochs": 1.0}, g, engine)
    assert not torch.equal(before, model.weight)  # the weights came back from opacus' wrapped copy
    assert 0 < first["local_epsilon"] < second["local_epsilon"] < math.inf
