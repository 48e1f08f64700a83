"""Your own data: a map-style `torch.utils.data.Dataset` behind Shoal's `get(ids)` contract.

`data.factory = "pkg.mod:build"` names a function that returns a Dataset (or a (train,
validation) pair). Shoal's sampler still hands out the sample ids, so the data order, exact
resume and fault tolerance work as they do for the built-in sources; a batch is the items
of its ids passed through `data.collate` (torch's `default_collate` unless set).

Items are `(input, target)` tuples, a lone input (the model computes its own loss), or
dicts of tensors; from a dict, a `target`/`targets`/`label` entry becomes the target and
everything else (Hugging Face's `labels` included) stays in the inputs.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Any, Callable

import torch
from torch.utils.data import default_collate

from shoal.config import ConfigError
from shoal.data.spec import DataSpec

log = logging.getLogger("shoal")

TARGET_KEYS = ("target", "targets", "label")
SCAN_LIMIT = 50_000
"""Largest dataset whose labels are read one by one to count the classes (else an attribute is needed)."""


class BadRecord(ConfigError):
    """A record that cannot be read (a corrupt image, a line that is not JSON), or records that
    cannot be made into a batch, met during training."""


def import_function(field: str, name: str) -> Callable:
    """`pkg.mod:fn` -> the function, or a one-line ConfigError naming the field."""
    module_name, _, func_name = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{field} = '{name}' cannot be imported: {err}") from None


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A collated batch -> (inputs, targets) as the Trainer takes them."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ConfigError(f"data.factory: items must be (input, target) pairs, got {len(batch)} parts")
    if isinstance(batch, dict):
        inputs = dict(batch)
        for key in TARGET_KEYS:
            if key in inputs:
                return inputs, inputs.pop(key)
        return inputs, None
    return batch, None


class TorchDataset:
    """A map-style Dataset read by sample id: `get(ids)` collates `dataset[i]` for each id."""

    def __init__(self, dataset, collate: Callable | None = None, *, on_bad_record: str = "error",
                 tokens_per_sample: int = 1):
        self.dataset, self.collate = dataset, collate or default_collate
        self.on_bad_record, self.bad_records = on_bad_record, 0
        self.tokens_per_sample = tokens_per_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def items(self, ids: torch.Tensor) -> list:
        out = []
        for i in ids.tolist():
            try:
                out.append(self.dataset[i])
            except (OSError, ValueError, KeyError, IndexError, RuntimeError) as err:
                if self.on_bad_record == "error":
                    raise BadRecord(f"data.factory: sample {i} cannot be read: {type(err).__name__}: {err} "
                                    f"(data.on_bad_record = 'skip' drops such samples)") from None
                self.bad_records += 1
                log.warning("skipped sample %d (%s); %d bad records so far", i, err, self.bad_records)
        if not out:
            raise BadRecord(f"data.factory: every sample of a batch was unreadable (ids {ids.tolist()[:8]}...)")
        return out

    def get(self, ids: torch.Tensor):
        items = self.items(ids)
        try:
            batch = self.collate(items)
        except RuntimeError as err:
            if self.collate is not default_collate or "equal size" not in str(err):
                raise
            # samples of different lengths (text, variable-size images): torch can only stack equal ones
            raise BadRecord(f"data.factory: the samples of a batch differ in size ({str(err).splitlines()[0]}); "
                            f"set data.collate = 'package.module:function' to pad them into one batch "
                            f"(shoal.train(collate=...))") from None
        return split_batch(batch)


def _class_count(dataset, targets: torch.Tensor | None) -> int:
    for attr in ("num_classes", "classes"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return value if isinstance(value, int) else len(value)
    labels = getattr(dataset, "targets", None)
    if labels is not None:
        return int(torch.as_tensor(labels).max()) + 1
    if len(dataset) > SCAN_LIMIT:
        raise ConfigError(f"data.factory: cannot tell the number of classes of {len(dataset)} samples; give the "
                          f"dataset a num_classes attribute")
    return int(max(int(torch.as_tensor(split_batch(default_collate([dataset[i]]))[1]).max())
                   for i in range(len(dataset)))) + 1


def infer_spec(dataset, collate: Callable | None) -> DataSpec:
    """What the model needs to know, from the dataset's attributes and its first item."""
    spec = getattr(dataset, "spec", None)
    if isinstance(spec, DataSpec):
        return spec
    if len(dataset) == 0:
        raise ConfigError("data.factory: the dataset is empty")
    inputs, targets = split_batch((collate or default_collate)([dataset[0]]))
    if isinstance(inputs, dict):
        inputs = inputs.get("input_ids", inputs.get("pixel_values", next(iter(inputs.values()))))
    inputs = torch.as_tensor(inputs)
    vocab = getattr(dataset, "vocab_size", 0)
    if not inputs.dtype.is_floating_point and inputs.ndim == 2:  # a sequence of token ids per sample
        if not vocab:
            raise ConfigError("data.factory: token data needs the dataset's vocab_size attribute")
        return DataSpec(kind="tokens", vocab_size=int(vocab), seq_len=inputs.shape[1])
    shape = tuple(inputs.shape[1:])
    flat = math.prod(shape) if shape else 1
    if targets is not None and torch.as_tensor(targets).dtype.is_floating_point:
        width = math.prod(torch.as_tensor(targets).shape[1:]) or 1
        return DataSpec(kind="regression", in_features=flat, num_classes=width,
                        input_shape=shape if len(shape) > 1 else ())
    classes = _class_count(dataset, targets) if targets is not None else 0
    return DataSpec(kind="classes", in_features=flat, num_classes=classes, input_shape=shape if len(shape) > 1 else ())


