"""Token shards: flat uint16/uint32 files plus index.json, read as memory-mapped windows.

`shoal data prepare` (prepare.py) writes them; `data.source = "shards"` trains on them.
A sample is a window of `seq_len + 1` tokens of the shards taken as one stream (sample i
starts at token i * seq_len), read with one `pread` per window from the shard files, so a
worker's resident memory holds one batch, not the data set. (A memory map would do the
same reads, but the kernel maps up to 16 neighbouring cached pages into the process on
every fault, so its resident size grows with the pages ever touched: measured, 200 MB of
shards read at random gave +190 MB of resident memory through np.memmap, +0 through pread.) Before training, every shard is checked
against the index: present, of the right size, and (once per file version, cached) of the
recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from shoal.config import ConfigError
from shoal.data.spec import DataSpec

INDEX = "index.json"
FORMAT = "shoal-shards/1"
MAX_OPEN = 128
"""Shard files a reader keeps open at once."""


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise ConfigError(f"data.path: {path} not found (make shards with `shoal data prepare SRC --out {folder}`)")
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if index.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {index.get('format')!r} is not {FORMAT!r}")
    return index


def check_files(folder: Path, index: dict) -> None:
    """Every shard is present and exactly as long as the index says (a cheap check on every start)."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        path = Path(folder) / shard["file"]
        if not path.is_file():
            raise ConfigError(f"shard {path} is missing (listed in {Path(folder) / INDEX})")
        size, expected = path.stat().st_size, shard["tokens"] * itemsize
        if size != expected:
            raise ConfigError(f"shard {path} is truncated or overwritten: {size} bytes, the index says {expected}")


def verify_checksums(folder: Path, index: dict, cache: Path | None) -> None:
    """Each shard's sha256 against the index; a verified (path, size, mtime) is remembered in `cache`."""
    stamp_file = cache / "verified-shards.json" if cache else None
    try:
        verified = json.loads(stamp_file.read_text()) if stamp_file and stamp_file.is_file() else {}
    except ValueError:
        verified = {}
    changed = False
    for shard in index["shards"]:
        path = (Path(folder) / shard["file"]).resolve()
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if verified.get(key) == shard["sha256"]:
            continue
        if sha256_file(path) != shard["sha256"]:
            raise ConfigError(f"shard {path}: checksum does not match {Path(folder) / INDEX} (the file changed "
                              f"after `shoal data prepare`; prepare it again)")
        verified[key], changed = shard["sha256"], True
    if changed and stamp_file:
        tmp = stamp_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verified))
        os.replace(tmp, stamp_file)


def fingerprint(index: dict) -> str:
    """Names a shard set: its tokenizer, dtype and every shard's checksum, in order."""
    digest = hashlib.sha256(json.dumps([index["dtype"], index["tokenizer"]], sort_keys=True).encode())
    for shard in index["shards"]:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()[:16]


class TokenShards:
    """Windows of `seq_len + 1` tokens over memory-mapped shards taken as one stream."""

    every_target_counts = True
    """A stream of token ids has no padding: every target counts (the Trainer needs no all-reduce to count them)."""

    def __init__(self, folder: str | Path, seq_len: int, cache: Path | None = None):
        self.folder, self.seq_len = Path(folder), seq_len
        self.index = read_index(self.folder)
        check_files(self.folder, self.index)
        verify_checksums(self.folder, self.index, cache)
        self.dtype = np.dtype(self.index["dtype"])
        counts = np.array([s["tokens"] for s in self.index["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # first token of each shard in the stream
        self.total = int(self.starts[-1])
        self._files: dict[int, int] = {}  # shard -> open file descriptor
        self.vocab_size = int(self.index["vocab_size"])

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    def spec(self) -> DataSpec:
        return DataSpec(kind="tokens", vocab_size=self.vocab_size, seq_len=self.seq_len)

    def __len__(self) -> int:
        return max(0, (self.total - 1) // self.seq_len)

    def __getstate__(self):  # a loader worker opens its own files
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def shard(self, k: int) -> int:
        if k not in self._files:
            if len(self._files) >= MAX_OPEN:  # keep well under the process's file limit
                os.close(self._files.pop(next(iter(self._files))))
            self._files[k] = os.open(self.folder / self.index["shards"][k]["file"], os.O_RDONLY)
        return self._files[k]

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream (a window may span two shards)."""
        out, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        size = self.dtype.itemsize
        while count > 0:
            offset = start - int(self.starts[k])
            n = min(count, int(self.starts[k + 1]) - start)
            piece = np.frombuffer(os.pread(self.shard(k), n * size, offset * size), dtype=self.dtype)
            out.append(piece)
            start, count, k = start + len(piece), count - len(piece), k + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = np.stack([self.read(int(i) * self.seq_len, self.seq_len + 1) for i in ids.tolist()])
        window = torch.from_numpy(window.astype(np.int64))
        return window[:, :-1], window[:, 1:]
