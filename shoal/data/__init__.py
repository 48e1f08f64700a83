"""Datasets and loaders: offline corpora, user files, generated data, resumable sharding."""

from __future__ import annotations

from shoal.config import ConfigError, DataConfig
from shoal.data import datasets
from shoal.data.sampler import ShardedSampler
from shoal.data.spec import DataSpec

__all__ = ["DataSpec", "ShardedSampler", "build_dataset"]


def build_dataset(cfg: DataConfig, seed: int = 0):
    """(train, validation, spec) for a [data] section; the split is the tail of the samples."""
    if cfg.factory:
        from shoal.data.factory import build_factory
        return build_factory(cfg)
    try:
        if cfg.source in ("stdlib", "text"):
            tokens = (datasets.stdlib_corpus(cfg.max_bytes, datasets.cache_dir(cfg.cache_dir))
                      if cfg.source == "stdlib" else datasets.text_files(cfg.path))
            full = datasets.TokenWindows(tokens, cfg.seq_len)
            spec = DataSpec(kind="tokens", vocab_size=datasets.VOCAB_SIZE, seq_len=cfg.seq_len)
        elif cfg.source == "npy":
            x, y = datasets.npy_arrays(cfg.path)
            full, spec = datasets.Arrays(x, y), datasets.spec_for_arrays(x, y)
        elif cfg.source == "synthetic":
            x, y = datasets.synthetic_classes(cfg.num_samples, cfg.features, cfg.classes, seed)
            full = datasets.Arrays(x, y)
            spec = DataSpec(kind="classes", in_features=cfg.features, num_classes=cfg.classes)
        else:
            from shoal.data.clicks import build_clicks
            return build_clicks(cfg, seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    n_val = int(len(full) * cfg.val_fraction)
    if len(full) - n_val < 2:
        raise ConfigError(f"data: only {len(full)} samples in {cfg.source} data; need more text or a smaller "
                          f"data.seq_len")
    n_train = len(full) - n_val
    return datasets.Subset(full, 0, n_train), datasets.Subset(full, n_train, len(full)), spec
