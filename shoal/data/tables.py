"""`data.source = "arrow"` / `"parquet"`: tables read by row, without loading them whole.

Arrow files (the IPC stream files `datasets.save_to_disk` writes, or IPC files) are
memory-mapped, so a batch is a zero-copy `take` of its rows. Parquet is compressed per
row group: a batch decodes the row groups its rows fall in (the last few stay cached), so
for large data sets read at random, Arrow or token shards are the faster form.

Three shapes of table, chosen by `data.columns` and `data.label`:
- a column of token ids (list of ints): the rows taken as one stream, cut into windows
  of `seq_len + 1` tokens, as token shards are;
- a text column: each row is a sample, tokenised when its batch is read (in the loader
  workers when `data.loader_workers` > 0), cut or padded to `seq_len + 1` tokens (padding
  is not trained on: its targets are -100, which the cross-entropy ignores);
- feature columns plus a `label` column: x is the features as float32, y the label.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from shoal.config import ConfigError
from shoal.data.sources import hf_arrow_files, is_hf_folder, open_arrow
from shoal.data.spec import DataSpec
from shoal.data.tokenizer import encode_documents, load_tokenizer

TOKEN_COLUMNS = ("input_ids", "tokens", "text")
IGNORE = -100
"""Target id of padding: torch's cross-entropy skips it."""


def table_files(path: str, source: str) -> list[Path]:
    root = Path(path)
    if is_hf_folder(root):
        return hf_arrow_files(root)
    suffix = ".parquet" if source == "parquet" else ".arrow"
    files = sorted(root.rglob(f"*{suffix}")) if root.is_dir() else [root]
    if not files:
        raise ConfigError(f"data.path: no {suffix} files under {root}")
    return files


