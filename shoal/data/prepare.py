"""`shoal data prepare`: text, JSONL, Parquet or `datasets` folders -> token shards + index.json.

Sources are grouped into units of about one shard of input each, in a fixed order; a
process pool tokenises the units in parallel, each writing its own shards, so the result
does not depend on the number of workers. A finished unit is recorded in progress.jsonl,
and an interrupted run started again with the same arguments skips it (resume). The last
step writes index.json: dtype, tokenizer, and each shard's token count and sha256.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from shoal.config import ConfigError
from shoal.data.shards import FORMAT, INDEX, dtype_for
from shoal.data.sources import BATCH, TABLE_SUFFIXES, discover, documents
from shoal.data.tokenizer import encode_documents, load_tokenizer

PROGRESS = "progress.jsonl"
FLUSH_CHARS = 4 << 20
"""Characters of text gathered before one call to the tokenizer's batch encoder."""
SETTINGS = "prepare.json"


def parse_size(text: str) -> int:
    """'256MB', '1GB', '64KiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not match:
        raise ConfigError(f"--shard-size '{text}' must look like 256MB, 1GB or a number of bytes")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[(match.group(2) or "").rstrip("ib")[:1]]
    if "i" in (match.group(2) or ""):
        scale = {1e3: 1024, 1e6: 1 << 20, 1e9: 1 << 30, 1e12: 1 << 40}.get(scale, scale)
    return int(float(match.group(1)) * scale)


class ShardWriter:
    """Appends token arrays, cutting a new file every `shard_tokens`; sha256 computed as it writes."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int, dtype: str):
        self.out, self.prefix, self.shard_tokens, self.dtype = out, prefix, shard_tokens, np.dtype(dtype)
        self.shards: list[dict] = []
        self._file, self._count, self._digest = None, 0, None

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self._file = open(self.out / (self._name + ".tmp"), "wb")
        self._count, self._digest = 0, hashlib.sha256()

    def _close(self) -> None:
        self._file.close()
        os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._digest.hexdigest()})
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            piece = tokens[:self.shard_tokens - self._count]
            data = piece.tobytes()
            self._file.write(data)
            self._digest.update(data)
            self._count += len(piece)
            tokens = tokens[len(piece):]
            if self._count == self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards


def source_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_unit(number: int, files: list[str], out: str, tokenizer_spec: str, field: str, shard_tokens: int,
                 on_bad_record: str) -> dict:
    """Tokenise one unit of sources into shards `u<number>-<k>.bin`; returns its progress record."""
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = dtype_for(tokenizer.vocab_size)
    writer = ShardWriter(Path(out), f"u{number:05d}", shard_tokens, dtype)
    bad, docs = [0], 0
    pending: list[tuple[Path, str]] = []  # documents of several small files, encoded in one batch call
    tokens_of: dict[Path, int] = {}

    def flush() -> None:
        encoded = encode_documents(tokenizer, [text for _, text in pending])
        for (path, _), ids in zip(pending, encoded):
            tokens_of[path] = tokens_of.get(path, 0) + len(ids)
        flat = list(itertools.chain.from_iterable(encoded))
        if flat:
            writer.write(np.array(flat, dtype=dtype))
        pending.clear()

    for name in files:
        path = Path(name)
        tokens_of[path] = 0
        for batch in documents(path, field, on_bad_record, bad):
            docs += len(batch)
            pending += [(path, text) for text in batch]
            if len(pending) >= BATCH or sum(len(t) for _, t in pending) >= FLUSH_CHARS:
                flush()
    flush()
    empty = [str(path) for path, count in tokens_of.items() if count == 0]
    for path in empty:  # a table with nothing in `field` is a mistake; an empty text file is not
        if Path(path).suffix in TABLE_SUFFIXES:
            raise ConfigError(f"{path}: no documents, or '{field}' is empty in every record; nothing to tokenise")
    return {"unit": number, "sources": [source_key(Path(f)) for f in files], "documents": docs,
            "bad_records": bad[0], "empty_files": empty, "shards": writer.finish()}


