"""What one client does with the global model: train on its own data, or evaluate it.

Shared by the real client process (`client.py`) and the simulation workers (`simulate.py`),
so a simulated federation trains exactly like a real one. Local DP-SGD goes through opacus.
`model_spec` is the model's shape, which server and client both read from the config.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from shoal.config import Config, ConfigError, FederatedConfig
from shoal.data.spec import DataSpec
from shoal.models import compute_loss


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                               weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, round_config: dict[str, float],
                generator: torch.Generator, privacy_engine: Any = None) -> dict[str, float]:
    """Train `model` in place for the round's local epochs; returns the mean training loss.

    `proximal_mu` in the round's config adds FedProx's (mu/2)||w - w_global||^2.
    With `privacy_engine` (an opacus PrivacyEngine kept for the client's life) training is DP-SGD.
    """
    if len(x) == 0:
        return {"train_loss": 0.0}
    mu = float(round_config.get("proximal_mu", 0.0))
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    epochs = int(round_config.get("local_epochs", cfg.federated.local_epochs))
    batch = min(cfg.train.batch_size, len(x))
    model.train()
    if privacy_engine is not None:
        return _train_dp(model, x, y, cfg, epochs, batch, mu, anchor, privacy_engine, generator)
    optimizer = _optimizer(model, cfg)
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            ids = order[start:start + batch]
            loss = compute_loss(model(x[ids]), y[ids])
            total += float(loss.detach())
            if mu > 0:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            steps += 1
    return {"train_loss": total / max(1, steps)}


def _train_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, epochs: int, batch: int, mu: float,
              anchor: list[torch.Tensor], engine: Any, generator: torch.Generator) -> dict[str, float]:
    from torch.utils.data import DataLoader, TensorDataset

    # opacus wraps the module with per-sample-gradient hooks; wrap a copy and copy the weights back
    work = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, generator=generator)
    private, optimizer, loader = engine.make_private(
        module=work, optimizer=_optimizer(work, cfg), data_loader=loader,
        noise_multiplier=cfg.federated.local_dp_noise, max_grad_norm=cfg.federated.local_dp_clip)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            loss = compute_loss(private(xb), yb)
            total += float(loss.detach())
            if mu > 0:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(private.parameters(), anchor))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    model.load_state_dict(work.state_dict())
    return {"train_loss": total / max(1, steps),
            "local_epsilon": float(engine.accountant.get_epsilon(delta=cfg.federated.dp_delta))}


def warm_up(cfg: Config) -> None:
    """One step on a throwaway model: the first optimizer step pays seconds of lazy imports,
    which must not be spent inside a round's deadline."""
    model = nn.Linear(2, 2)
    train_local(model, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), cfg, {"local_epochs": 1.0},
                torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss, and accuracy for class labels, of `model` on (x, y)."""
    if len(x) == 0:
        return {}
    model.eval()
    output = model(x)
    metrics = {"loss": float(compute_loss(output, y))}
    if not y.dtype.is_floating_point:
        hits = output.argmax(-1) == y
        metrics["accuracy"] = float(hits.float().mean())
        # mean recall over the classes present: what matters when one class is rare (fraud)
        recalls = [float(hits[y == c].float().mean()) for c in torch.unique(y)]
        metrics["balanced_accuracy"] = sum(recalls) / len(recalls)
    return metrics


def model_spec(fed: FederatedConfig) -> DataSpec:
    """The federation's model shape, from the config the server and every site share (never from a peer)."""
    if fed.in_features <= 0 or fed.num_classes <= 0:
        raise ConfigError("federated.in_features and federated.num_classes must be set: the model's shape comes "
                          "from the config, never from a site (e.g. in_features = 64, num_classes = 10)")
    return DataSpec(kind="classes", in_features=fed.in_features, num_classes=fed.num_classes)
