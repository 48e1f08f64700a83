"""Reference models and the one place that turns a [model] section into an nn.Module."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from shoal.config import ConfigError, ModelConfig
from shoal.data.spec import DataSpec

from shoal.models.hf import call_model, logits_of, loss_of

__all__ = ["Loss", "build_model", "call_model", "compute_loss", "import_callable", "to_device"]


def to_device(batch, device: torch.device):
    """A batch part (tensor, dict of tensors, or None: a model computing its own loss) on `device`."""
    if batch is None:
        return None
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return batch.to(device, non_blocking=True)


def import_callable(name: str, field: str):
    """The object `package.module:attribute` names; a ConfigError naming `field` otherwise."""
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{field} = '{name}' cannot be imported: {err}") from None


def build_model(cfg: ModelConfig, spec: DataSpec, *, params_on_meta: bool = False,
                folder_weights: bool = True) -> nn.Module:
    """Build the configured model for data described by `spec` (weights from the current seed,
    or a model.hf folder's). `params_on_meta`: a layout will shard the model, so a model.hf
    checkpoint may be left on the meta device for each rank to read its share (models/hf.py).
    `folder_weights=False`: a model.hf folder's weights are not read (a run's checkpoint follows)."""
    if cfg.hf:
        from shoal.models.hf import load_hf
        return _fits_data(load_hf(cfg.hf, params_on_meta=params_on_meta, folder_weights=folder_weights), spec,
                          "model.hf")
    if cfg.factory:
        factory = import_callable(cfg.factory, "model.factory")
        model = factory(spec)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory = '{cfg.factory}' returned {type(model).__name__}, not an nn.Module")
        from shoal.models.hf import prepare
        return _fits_data(prepare(model), spec, "model.factory")
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


def _fits_data(model: nn.Module, spec: DataSpec, field: str) -> nn.Module:
    # a token id past the embedding table fails deep inside the model with an index error
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    if spec.kind == "tokens" and vocab and spec.vocab_size > vocab:
        raise ConfigError(f"{field}: the model's vocab_size {vocab} is smaller than the data's {spec.vocab_size} "
                          f"token ids")
    if spec.kind == "tokens" and not vocab:
        _check_token_ids(model, spec, field)
    return model


def _check_token_ids(model: nn.Module, spec: DataSpec, field: str) -> None:
    """A model with no config to read (a factory's): each nn.Embedding checks the ids of its first
    call, so a table smaller than the data's vocabulary is one line naming the fix, not torch's
    IndexError from inside the model. Position embeddings get positions and pass."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            module._shoal_id_check = module.register_forward_pre_hook(_embedding_check(name, spec, field))


def _embedding_check(name: str, spec: DataSpec, field: str):
    def check(module: nn.Embedding, args: tuple) -> None:
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.numel() and not ids.dtype.is_floating_point and not ids.is_meta:
            top = int(ids.max())
            if top >= module.num_embeddings:
                raise ConfigError(f"{field}: {name} is an nn.Embedding of {module.num_embeddings} rows but the data's "
                                  f"token ids reach {top} (data vocab_size {spec.vocab_size}); build it with "
                                  f"spec.vocab_size rows")
        module._shoal_id_check.remove()  # once: the ids of one batch tell
    return check


IGNORE_INDEX = -100
"""A target that does not count (padding): torch's cross-entropy skips it (shoal/data/tables.py pads with it)."""


def compute_loss(output, target: torch.Tensor | None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for integer targets (classes or next tokens; IGNORE_INDEX skipped), mean
    squared error for floats. `output` is a tensor of logits or a model output holding them
    (`.logits`); with no target the model's own `.loss` is used. `reduction = "sum"` sums the
    cross-entropy over the targets that count (the Trainer divides by their global number)."""
    if target is None:
        return loss_of(output)
    output = logits_of(output)
    if target.dtype.is_floating_point:
        return F.mse_loss(output.float().view_as(target) if output.numel() == target.numel() else output.float(),
                          target)
    return F.cross_entropy(output.float().flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class Loss:
    """The configured loss (model.loss), called as loss(output, inputs, targets).

    '' is `compute_loss`; 'model' reads the model's own `.loss` (the targets go to the model
    as `labels` when the inputs do not carry them); 'package.module:fn' is called as
    fn(output, batch), where batch is a dict of the inputs (a tensor input under "inputs")
    and "targets". The first value is checked: a non-scalar or NaN loss is a ConfigError.
    """

    def __init__(self, spec: str = ""):
        self.spec = spec
        self.fn = import_callable(spec, "model.loss") if spec and spec != "model" else None
        self.checked = False

    @property
    def wants_labels(self) -> bool:
        return self.spec == "model"

    def items(self, targets: torch.Tensor | None, every_target_counts: bool = False) -> torch.Tensor | int | None:
        """How many items of `targets` the loss averages over (the targets that are not
        IGNORE_INDEX) when the loss is the built-in cross-entropy; None otherwise (the model's own
        loss, a custom one, or mean squared error: their mean is taken as it comes). Data that
        promises `every_target_counts` (no padding) gets the targets' size as an int, counted
        without a tensor operation."""
        if self.spec or targets is None or targets.dtype.is_floating_point:
            return None
        if every_target_counts:
            return targets.numel()
        return (targets != IGNORE_INDEX).sum()

    def __call__(self, output, inputs, targets: torch.Tensor | None,
                 items: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one micro-batch: its mean, or with `items` (the built-in loss only) its sum
        divided by `items`, the count of the items that count per data-parallel rank in the step."""
        if self.fn is not None:
            batch = dict(inputs) if isinstance(inputs, dict) else {"inputs": inputs}
            batch["targets"] = targets
            loss = self.fn(output, batch)
        elif self.spec == "model":
            loss = loss_of(output)
        elif items is not None:
            loss = compute_loss(output, targets, reduction="sum") / items
        else:
            loss = compute_loss(output, targets)
        if not self.checked:
            self._check(loss)
        else:  # the shape on every call (the pipeline's last stage calls it on placeholders first)
            self._check_shape(loss)
        return loss.reshape(())

    def _what(self) -> str:
        return f"model.loss = '{self.spec}'" if self.spec else "the built-in loss"

    def _check_shape(self, loss) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(f"{self._what()} returned {shape}, not a scalar tensor")

    def _check(self, loss) -> None:
        what = self._what()
        self._check_shape(loss)
        if not torch.isfinite(loss.detach()).all():
            raise ConfigError(f"{what} returned {float(loss.detach())} on the first batch")
        self.checked = True