def _one_thread_each() -> None:
    """The processes are the parallelism: a tokenizer thread pool in each would oversubscribe the cores
    (measured on 2 busy cores: 2.6x slower with the `tokenizers` pool on than off)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def plan_units(files: list[Path], unit_bytes: int) -> list[list[str]]:
    """Consecutive files grouped to about `unit_bytes` of input each (a large file is a unit alone)."""
    units: list[list[str]] = []
    size = unit_bytes
    for f in files:
        if size >= unit_bytes:
            units.append([])
            size = 0
        units[-1].append(str(f))
        size += f.stat().st_size
    return units


def _finished_units(out: Path, settings: dict, units: list[list[str]]) -> dict[int, dict]:
    """Units an earlier, interrupted run finished with the same settings and the same input files."""
    saved = out / SETTINGS
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise ConfigError(f"{out} holds shards prepared with other settings ({saved}); use a new --out")
    done: dict[int, dict] = {}
    if (out / PROGRESS).is_file():
        for line in (out / PROGRESS).read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed run may be cut short
                continue
            n = record["unit"]
            if n < len(units) and record["sources"] == [source_key(Path(f)) for f in units[n]] and all(
                    (out / s["file"]).is_file() for s in record["shards"]):
                done[n] = record
    return done


def prepare(sources: list[str], out: str | Path, *, tokenizer: str = "bytes", field: str = "text",
            shard_size: int = 256_000_000, workers: int = 1, on_bad_record: str = "error",
            progress: bool = True) -> dict:
    """Write token shards and index.json into `out`; returns the index."""
    out = Path(out)
    tok = load_tokenizer(tokenizer)  # a missing tokenizer is reported before any work
    files = discover(sources)
    shard_tokens = max(1, shard_size // np.dtype(dtype_for(tok.vocab_size)).itemsize)
    units = plan_units(files, shard_size)
    settings = {"tokenizer": tok.describe(), "field": field, "shard_tokens": shard_tokens,
                "sources": [str(f.resolve()) for f in files]}
    out.mkdir(parents=True, exist_ok=True)
    done = _finished_units(out, settings, units)
    (out / SETTINGS).write_text(json.dumps(settings, indent=1))
    todo = [n for n in range(len(units)) if n not in done]
    sizes = [sum(Path(f).stat().st_size for f in unit) for unit in units]
    bar = _progress_bar(progress, sum(sizes), sum(sizes[n] for n in done), len(done))
    args = (str(out), tokenizer, field, shard_tokens, on_bad_record)
    with open(out / PROGRESS, "a") as log, bar:
        def finished(record: dict) -> None:
            done[record["unit"]] = record
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.advance(sizes[record["unit"]])
        if workers <= 1:
            for n in todo:
                finished(prepare_unit(n, units[n], *args))
        else:
            # fork: the parent has read only file names; each worker loads its own tokenizer
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_one_thread_each) as pool:
                futures = [pool.submit(prepare_unit, n, units[n], *args) for n in todo]
                for future in as_completed(futures):
                    finished(future.result())
    records = [done[n] for n in range(len(units))]
    empty = [path for r in records for path in r.get("empty_files", [])]
    if len(empty) == len(files):
        raise ConfigError(f"{', '.join(sources)}: every file is empty; nothing to tokenise")
    return write_index(out, [s for r in records for s in r["shards"]], tok.describe(), field=field,
                       documents=sum(r["documents"] for r in records),
                       bad_records=sum(r["bad_records"] for r in records), empty_files=len(empty),
                       sources=[key for r in records for key in r["sources"]])


def write_index(out: Path, shards: list[dict], tokenizer: dict, **extra) -> dict:
    """index.json for `shards` (already in `out`), written atomically; returns it."""
    index = {"format": FORMAT, "dtype": dtype_for(tokenizer["vocab_size"]), "vocab_size": tokenizer["vocab_size"],
             "tokenizer": tokenizer, "total_tokens": sum(s["tokens"] for s in shards), **extra, "shards": shards}
    tmp = Path(out) / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, Path(out) / INDEX)
    return index


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


class _Bar(_Quiet):
    """A rich progress bar over the bytes of input tokenised."""

    def __init__(self, total: int, completed: int, resumed: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.progress = Progress(TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn())
        self.task = self.progress.add_task("prepare", total=total, completed=completed)
        if resumed:
            self.progress.console.print(f"resuming: {resumed} finished units kept")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)


def _progress_bar(show: bool, total: int, completed: int, resumed: int):
    return _Bar(total, completed, resumed) if show else _Quiet()
