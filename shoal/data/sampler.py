"""A distributed, resumable sampler over sample ids.

Each step takes the next `global_batch` ids of this epoch's permutation and splits them
among the current data-parallel ranks, so ranks see disjoint shards, the data order is
the same for any number of ranks, and the whole position is two integers (epoch, position)
that go into every checkpoint.
"""

from __future__ import annotations

import torch


class ShardedSampler:
    def __init__(self, num_samples: int, global_batch: int, seed: int, *, shuffle: bool = True):
        if global_batch > num_samples:
            raise ValueError(f"train.batch_size = {global_batch} exceeds the {num_samples} training samples")
        self.num_samples, self.global_batch, self.seed, self.shuffle = num_samples, global_batch, seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def permutation(self) -> torch.Tensor:
        if self._perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
        return self._perm

    def next_batch(self, rank: int, world: int) -> torch.Tensor:
        """The ids this rank trains on next; every rank must call it once per micro-batch.

        A batch that does not divide by `world` is split as evenly as it goes (the first
        ranks get one more), as fault-tolerant replicas need when their number changes;
        they weight gradients by sample count, so the step still equals one process's."""
        if self.position + self.global_batch > self.num_samples:  # drop the ragged tail, start a new epoch
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        batch = self.permutation()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        return torch.tensor_split(batch, world)[rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
