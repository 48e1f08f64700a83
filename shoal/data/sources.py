"""Documents from the files a user has: text, JSONL, Parquet, Arrow and `datasets` folders.

`shoal data prepare` reads its sources through `documents(path, field)`, which yields
batches of strings, one string per document: a whole text file, one JSONL record, one
table row. A bad JSONL line is an error naming the file and line, or is skipped and
counted (`on_bad_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from shoal.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
BATCH = 512
"""Documents handed to the tokenizer at once (its batch encoder is the fast path)."""
TEXT_CHUNK = 8 << 20
"""A text file is read in pieces of about this many bytes, each cut after a newline."""


def hf_arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets.save_to_disk` folder (a Dataset, or every split of a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in hf_arrow_files(folder / split)]
    state = json.loads((folder / "state.json").read_text())
    return [folder / entry["filename"] for entry in state["_data_files"]]


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def discover(sources: list[str]) -> list[Path]:
    """Every file to read, in a fixed order (so the shards do not depend on the worker count)."""
    files: list[Path] = []
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise ConfigError(f"{src}: no such file or folder")
        if is_hf_folder(path):
            files += hf_arrow_files(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES)
            if not found:
                raise ConfigError(f"{src}: no text, JSONL, Parquet or Arrow files in this folder")
            files += found
        else:
            files.append(path)
    return files


def _text(path: Path) -> Iterator[list[str]]:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(TEXT_CHUNK)
            if not chunk:
                return
            if len(chunk) == TEXT_CHUNK:  # finish the line, so no token is cut in two
                chunk += f.readline()
            yield [chunk.decode("utf-8", errors="replace")]


def _jsonl(path: Path, field: str, on_bad_record: str, bad: list[int]) -> Iterator[list[str]]:
    batch: list[str] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[field]
                if not isinstance(text, str):
                    raise TypeError(f"'{field}' is {type(text).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as err:
                if on_bad_record == "error":
                    why = f"no '{field}' field" if isinstance(err, KeyError) else str(err).splitlines()[0]
                    raise ConfigError(f"{path}:{number}: bad record ({why}); --on-bad-record skip drops such lines")
                bad[0] += 1
                continue
            batch.append(text)
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _column(path: Path, names: list[str], field: str) -> None:
    if field not in names:
        raise ConfigError(f"{path}: no column '{field}' (columns: {', '.join(names)}); choose one with --field")


def _parquet(path: Path, field: str) -> Iterator[list[str]]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise ConfigError(f"{path}: not a Parquet file ({err})") from None
    _column(path, table.schema_arrow.names, field)
    for batch in table.iter_batches(columns=[field], batch_size=BATCH):
        yield [t for t in batch.column(0).to_pylist() if t is not None]


def open_arrow(path: Path):
    """A memory-mapped Arrow table: the IPC stream format `datasets` writes, or the IPC file format."""
    import pyarrow as pa
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as err:
            raise ConfigError(f"{path}: not an Arrow file ({err})") from None


def _arrow(path: Path, field: str) -> Iterator[list[str]]:
    table = open_arrow(path)
    _column(path, table.column_names, field)
    column = table.column(field)
    for start in range(0, len(column), BATCH):
        yield [t for t in column.slice(start, BATCH).to_pylist() if t is not None]


def documents(path: Path, field: str = "text", on_bad_record: str = "error",
              bad: list[int] | None = None) -> Iterator[list[str]]:
    """Batches of documents from one file; `bad[0]` counts skipped records."""
    bad = bad if bad is not None else [0]
    if path.suffix in (".jsonl", ".json"):
        return _jsonl(path, field, on_bad_record, bad)
    if path.suffix == ".parquet":
        return _parquet(path, field)
    if path.suffix == ".arrow":
        return _arrow(path, field)
    return _text(path)
