"""Client-level differential privacy: clip each update, add Gaussian noise to the sum, count epsilon.

DP-FedAvg: McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (arXiv:1710.06963): every sampled client's update is clipped to L2 norm C (weight 1),
the server adds N(0, (z C)^2) to the sum and divides by the number of sampled clients.
Adaptive clipping: Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021 (arXiv:1905.03871): C <- C * exp(-eta (b - gamma)), b the noised share of
unclipped updates; the count noise takes part of the budget, so the update noise multiplier
is z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2.
Epsilon comes from opacus' RDP accountant; nothing here is a hand-written accountant.
Clipping happens on the client when secure aggregation hides single updates from the server.
"""

from __future__ import annotations

import math

import torch

from shoal.config import ConfigError, FederatedConfig


def clip_update(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, bool]:
    """The update scaled to norm at most `clip`, and whether it was already within it."""
    norm = float(delta.norm())
    if norm <= clip:
        return delta, True
    return delta * (clip / norm), False


class CentralDP:
    """Noise and accounting for one federation (one instance lives as long as the server)."""

    def __init__(self, cfg: FederatedConfig, seed: int = 0):
        from opacus.accountants import RDPAccountant  # imported here: opacus is an optional extra

        self.cfg = cfg
        self.clip = cfg.dp_clip
        self.adaptive = cfg.dp == "adaptive"
        self.accountant = RDPAccountant()
        self.generator = torch.Generator().manual_seed(seed)
        if cfg.dp_clip <= 0:
            raise ConfigError("federated.dp_clip must be above 0 when federated.dp is on")

    def noise_multipliers(self, sampled: int) -> tuple[float, float]:
        """(update noise multiplier, count noise std) for `sampled` clients."""
        z = self.cfg.dp_noise
        if not self.adaptive or z == 0:
            return z, 0.0
        count_std = sampled / 20.0  # Andrew et al.'s default: sigma_b = m / 20
        rest = z ** -2 - (2 * count_std) ** -2
        if rest <= 0:
            raise ConfigError(f"federated.dp_noise = {z} is too small for adaptive clipping with {sampled} "
                              f"clients; raise it above {1 / (2 * count_std):.3f}")
        return rest ** -0.5, count_std

    def noisy_mean(self, clipped_sum: torch.Tensor, sampled: int, unclipped: float, sample_rate: float) -> torch.Tensor:
        """Mean update of `sampled` clients from the sum of their clipped updates, with noise added,
        then one accountant step and (adaptive) a new clip norm."""
        z_update, count_std = self.noise_multipliers(sampled)
        noise = torch.randn(clipped_sum.shape, generator=self.generator, dtype=torch.float64) * z_update * self.clip
        mean = (clipped_sum + noise) / sampled
        if self.adaptive:
            noisy_count = unclipped + float(torch.randn((), generator=self.generator)) * count_std
            self.clip *= math.exp(-self.cfg.dp_clip_lr * (noisy_count / sampled - self.cfg.dp_quantile))
        if self.cfg.dp_noise > 0:
            self.accountant.step(noise_multiplier=self.cfg.dp_noise, sample_rate=min(1.0, sample_rate))
        return mean

    def epsilon(self) -> float:
        """Epsilon spent so far at `dp_delta` (infinite without noise)."""
        if self.cfg.dp_noise == 0:
            return math.inf
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.cfg.dp_delta))
