"""The training side as per-step fault tolerance sees it: an adapter over a Trainer's public face.

Fault tolerance needs more of the training loop than the loop needs of it: the step counter,
this rank's share of the batch, the sampler's position, every tensor a joiner must receive, and
checkpoints saved or loaded at moments only membership knows. The Trainer implements none of it;
`worker.build` wraps it in `TrainerHost` (shoal/fault/state.py's `TrainingHost`) and hands that to
the replicas, as torchft's Manager is given `state_dict` / `load_state_dict` callables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from shoal.data import ShardedSampler
from shoal.fault.state import materialize_optimizer_state, state_tensors
from shoal.runtime.checkpoint import PREFIX, Checkpointer


class Trained(Protocol):
    """The members of the Trainer (shoal/train.py, listed in its docstring) that the adapter uses."""

    cfg: Any
    step: int
    where: Any  # Placement: dp_rank, dp_size
    model: Any  # ParallelModel
    optimizer: torch.optim.Optimizer
    sampler: ShardedSampler
    checkpointer: Checkpointer | None
    outer_sync: Any

    def write_checkpoint(self, *, asynchronous: bool | None = None) -> None: ...

    def resume(self, path: Path) -> None: ...


class TrainerHost:
    """`TrainingHost` over a Trainer: what a replica asks of the run it belongs to."""

    def __init__(self, trainer: Trained):
        self.trainer = trainer

    @property
    def step(self) -> int:
        return self.trainer.step

    def set_step(self, step: int) -> None:
        self.trainer.step = step

    def place(self, dp_rank: int, dp_size: int) -> None:
        self.trainer.where.dp_rank, self.trainer.where.dp_size = dp_rank, dp_size

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.trainer.model.parameters()

    def data_position(self) -> dict[str, int]:
        return self.trainer.sampler.state_dict()

    def set_data_position(self, position: dict[str, int]) -> None:
        self.trainer.sampler.load_state_dict(position)

    def global_batch_ids(self, position: dict[str, int]) -> torch.Tensor:
        sampler = self.trainer.sampler
        replay = ShardedSampler(sampler.num_samples, sampler.global_batch, sampler.seed)
        replay.load_state_dict(position)
        return torch.cat([replay.next_batch(0, 1) for _ in range(self.trainer.cfg.train.grad_accum)])

    def state_tensors(self) -> list[torch.Tensor]:
        trainer = self.trainer
        materialize_optimizer_state(trainer.optimizer)
        outer = trainer.outer_sync.state_tensors() if hasattr(trainer.outer_sync, "state_tensors") else []
        return state_tensors(trainer.model, trainer.optimizer) + outer

    def state_received(self) -> None:
        if hasattr(self.trainer.outer_sync, "state_received"):
            self.trainer.outer_sync.state_received()

    def save_checkpoint(self, *, background: bool = False) -> None:
        """Save the current step whatever this rank (the caller decided that it saves); `background`:
        asynchronously, whatever checkpoint.async_save says (the only holder of the state saves so)."""
        if self.trainer.checkpointer is not None:
            self.trainer.write_checkpoint(asynchronous=True if background else None)

    def finish_saves(self) -> None:
        if self.trainer.checkpointer is not None:
            self.trainer.checkpointer.wait()

    def load_checkpoint(self, step: int) -> None:
        self.trainer.resume(self.trainer.checkpointer.folder / f"{PREFIX}{step:08d}")