def from_torch_dataset(data, *, collate: Callable | None = None, val_fraction: float = 0.05,
                       on_bad_record: str = "error") -> tuple[TorchDataset, TorchDataset, DataSpec]:
    """(train, validation, spec) from a Dataset, or a (train, validation) pair of them.

    A single Dataset is split as the built-in sources are: the last `val_fraction` of it is held out."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ConfigError(f"data.factory: expected a Dataset or a (train, validation) pair, got {len(data)} items")
        train, val = data
    else:
        n_val = int(len(data) * val_fraction)
        train = torch.utils.data.Subset(data, range(len(data) - n_val))
        val = torch.utils.data.Subset(data, range(len(data) - n_val, len(data)))
        for attr in ("spec", "num_classes", "classes", "vocab_size"):  # Subset hides the attributes inference reads
            if hasattr(data, attr):
                setattr(train, attr, getattr(data, attr))
    for part, name in ((train, "training"), (val, "validation")):
        if not hasattr(part, "__getitem__") or not hasattr(part, "__len__"):
            raise ConfigError(f"data.factory: the {name} set is a {type(part).__name__}, not a map-style Dataset "
                              f"(it needs __len__ and __getitem__)")
    spec = infer_spec(train, collate)
    tokens = spec.seq_len if spec.kind == "tokens" else 1
    return (TorchDataset(train, collate, on_bad_record=on_bad_record, tokens_per_sample=tokens),
            TorchDataset(val, collate, on_bad_record=on_bad_record, tokens_per_sample=tokens), spec)


def build_factory(cfg) -> tuple[TorchDataset, TorchDataset, DataSpec]:
    """(train, validation, spec) for `data.factory` (and `data.collate`) of a [data] section."""
    build = import_function("data.factory", cfg.factory)
    collate = import_function("data.collate", cfg.collate) if cfg.collate else None
    data = build(cfg) if inspect.signature(build).parameters else build()  # it may take the [data] section
    return from_torch_dataset(data, collate=collate, val_fraction=cfg.val_fraction, on_bad_record=cfg.on_bad_record)
