"""Reference models and the one place that turns a [model] section into an nn.Module."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from shoal.config import ConfigError, ModelConfig
from shoal.data.spec import DataSpec

__all__ = ["build_model", "compute_loss"]


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """Build the configured model for data described by `spec` (weights from the current seed)."""
    if cfg.factory:
        module_name, _, func_name = cfg.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"model.factory = '{cfg.factory}' cannot be imported: {err}") from None
        model = factory(spec)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory = '{cfg.factory}' returned {type(model).__name__}, not an nn.Module")
        return model
    sizes = {"dim": cfg.dim, "n_layers": cfg.n_layers, "dropout": cfg.dropout}
    if cfg.name == "gpt":
        if spec.kind != "tokens":
            raise ConfigError(f"model.name = 'gpt' needs token data; data gives '{spec.kind}' (use model.name = 'mlp')")
        from shoal.models.gpt import build_gpt
        return build_gpt(spec.vocab_size, spec.seq_len, cfg.flavour, n_heads=cfg.n_heads, **sizes)
    if cfg.name == "mlp":
        if spec.kind == "tokens":
            raise ConfigError("model.name = 'mlp' needs feature data; data gives tokens (use model.name = 'gpt')")
        from shoal.models.mlp import build_mlp
        return build_mlp(spec.in_features, spec.num_classes, cfg.flavour, **sizes)
    if cfg.name == "cnn":
        if len(spec.input_shape) != 3:
            raise ConfigError("model.name = 'cnn' needs images (data.source = 'images', or a data.factory giving "
                              "[channels, height, width] inputs)")
        from shoal.models.cnn import build_cnn
        return build_cnn(spec.input_shape, spec.num_classes, cfg.flavour, **sizes)
    from shoal.models.dlrm import build_dlrm
    return build_dlrm(spec, cfg)


def compute_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (classes or next tokens), mean squared error for floats."""
    if target.dtype.is_floating_point:
        return F.mse_loss(output.float().view_as(target) if output.numel() == target.numel() else output.float(),
                          target)
    return F.cross_entropy(output.float().flatten(0, -2), target.flatten())
