"""The learner's replay buffer: the most recent positions of self-play, sampled uniformly for
training (AlphaGo Zero kept the last 500,000 games; AlphaZero the recent ones likewise).

Positions live in preallocated tensors used as a ring: once `capacity` positions are held, each
new one replaces the oldest. Sampling draws indices from the caller's torch.Generator, so a run
that restores the buffer (`state_dict`) and the generator samples the same batches bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch

FIELDS = ("planes", "policy_targets", "value_targets")


class ReplayBuffer:
    """`capacity` positions at most; add(records) appends whole games' positions, oldest out first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity = {capacity}; it must be >= 1")
        self.capacity = capacity
        self.storage: dict[str, torch.Tensor] = {}  # allocated at the first add, when the shapes are known
        self.versions = torch.zeros(capacity, dtype=torch.int64)  # the weight version that played each position
        self.cursor = 0  # the slot the next position goes to
        self.size = 0
        self.games_added = 0
        self.positions_added = 0

    def __len__(self) -> int:
        return self.size

    def _allocate(self, record) -> None:
        for name in FIELDS:
            value = getattr(record, name)
            self.storage[name] = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype)

    def add(self, records: Sequence) -> None:
        """Append every position of `records` (GameRecord-like: planes, policy_targets, value_targets,
        weight_version), in order."""
        for record in records:
            if not self.storage:
                self._allocate(record)
            rows = int(record.planes.shape[0])
            # a game longer than the whole buffer keeps only its last `capacity` positions
            skip = max(0, rows - self.capacity)
            slots = (self.cursor + torch.arange(rows - skip)) % self.capacity
            for name in FIELDS:
                self.storage[name][slots] = getattr(record, name)[skip:].to(self.storage[name].dtype)
            self.versions[slots] = int(record.weight_version)
            self.cursor = int((self.cursor + rows - skip) % self.capacity)
            self.size = min(self.capacity, self.size + rows - skip)
            self.games_added += 1
            self.positions_added += rows

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(planes, policy_targets, value_targets) of `batch_size` positions drawn uniformly with
        replacement by `generator`."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty; add games first")
        index = torch.randint(self.size, (batch_size,), generator=generator)
        return tuple(self.storage[name][index] for name in FIELDS)  # type: ignore[return-value]

    def state_dict(self) -> dict:
        """Everything, tensors and ints only (safe for torch.load(weights_only=True))."""
        held = {f"storage.{name}": tensor[:self.size].clone() for name, tensor in self.storage.items()}
        return {"capacity": self.capacity, "cursor": self.cursor, "size": self.size, "games_added": self.games_added,
                "positions_added": self.positions_added, "versions": self.versions[:self.size].clone(), **held}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"ReplayBuffer.load_state_dict: saved capacity {state['capacity']} != this buffer's "
                             f"{self.capacity} (selfplay.replay_size changed since the checkpoint)")
        self.cursor, self.size = int(state["cursor"]), int(state["size"])
        self.games_added, self.positions_added = int(state["games_added"]), int(state["positions_added"])
        self.versions = torch.zeros(self.capacity, dtype=torch.int64)
        self.versions[:self.size] = state["versions"]
        self.storage = {}
        for key, held in state.items():
            if key.startswith("storage."):
                full = torch.zeros((self.capacity, *held.shape[1:]), dtype=held.dtype)
                full[:self.size] = held
                self.storage[key[len("storage."):]] = full
