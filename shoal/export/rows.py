"""The rows `shoal predict` scores, read a range at a time (never the whole set at once).

`--data` is one of:
- a folder holding `x.npy` (a `y.npy` beside it is ignored), or a `.npy` file: a 2-D array,
  one row per sample, memory-mapped;
- a `.parquet` file: every numeric column is a feature, in file order, except `id` (kept as
  the row's id) and `label`/`y` (ignored); read one row group at a time;
- `key=value` overrides of the run's own `[data]` section (`source=clicks num_samples=50000`):
  every sample that source makes, in order, none held out.

A row's id is its position, unless a Parquet file gives an `id` column.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from shoal.config import Config, ConfigError
from shoal.data.spec import DataSpec

IGNORED_COLUMNS = ("label", "y")


class NpyRows:
    def __init__(self, path: Path):
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ConfigError(f"--data: {path} is not a plain .npy array ({err})") from None
        if self.array.ndim != 2:
            raise ConfigError(f"--data: {path} must be 2-D (rows, features), got shape {self.array.shape}")
        self.columns = [f"column {i}" for i in range(self.array.shape[1])]
        self.describe = str(path)

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        return np.arange(start, stop, dtype=np.int64), torch.from_numpy(np.array(self.array[start:stop], np.float32))


class ParquetRows:
    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"--data: {path} is not a Parquet file ({err})") from None
        schema = self.file.schema_arrow
        self.columns = [f.name for f in schema if f.name not in ("id", *IGNORED_COLUMNS)]
        bad = [f"{f.name} ({f.type})" for f in schema if f.name in self.columns
               and not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]
        if bad:
            raise ConfigError(f"--data: {path} column {bad[0]} is not numeric; features must be numbers")
        self.has_id = "id" in schema.names
        metadata = self.file.metadata
        self.starts = list(np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]))
        self.describe = str(path)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        import pyarrow as pa
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_left(self.starts, stop)
        names = self.columns + (["id"] if self.has_id else [])
        table = self.file.read_row_groups(list(range(first, last)), columns=names)
        table = table.slice(start - self.starts[first], stop - start)
        x = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in self.columns], 1)
        ids = (table.column("id").cast(pa.int64()).to_numpy() if self.has_id
               else np.arange(start, stop, dtype=np.int64))
        return ids, torch.from_numpy(x)


class SourceRows:
    """Every sample of the run's [data] section with overrides, as the training loader sees it."""

    def __init__(self, cfg: Config, overrides: list[str]):
        import copy

        from shoal import config as config_module
        from shoal.data import build_dataset
        mine = copy.deepcopy(cfg)  # the run's config stays as it was saved
        config_module.apply_overrides(mine, [f"data.{item.removeprefix('data.')}" for item in overrides]
                                      + ["data.val_fraction=0"])
        config_module.validate(mine)
        self.dataset, _, spec = build_dataset(mine.data, cfg.train.seed)
        width = row_width(spec)
        self.columns = [f"feature {i}" for i in range(width)]
        self.describe = " ".join(overrides)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        inputs, _ = self.dataset.get(torch.arange(start, stop))
        if isinstance(inputs, dict):
            raise ConfigError(f"--data: {self.describe} gives samples of several inputs ({', '.join(inputs)}); "
                              f"predict scores rows of one tensor (give --data a .npy or .parquet of rows)")
        return np.arange(start, stop, dtype=np.int64), inputs if inputs.dtype == torch.long else inputs.float()


def open_rows(data: list[str], cfg: Config):
    """The rows named by `--data` (see the module docstring)."""
    if all("=" in item for item in data):
        return SourceRows(cfg, data)
    if len(data) != 1:
        raise ConfigError(f"--data: give one path, or key=value overrides of [data]; got {' '.join(data)}")
    path = Path(data[0])
    if path.is_dir():
        path = path / "x.npy"
    if not path.is_file():
        raise ConfigError(f"--data: {path} not found")
    if path.suffix == ".npy":
        return NpyRows(path)
    if path.suffix == ".parquet":
        return ParquetRows(path)
    raise ConfigError(f"--data: {path} is neither .npy nor .parquet (or a folder holding x.npy)")


def row_width(spec: DataSpec) -> int:
    """Numbers per row: the token ids of one sample for a text classifier, else the features."""
    return spec.seq_len if spec.kind == "tokens" else spec.in_features


def classifies_text(cfg: Config) -> bool:
    """Whether the run's model reads token ids and gives one output per sample (a Hugging Face
    sequence classifier) rather than one per position (a language model: shoal generate)."""
    if not cfg.model.hf:
        return False
    from shoal.models.hf import model_class, read_hf_config
    return not model_class(read_hf_config(cfg.model.hf), cfg.model.hf).can_generate()


def check_rows(rows, spec: DataSpec, *, text_classifier: bool = False) -> None:
    """The rows fit the model: as many feature columns (token ids for a text classifier) as it takes."""
    if spec.kind == "tokens" and not text_classifier:
        raise ConfigError("shoal predict scores rows of features; this run's model reads text (use shoal generate)")
    if len(rows.columns) != row_width(spec):
        shown = ", ".join(rows.columns[:6]) + (", ..." if len(rows.columns) > 6 else "")
        what = "token ids" if spec.kind == "tokens" else "inputs"
        raise ConfigError(f"--data: {rows.describe} has {len(rows.columns)} feature columns ({shown}); the model "
                          f"takes {row_width(spec)} {what}")
    if len(rows) == 0:
        raise ConfigError(f"--data: {rows.describe} has no rows")


def score_rows(model: torch.nn.Module, x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """The model's outputs for a batch of rows: token ids as integers, an image's numbers in its
    shape, and the logits read from a model output (ImageClassifierOutput, SequenceClassifierOutput...)."""
    from shoal.models.hf import logits_of
    if spec.kind == "tokens":
        x = x.long()
    elif spec.input_shape and x.dim() == 2:
        x = x.view(-1, *spec.input_shape)
    outputs = logits_of(model(x))
    if outputs.dim() != 2:
        raise ConfigError(f"this run's model gives outputs of shape {list(outputs.shape)} per batch, not one row of "
                          f"scores per sample: predict and serve score classifiers and regressions (a language "
                          f"model: use shoal generate)")
    return outputs
