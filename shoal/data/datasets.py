"""In-memory datasets indexed by sample id, so a batch is one vectorised gather.

A sample's id is its index; the sampler hands out ids, which is what makes data order part
of a checkpoint and lets the fault-tolerance layer check that no sample is lost or repeated.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from shoal.data.spec import DataSpec

VOCAB_SIZE = 256  # byte-level characters: every text file tokenises, no vocabulary to ship


class TokenWindows:
    """Non-overlapping windows of `seq_len + 1` tokens; sample i starts at token i * seq_len."""

    every_target_counts = True
    """No window is padded: every target is a token (the Trainer needs no all-reduce to count them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.offsets = torch.arange(seq_len + 1)

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[ids[:, None] * self.seq_len + self.offsets].long()
        return window[:, :-1], window[:, 1:]


class Arrays:
    """Rows of a feature matrix with their targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"data: x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[ids], self.y[ids]


class Subset:
    """A contiguous range of another dataset's samples (for the held-out split)."""

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, start, stop
        self.tokens_per_sample = getattr(base, "tokens_per_sample", 1)

    def __len__(self) -> int:
        return self.stop - self.start

    def get(self, ids: torch.Tensor):
        return self.base.get(ids + self.start)


def cache_dir(configured: str = "") -> Path:
    path = Path(configured or os.environ.get("SHOAL_CACHE", "") or Path.home() / ".cache" / "shoal")
    path.mkdir(parents=True, exist_ok=True)
    return path


def stdlib_corpus(max_bytes: int, cache: Path) -> torch.Tensor:
    """Bytes of the Python standard library's own .py sources: text every Python ships.

    Files are read in sorted order so every machine with the same Python builds the same
    corpus; the result is cached as .npy keyed by the Python version and the size cap.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{sys.version}|{root}|{max_bytes}".encode()).hexdigest()[:12]
    target = cache / f"stdlib-{key}.npy"
    if not target.exists():
        chunks = [path.read_bytes() for path in stdlib_files(max_bytes)]
        array = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
        tmp = target.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, target)  # concurrent workers may race; the rename is atomic
    return torch.from_numpy(np.load(target))


def file_hash(path: Path, root: Path) -> float:
    """A number in [0, 1) from a hash of the file's path under `root`: the same on every machine."""
    digest = hashlib.sha1(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2 ** 32


def held_out_files(files: list[Path], root: Path, fraction: float) -> set[Path]:
    """The whole files that go to the validation split, about `fraction` of the bytes: files
    taken in the order of their path hash (spread over the corpus, not its tail, one corner
    of the library that reads easier or harder than the rest; the same on every machine),
    each one that still fits the budget. When none fits, the smallest file; a corpus of one
    file holds out none."""
    if fraction <= 0 or len(files) < 2:
        return set()
    sizes = {path: path.stat().st_size for path in files}
    budget, held, chosen = fraction * sum(sizes.values()), 0, set()
    for path in sorted(files, key=lambda f: file_hash(f, root)):
        if held + sizes[path] <= budget:
            chosen.add(path)
            held += sizes[path]
    return chosen or {min(files, key=sizes.get)}


def stdlib_split(max_bytes: int, cache: Path, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, validation bytes) of the stdlib corpus: whole files held out by
    `held_out_files`. Cached as .npy like `stdlib_corpus`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{sys.version}|{root}|{max_bytes}|{val_fraction}|files".encode()).hexdigest()[:12]
    targets = [cache / f"stdlib-{key}-{part}.npy" for part in ("train", "val")]
    if not all(t.exists() for t in targets):
        files = stdlib_files(max_bytes)
        held = held_out_files(files, root, val_fraction)
        parts: tuple[list[bytes], list[bytes]] = ([], [])
        for path in files:
            parts[path in held].append(path.read_bytes())
        for target, chunks in zip(targets, parts):
            array = np.frombuffer(b"".join(chunks), dtype=np.uint8)
            tmp = target.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, target)  # concurrent workers may race; the rename is atomic
    train, val = (torch.from_numpy(np.load(t)) for t in targets)
    return train, val


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files in sorted order, up to the first that reaches `max_bytes` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    return files


def text_files(path: str) -> torch.Tensor:
    root = Path(path)
    files = sorted(root.rglob("*.txt")) if root.is_dir() else [root]
    if not files:
        raise ValueError(f"data.path: no .txt files under {root}")
    return torch.from_numpy(np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8).copy())


def npy_arrays(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "," in path:
        x_path, y_path = (Path(p) for p in path.split(",", 1))
    else:
        x_path, y_path = Path(path) / "x.npy", Path(path) / "y.npy"
    arrays = []
    for p in (x_path, y_path):
        if not p.is_file():
            raise ValueError(f"data.path: {p} not found")
        try:
            arrays.append(np.load(p, allow_pickle=False))
        except ValueError as err:
            raise ValueError(f"data.path: {p} is not a plain .npy array ({err})") from None
    x, y = arrays
    if x.ndim != 2:
        raise ValueError(f"data.path: {x_path} must be 2-D (samples, features), got shape {x.shape}")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def synthetic_classes(num_samples: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features labelled by a fixed random linear rule: a known ground truth to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def spec_for_arrays(x: torch.Tensor, y: torch.Tensor) -> DataSpec:
    if y.dtype.is_floating_point:
        return DataSpec(kind="regression", in_features=x.shape[1], num_classes=1 if y.ndim == 1 else y.shape[1])
    return DataSpec(kind="classes", in_features=x.shape[1], num_classes=int(y.max()) + 1)
