"""Datasets and loaders: offline corpora, user files, token shards, tables, images, your own Dataset.

Every source is a map from sample id to sample with `len(ds)` and `ds.get(ids)`; the
`ShardedSampler` hands out the ids. See docs/data.md.
"""

from __future__ import annotations

from shoal.config import ConfigError, DataConfig
from shoal.data import datasets
from shoal.data.factory import from_torch_dataset
from shoal.data.sampler import ShardedSampler
from shoal.data.spec import DataSpec

__all__ = ["DataSpec", "ShardedSampler", "build_dataset", "data_fingerprint", "from_torch_dataset"]


def _build_full(cfg: DataConfig, seed: int):
    """(all samples, spec) of a built-in source."""
    cache = datasets.cache_dir(cfg.cache_dir)
    if cfg.source in ("stdlib", "text"):
        tokens = datasets.stdlib_corpus(cfg.max_bytes, cache) if cfg.source == "stdlib" \
            else datasets.text_files(cfg.path)
        return datasets.TokenWindows(tokens, cfg.seq_len), DataSpec(kind="tokens", vocab_size=datasets.VOCAB_SIZE,
                                                                     seq_len=cfg.seq_len)
    if cfg.source == "npy":
        x, y = datasets.npy_arrays(cfg.path)
        return datasets.Arrays(x, y), datasets.spec_for_arrays(x, y)
    if cfg.source == "synthetic":
        x, y = datasets.synthetic_classes(cfg.num_samples, cfg.features, cfg.classes, seed)
        return datasets.Arrays(x, y), DataSpec(kind="classes", in_features=cfg.features, num_classes=cfg.classes)
    if cfg.source == "shards":
        from shoal.data.shards import TokenShards
        full = TokenShards(cfg.path, cfg.seq_len, cache)
        return full, full.spec()
    if cfg.source in ("arrow", "parquet"):
        from shoal.data.tables import open_table_dataset
        return open_table_dataset(cfg)
    raise AssertionError(cfg.source)


def build_dataset(cfg: DataConfig, seed: int = 0):
    """(train, validation, spec) for a [data] section; the split is whole files chosen by hash
    for the stdlib corpus, the tail of the samples otherwise."""
    if cfg.factory:
        from shoal.data.factory import build_factory
        from shoal.data.loader import wrap_for_training
        train, val, spec = build_factory(cfg)
        return wrap_for_training(train, cfg), val, spec
    if cfg.source == "clicks":
        from shoal.data.clicks import build_clicks
        return build_clicks(cfg, seed)
    if cfg.source == "images":
        from shoal.data.images import build_images
        return build_images(cfg, seed)
    if cfg.source == "stdlib":  # whole files held out, spread over the corpus (datasets.held_out)
        from shoal.data.loader import wrap_for_training
        train_tokens, val_tokens = datasets.stdlib_split(cfg.max_bytes, datasets.cache_dir(cfg.cache_dir),
                                                         cfg.val_fraction)
        spec = DataSpec(kind="tokens", vocab_size=datasets.VOCAB_SIZE, seq_len=cfg.seq_len)
        return (wrap_for_training(datasets.TokenWindows(train_tokens, cfg.seq_len), cfg),
                datasets.TokenWindows(val_tokens, cfg.seq_len), spec)
    try:
        full, spec = _build_full(cfg, seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    n_val = int(len(full) * cfg.val_fraction)
    if len(full) - n_val < 2:
        raise ConfigError(f"data: only {len(full)} samples in {cfg.source} data; need more text or a smaller "
                          f"data.seq_len")
    n_train = len(full) - n_val
    from shoal.data.loader import wrap_for_training
    return wrap_for_training(datasets.Subset(full, 0, n_train), cfg), datasets.Subset(full, n_train, len(full)), spec


def data_fingerprint(cfg: DataConfig) -> str:
    """Names the data a run trains on, for the resume check; empty for sources named by the config alone."""
    if cfg.source == "shards" and not cfg.factory:
        from shoal.data.shards import fingerprint, read_index
        return f"shards:{fingerprint(read_index(cfg.path))}"
    return ""


def check_vocab(spec: DataSpec, model_vocab: int, where: str) -> None:
    """A token id the model's embedding cannot hold is a one-line error, before training starts."""
    if spec.kind == "tokens" and model_vocab and spec.vocab_size > model_vocab:
        raise ConfigError(f"{where}: the tokenizer has {spec.vocab_size} ids but the model's embedding holds "
                          f"{model_vocab} (model.vocab)")


def check_data(cfg) -> None:
    """Open the configured data once in the launcher, so a missing or corrupt shard, a missing tokenizer,
    an empty column or a vocabulary too large for the model stops the run before any worker starts."""
    if cfg.data.factory or cfg.data.source not in ("shards", "arrow", "parquet", "images"):
        return
    train, _, spec = build_dataset(cfg.data, cfg.train.seed)
    check_vocab(spec, getattr(cfg.model, "vocab", 0), cfg.data.path)
    if len(train) < cfg.train.batch_size:
        raise ConfigError(f"data.path: {cfg.data.path} gives {len(train)} training samples of data.seq_len = "
                          f"{cfg.data.seq_len}, fewer than train.batch_size = {cfg.train.batch_size}")
