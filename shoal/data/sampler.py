"""A distributed, resumable sampler over sample ids.

Each step takes the next `global_batch` ids of this epoch's permutation and splits them
among the current data-parallel ranks, so ranks see disjoint shards, the data order is
the same for any number of ranks, and the whole position is two integers (epoch, position)
that go into every checkpoint.

Up to `EXPLICIT_LIMIT` samples the permutation is `torch.randperm`; above it, holding it
would cost 8 bytes per sample on every rank (3.2 GB for 400M windows of a 100B-token
corpus), so the permutation is computed id by id instead: a keyed Feistel network over
the next power of four, with cycle-walking back into [0, N) (Black & Rogaway, "Ciphers
with Arbitrary Finite Domains", 2002). Memory is then one batch, whatever N is.
"""

from __future__ import annotations

import numpy as np
import torch

EXPLICIT_LIMIT = 1 << 20
"""Largest sample count with an explicit permutation (8 MB of int64): above it, a table would show in a
worker's resident memory (measured: +25 MB at 2 GB of tokens with a table up to 8M samples)."""
ROUNDS = 4


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-mixing function of 64-bit words."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A bijection of [0, n) chosen by `key`, evaluated at any positions without a table."""

    def __init__(self, n: int, key: int):
        self.n = n
        self.half = max(1, (int(n - 1).bit_length() + 1) // 2)  # the domain is 4**half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        keys = _mix(np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))
        self.keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        x = self._encrypt(positions.numpy().astype(np.uint64))
        outside = x >= self.n
        while outside.any():  # cycle-walk: re-encrypt values that fell outside [0, n)
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return torch.from_numpy(x.astype(np.int64))


def place_in_sites(site: int, sites: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The (rank, world) that `ShardedSampler.next_batch` takes for data-parallel rank `dp_rank` of
    `dp_size` in site `site` of `sites` (docs/sites.md, "Which samples each site reads").

    The rule every site follows, whatever size the other sites are: the global batch splits into
    `sites` equal shares in site-name order, and a site's share evenly between its own `dp_size`
    ranks. With every micro-batch a multiple of `sites * dp_size` (check_batch_split refuses any
    other config), that share is slot `site * dp_size + dp_rank` of `sites * dp_size` equal slots:
    each site counts slots of its own size, and sites of different sizes still tile the batch once
    (site 0 with 2 ranks reads quarters 0 and 1, site 1 with 1 rank reads half 1)."""
    if not (0 <= site < sites and 0 <= dp_rank < dp_size):
        raise ValueError(f"no rank {dp_rank} of {dp_size} in site {site} of {sites}")
    return site * dp_size + dp_rank, sites * dp_size


class ShardedSampler:
    def __init__(self, num_samples: int, global_batch: int, seed: int, *, shuffle: bool = True):
        if global_batch > num_samples:
            raise ValueError(f"train.batch_size = {global_batch} exceeds the {num_samples} training samples")
        self.num_samples, self.global_batch, self.seed, self.shuffle = num_samples, global_batch, seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | FeistelPermutation | None = None

    def permutation(self) -> torch.Tensor | FeistelPermutation:
        if self._perm is None:
            key = self.seed * 1_000_003 + self.epoch
            if not self.shuffle:
                self._perm = torch.arange(self.num_samples)
            elif self.num_samples > EXPLICIT_LIMIT:
                self._perm = FeistelPermutation(self.num_samples, key)
            else:
                self._perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(key))
        return self._perm

    def next_batch(self, rank: int, world: int) -> torch.Tensor:
        """The ids this rank trains on next; every rank must call it once per micro-batch.

        A batch that does not divide by `world` is split as evenly as it goes (the first
        ranks get one more), as fault-tolerant replicas need when their number changes;
        they weight gradients by sample count, so the step still equals one process's."""
        if self.position + self.global_batch > self.num_samples:  # drop the ragged tail, start a new epoch
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        perm = self.permutation()
        if isinstance(perm, FeistelPermutation):
            batch = perm(torch.arange(self.position, self.position + self.global_batch))
        else:
            batch = perm[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        return torch.tensor_split(batch, world)[rank]

    def move(self, batches: int) -> None:
        """Move the position by `batches` global batches, forward or back (not before the first), to where
        that many more or fewer `next_batch` rounds of every rank would have left it: the batches read from
        there are those the run read there (the order depends on nothing but (epoch, position))."""
        per_epoch = self.num_samples // self.global_batch  # next_batch drops each epoch's ragged tail
        read = self.epoch * per_epoch + self.position // self.global_batch + batches
        if read < 0:
            raise ValueError(f"cannot move {-batches} batches back from batch {read - batches}")
        # After a whole epoch the position stays at its end until the next batch starts a new one.
        epoch, position = (0, 0) if read == 0 else ((read - 1) // per_epoch, ((read - 1) % per_epoch + 1)
                                                    * self.global_batch)
        if epoch != self.epoch:
            self._perm = None
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
