"""The training side as per-step fault tolerance sees it: an adapter over the run's parts.

Fault tolerance needs more of the training loop than the loop needs of it: the step counter,
this rank's share of the batch, the sampler's position, every tensor a joiner must receive, and
checkpoints saved or loaded at moments only membership knows. The Trainer implements none of it
and knows only its gradient agreement (shoal/fault/elastic.py's `Replicas`). `worker.build` makes
`TrainerHost` (shoal/fault/state.py's `TrainingHost`) from the parts the Trainer trains: the
model's parts, the optimizer and the sampler, read and changed through their own methods, as
torchft's Manager is given `state_dict` / `load_state_dict` callables. An outer sync over the
replicas (ElasticDiLoCo, shoal/fault/outer.py) adds its state when it is entered (`follow_outer_sync`).

Three things belong to the Trainer alone, and the adapter changes them only through the Trainer's
methods (`RunProgress`), never by writing its attributes: the step counter (`continue_at`, after a
joiner took a peer's state), this rank's data-parallel place (`place`, after a regroup inside an
outer sync) and the checkpoint, whose contents beside the parts (`trainer_state`) are the Trainer's.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Protocol

import torch
from torch import nn

from shoal.data import ShardedSampler
from shoal.fault.state import materialize_optimizer_state, state_tensors
from shoal.runtime.checkpoint import PREFIX, Checkpointer


class RunProgress(Protocol):
    """What the Trainer owns and changes through its own methods (shoal/train.py)."""

    @property
    def step(self) -> int:
        """Optimizer steps taken."""

    def continue_at(self, step: int) -> None:
        """Count steps from `step` on (a state received from a peer holds its step)."""

    def place(self, dp_rank: int, dp_size: int) -> None:
        """This rank's share of the global batch from now on."""

    def write_checkpoint(self, *, asynchronous: bool | None = None) -> None:
        """Save the current step from this process."""

    def resume(self, path: Path) -> None:
        """Load the checkpoint at `path`."""


class OuterState(Protocol):
    """An outer sync whose state travels to a joiner with the inner state (ElasticDiLoCo)."""

    def state_tensors(self) -> list[torch.Tensor]: ...

    def state_received(self) -> None: ...


class TrainerHost:
    """`TrainingHost` over the parts of one run: what a replica asks of the run it belongs to."""

    def __init__(self, *, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer, sampler: ShardedSampler,
                 grad_accum: int, checkpointer: Checkpointer | None, run: RunProgress):
        self.model_parts, self.optimizer, self.sampler = model_parts, optimizer, sampler
        self.grad_accum = grad_accum  # micro-batches per step: a step's global batch is this many of the sampler's
        self.checkpointer, self.run = checkpointer, run
        self.outer: OuterState | None = None  # the entered outer sync whose state travels too

    def follow_outer_sync(self, outer: OuterState | None) -> None:
        """From now on `outer`'s state travels with the inner state (None: it no longer does)."""
        self.outer = outer

    @property
    def step(self) -> int:
        return self.run.step

    def set_step(self, step: int) -> None:
        self.run.continue_at(step)

    def place(self, dp_rank: int, dp_size: int) -> None:
        self.run.place(dp_rank, dp_size)

    def parameters(self) -> Iterable[torch.Tensor]:
        return itertools.chain.from_iterable(part.parameters() for part in self.model_parts)

    def data_position(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def set_data_position(self, position: dict[str, int]) -> None:
        self.sampler.load_state_dict(position)

    def global_batch_ids(self, position: dict[str, int]) -> torch.Tensor:
        sampler = self.sampler
        replay = ShardedSampler(sampler.num_samples, sampler.global_batch, sampler.seed)
        replay.load_state_dict(position)
        return torch.cat([replay.next_batch(0, 1) for _ in range(self.grad_accum)])

    def state_tensors(self) -> list[torch.Tensor]:
        materialize_optimizer_state(self.optimizer)
        outer = self.outer.state_tensors() if self.outer is not None else []
        return state_tensors(self, self.optimizer) + outer  # self: its parameters() are the model parts'

    def state_received(self) -> None:
        if self.outer is not None:
            self.outer.state_received()

    def save_checkpoint(self, *, background: bool = False) -> None:
        """Save the current step whatever this rank (the caller decided that it saves); `background`:
        asynchronously, whatever checkpoint.async_save says (the only holder of the state saves so)."""
        if self.checkpointer is not None:
            self.run.write_checkpoint(asynchronous=True if background else None)

    def finish_saves(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def load_checkpoint(self, step: int) -> None:
        self.run.resume(self.checkpointer.folder / f"{PREFIX}{step:08d}")