class Part:
    """One file's rows: `take(rows, columns)` -> {column: pyarrow array}."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            try:
                self.parquet = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
                raise ConfigError(f"{path}: not a Parquet file ({err})") from None
            meta = self.parquet.metadata
            self.group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
            self.names, self.num_rows = self.parquet.schema_arrow.names, meta.num_rows
            self.schema = self.parquet.schema_arrow
            self._groups: OrderedDict = OrderedDict()
        else:
            self.parquet, self.table = None, open_arrow(path)
            self.names, self.num_rows, self.schema = self.table.column_names, self.table.num_rows, self.table.schema

    def __getstate__(self):  # a loader worker opens the file again (memory maps are not pickled)
        return {"path": self.path}

    def __setstate__(self, state) -> None:
        self.__init__(state["path"])

    def group(self, k: int, columns: tuple[str, ...]):
        if (k, columns) not in self._groups:
            if len(self._groups) >= 4:
                self._groups.popitem(last=False)
            self._groups[(k, columns)] = self.parquet.read_row_group(k, columns=list(columns))
        return self._groups[(k, columns)]

    def take(self, rows: np.ndarray, columns: tuple[str, ...]):
        import pyarrow as pa
        if self.parquet is None:
            return self.table.select(list(columns)).take(pa.array(rows))
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        pieces = [self.group(int(k), columns).take(pa.array(rows[groups == k] - self.group_starts[k]))
                  for k in np.unique(groups)]
        order = np.argsort(np.concatenate([np.flatnonzero(groups == k) for k in np.unique(groups)]), kind="stable")
        return pa.concat_tables(pieces).take(pa.array(order))

    def column(self, name: str):
        """The whole column (a full read for Parquet: used only for the checks at start)."""
        return self.table.column(name) if self.parquet is None else self.parquet.read(columns=[name]).column(0)


class Table:
    """Rows of several files, indexed by a global row id."""

    def __init__(self, files: list[Path]):
        self.parts = [Part(f) for f in files]
        self.starts = np.cumsum([0] + [p.num_rows for p in self.parts])
        names = self.parts[0].names
        for part in self.parts[1:]:
            if part.names != names:
                raise ConfigError(f"{part.path}: columns {part.names} differ from {self.parts[0].path}'s {names}")
        self.names = names

    def __len__(self) -> int:
        return int(self.starts[-1])

    def need(self, column: str) -> None:
        if column not in self.names:
            raise ConfigError(f"{self.parts[0].path}: no column '{column}' (columns: {', '.join(self.names)})")

    def take(self, ids: torch.Tensor, columns: tuple[str, ...]):
        import pyarrow as pa
        rows = ids.numpy().astype(np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        if (which == which[0]).all():
            return self.parts[which[0]].take(rows - self.starts[which[0]], columns)
        pieces = [self.parts[k].take(rows[which == k] - self.starts[k], columns) for k in np.unique(which)]
        order = np.argsort(np.concatenate([np.flatnonzero(which == k) for k in np.unique(which)]), kind="stable")
        return pa.concat_tables(pieces).take(pa.array(order))


class FeatureRows:
    """x = the feature columns as float32, y = the label column."""

    def __init__(self, table: Table, features: tuple[str, ...], label: str):
        self.table, self.features, self.label = table, features, label

    def __len__(self) -> int:
        return len(self.table)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table.take(ids, self.features + (self.label,))
        x = np.stack([rows.column(c).to_numpy(zero_copy_only=False) for c in self.features], axis=1)
        y = torch.from_numpy(rows.column(self.label).to_numpy(zero_copy_only=False).copy())
        return torch.from_numpy(x.astype(np.float32)), (y.float() if y.dtype.is_floating_point else y.long())


class TextRows:
    """Each row's text tokenised when read (with the end-of-text id, as shards have it), cut or padded
    to `seq_len + 1` tokens."""

    def __init__(self, table: Table, column: str, tokenizer: str, seq_len: int):
        self.table, self.column, self.tokenizer_spec, self.seq_len = table, column, tokenizer, seq_len
        self.tokenizer = load_tokenizer(tokenizer)
        self.tokens_per_sample = seq_len

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self):  # the tokenizer is loaded again in each loader worker
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.tokenizer = load_tokenizer(self.tokenizer_spec)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [t or "" for t in self.table.take(ids, (self.column,)).column(0).to_pylist()]
        window = torch.full((len(texts), self.seq_len + 1), IGNORE, dtype=torch.long)
        for row, tokens in enumerate(encode_documents(self.tokenizer, texts)):
            tokens = tokens[:self.seq_len + 1]
            window[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        inputs = window[:, :-1].clamp(min=0)  # padding is fed as id 0 and never trained on
        return inputs, window[:, 1:]


def _segments(column) -> list[np.ndarray]:
    """The token ids of each chunk of a list column (a view of the memory map for Arrow files)."""
    import pyarrow as pa
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunks]


class TokenColumn:
    """Rows of token ids taken as one stream; windows of `seq_len + 1` tokens, part by part in memory maps."""

    def __init__(self, table: Table, column: str, seq_len: int):
        self.table, self.column, self.seq_len = table, column, seq_len
        self.segments = [s for part in table.parts for s in _segments(part.column(column))]
        self.starts = np.cumsum([0] + [len(s) for s in self.segments])
        self.tokens_per_sample = seq_len

    def __len__(self) -> int:
        return max(0, (int(self.starts[-1]) - 1) // self.seq_len)

    def read(self, start: int, count: int) -> np.ndarray:
        out, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while count > 0:
            piece = self.segments[k][start - self.starts[k]:start - self.starts[k] + count]
            out.append(piece)
            start, count, k = start + len(piece), count - len(piece), k + 1
        return np.concatenate(out)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(np.stack([self.read(i * self.seq_len, self.seq_len + 1)
                                            for i in ids.tolist()]).astype(np.int64))
        return window[:, :-1], window[:, 1:]


def _check_text(table: Table, column: str) -> None:
    import pyarrow.compute as pc
    for part in table.parts:
        head = part.take(np.arange(min(1000, part.num_rows)), (column,)).column(0)
        if part.num_rows == 0 or not (pc.sum(pc.utf8_length(head)).as_py() or 0):
            raise ConfigError(f"{part.path}: the text column '{column}' is empty")


def open_table_dataset(cfg) -> tuple[object, DataSpec]:
    """(all samples, spec) of a table for a [data] section."""
    import pyarrow as pa
    import pyarrow.compute as pc
    table = Table(table_files(cfg.path, cfg.source))
    if len(table) == 0:
        raise ConfigError(f"data.path: {cfg.path} has no rows")
    columns = tuple(c.strip() for c in cfg.columns.split(",") if c.strip())
    if cfg.label:
        table.need(cfg.label)
        schema = table.parts[0].schema
        features = columns or tuple(n for n in table.names if n != cfg.label and (
            pa.types.is_integer(schema.field(n).type) or pa.types.is_floating(schema.field(n).type)))
        for name in features:
            table.need(name)
        labels = [part.column(cfg.label) for part in table.parts]
        if pa.types.is_floating(labels[0].type):
            return FeatureRows(table, features, cfg.label), DataSpec(kind="regression", in_features=len(features),
                                                                     num_classes=1)
        classes = max(int(pc.max(col).as_py()) for col in labels) + 1
        return FeatureRows(table, features, cfg.label), DataSpec(kind="classes", in_features=len(features),
                                                                 num_classes=classes)
    column = columns[0] if columns else next((c for c in TOKEN_COLUMNS if c in table.names), "")
    if not column:
        raise ConfigError(f"{table.parts[0].path}: none of the columns {', '.join(TOKEN_COLUMNS)}; name the token "
                          f"or text column with data.columns (or feature columns with data.label)")
    table.need(column)
    kind = table.parts[0].schema.field(column).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        _check_text(table, column)
        rows = TextRows(table, column, cfg.tokenizer, cfg.seq_len)
        return rows, DataSpec(kind="tokens", vocab_size=rows.tokenizer.vocab_size, seq_len=cfg.seq_len)
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise ConfigError(f"{table.parts[0].path}: column '{column}' is {kind}, neither token ids (a list of ints) "
                          f"nor text")
    data = TokenColumn(table, column, cfg.seq_len)
    vocab = max(int(s.max()) for s in data.segments if len(s)) + 1
    if cfg.tokenizer != "bytes":  # the tokenizer that made the ids bounds them better than their maximum
        vocab = max(vocab, load_tokenizer(cfg.tokenizer).vocab_size)
    return data, DataSpec(kind="tokens", vocab_size=vocab, seq_len=cfg.seq_len)
