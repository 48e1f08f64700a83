"""Loader workers that read ahead exactly in the sampler's order.

The Trainer asks `get(ids)` for the ids its `ShardedSampler` gave. A `Loader` follows
that sampler: from a copy of its position it computes the ids this rank will ask next and
has `torch.utils.data.DataLoader` worker processes read (decode, augment, tokenise) them
ahead, `prefetch` batches per worker, into pinned memory on GPU. Each prefetched batch
carries its ids; when the ids asked differ from the ones planned (the first step, a resume,
a retried step, a fault-tolerant membership change that moved this rank's share), the
batch is read in this process instead and the plan restarts from the sampler's new
position. So what a step trains on never depends on the prefetching: only its speed does.
A thread of this process receives the workers' batches ahead of the step (`_Receiver`).
"""

from __future__ import annotations

import inspect
import queue
import threading
from typing import Callable

import torch
from torch.utils.data import DataLoader

from shoal.data.factory import BadRecord
from shoal.data.sampler import ShardedSampler


def takes_epoch(dataset) -> bool:
    """Whether `dataset.get` takes the epoch (augmentation seeded per sample and epoch)."""
    return "epoch" in inspect.signature(dataset.get).parameters


def read(dataset, ids: torch.Tensor, epoch: int):
    return dataset.get(ids, epoch=epoch) if takes_epoch(dataset) else dataset.get(ids)


class _Plan:
    """The ids one rank will ask for, from a sampler position onwards (an endless iterable)."""

    def __init__(self):
        self.sampler: ShardedSampler | None = None
        self.rank, self.world = 0, 1

    def __iter__(self):
        s = self.sampler
        copy = ShardedSampler(s.num_samples, s.global_batch, s.seed, shuffle=s.shuffle)
        copy.load_state_dict(s.state_dict())
        rank, world = self.rank, self.world
        while True:
            ids = copy.next_batch(rank, world)
            yield copy.epoch, ids


BY_VALUE_BYTES = 1 << 20
"""Tensors smaller than this travel from a loader worker pickled by value. torch hands a tensor
over in shared memory, which costs a socket connection per tensor to pass its file
descriptor (0.7 ms each, measured here): more than copying a small batch, and for a batch of
ids, images and labels that made the handoff alone 2.5 ms."""


class _Value:
    """A small tensor on its way from a loader worker, as a numpy array pickled by value."""

    def __init__(self, array):
        self.array = array


def _pack(obj):
    if isinstance(obj, torch.Tensor) and obj.nbytes < BY_VALUE_BYTES:
        try:
            return _Value(obj.numpy())
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, float8), or a tensor needing grad
            return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_pack(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    return obj


def _unpack(obj):
    if isinstance(obj, _Value):
        return torch.from_numpy(obj.array)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unpack(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    return obj


class _ByIds(torch.utils.data.Dataset):
    """What a loader worker runs: (epoch, ids) -> (ids, inputs, targets)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        epoch, ids = key
        try:
            return _pack((ids, *read(self.dataset, ids, epoch)))
        except BadRecord as err:  # sent back as a value: raised here, DataLoader would wrap it in a traceback
            return _pack(ids), str(err), None


class _Receiver:
    """A thread taking the loader workers' batches off their queue ahead of the step.

    Receiving a batch (reading it from the pipe, unpickling it) costs the training thread
    about 1 ms for a small image batch here; done in this thread it overlaps the step's
    compute, which releases the GIL (torch's pin-memory thread does the same on GPU).
    `stop()` returns once the thread is gone, so the DataLoader iterator it read from may then
    be reset: the thread ends after the batch it is waiting for, which the workers are
    already reading."""

    def __init__(self, batches, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches,), name="shoal-loader-receive", daemon=True)
        self._thread.start()

    def _run(self, batches) -> None:
        while not self._stopped.is_set():
            try:
                item = ("batch", next(batches))
            except BaseException as err:  # a worker died: raised in the training thread at its next get
                item = ("error", err)
            while not self._stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def next(self):
        kind, item = self.queue.get()
        if kind == "error":
            raise item
        return item

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class Loader:
    """A dataset's `get(ids)`, read ahead by `workers` processes in the followed sampler's order."""

    def __init__(self, dataset, *, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        self.dataset, self.workers = dataset, workers
        self.tokens_per_sample = getattr(dataset, "tokens_per_sample", 1)
        self.every_target_counts = getattr(dataset, "every_target_counts", False)
        self.planned = self.unplanned = 0  # batches served from the plan, and read here instead
        self._plan = _Plan()
        self._sampler: ShardedSampler | None = None
        self._placement: Callable[[], tuple[int, int]] = lambda: (0, 1)
        self._loader = DataLoader(_ByIds(dataset), sampler=self._plan, batch_size=None, num_workers=workers,
                                  prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0,
                                  pin_memory=pin_memory) if workers else None
        self.prefetch = prefetch
        self._receiver: _Receiver | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def follow(self, sampler: ShardedSampler, placement: Callable[[], tuple[int, int]]) -> None:
        """Read ahead in `sampler`'s order for the rank `placement()` returns (dp rank, dp size)."""
        self._sampler, self._placement = sampler, placement

    def get(self, ids: torch.Tensor):
        epoch = self._sampler.epoch if self._sampler is not None else 0
        if self._loader is None or self._sampler is None:
            return read(self.dataset, ids, epoch)
        if self._receiver is not None:
            planned, *batch = _unpack(self._receiver.next())
            if torch.equal(planned, ids):
                self.planned += 1
                if isinstance(batch[0], str):
                    raise BadRecord(batch[0])
                return tuple(batch)
            self._receiver.stop()
        self.unplanned += 1
        batch = read(self.dataset, ids, epoch)
        # restart the plan after these ids (the sampler has already moved past them)
        self._plan.sampler = self._sampler
        self._plan.rank, self._plan.world = self._placement()
        self._receiver = _Receiver(iter(self._loader), self.prefetch)
        return batch

    def close(self) -> None:
        """Stop receiving (the workers end with the DataLoader)."""
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None


def wrap_for_training(dataset, cfg):
    """The training set as the Trainer gets it: behind a Loader when it reads ahead or augments per epoch."""
    if cfg.loader_workers == 0 and not takes_epoch(dataset):
        return dataset
    return Loader(dataset, workers=cfg.loader_workers, prefetch=cfg.prefetch, pin_memory=torch.cuda.is_available())
