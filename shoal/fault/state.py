"""The training state a joiner receives from a live peer (shoal/fault/join.py): parameters,
optimizer state, step, data position and RNG, packed as one byte buffer whose layout every
replica of the same model and optimizer agrees on. Nothing is pickled.

`TrainingHost` is everything per-step fault tolerance may ask of the training loop; an adapter
the worker builds from the run's parts (shoal/fault/host.py) implements it.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from shoal.sync.replica_state import local_tensor


class TrainingHost(Protocol):
    step: int
    """Optimizer steps taken (read only here: `set_step` changes it)."""

    def set_step(self, step: int) -> None: ...

    def place(self, dp_rank: int, dp_size: int) -> None:
        """This rank's share of the global batch from now on."""

    def parameters(self) -> Iterable[torch.Tensor]: ...

    def data_position(self) -> dict[str, int]:
        """The sampler's position (epoch, position): where the next step's batch starts."""

    def set_data_position(self, position: dict[str, int]) -> None: ...

    def global_batch_ids(self, position: dict[str, int]) -> torch.Tensor:
        """Every sample id of the step that starts at `position` (all ranks' shares, all micro-batches)."""

    def state_tensors(self) -> list[torch.Tensor]:
        """Parameters, optimizer state (created if missing) and outer-sync state, in an order every
        replica agrees on; `unpack_state` copies into them."""

    def state_received(self) -> None:
        """After `state_tensors()` were overwritten with a peer's."""

    def follow_outer_sync(self, outer) -> None:
        """From now on `outer`'s state (ElasticDiLoCo's `state_tensors`) travels with the inner state;
        None: it no longer does."""

    def save_checkpoint(self, *, background: bool = False) -> None:
        """Save the current step, whatever this rank (the caller decided that it saves); `background`:
        asynchronously (the only holder of the state saves so, and trains on)."""

    def finish_saves(self) -> None:
        """Wait for a background save to be on disk."""

    def load_checkpoint(self, step: int) -> None:
        """Load the job's checkpoint of `step` (every holder of the state died)."""


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state without changing anything it means.

    A joiner has no state yet, but the state broadcast needs the same tensors on every rank.
    A step with zero gradients and lr = 0 creates them and leaves parameters unchanged; the
    new state is then zeroed so the next real step behaves as the first one would (for SGD
    momentum and Adam(W) with the default dampening, a zero buffer equals an absent one)."""
    missing = {id(p) for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state}
    if not missing:
        return
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    saved_grads = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr
    for p, grad in saved_grads.items():
        p.grad = grad
    for p in (p for group in optimizer.param_groups for p in group["params"] if id(p) in missing):
        for value in optimizer.state[p].values():
            if torch.is_tensor(value):  # fresh moments and counters (weight decay may have touched them)
                value.zero_()


def state_tensors(model, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Everything a replica's training depends on, in an order every replica agrees on."""
    params = list(model.parameters())
    tensors = [local_tensor(p.data) for p in params]
    for p in params:
        state = optimizer.state.get(p, {})
        tensors += [local_tensor(state[k]) for k in sorted(state) if torch.is_tensor(state[k])]
    return tensors


def _state_parts(host: TrainingHost) -> list[torch.Tensor]:
    position = host.data_position()
    meta = torch.tensor([host.step, position["epoch"], position["position"]], dtype=torch.int64)
    return host.state_tensors() + [meta, torch.get_rng_state()]


def pack_state(host: TrainingHost) -> torch.Tensor:
    """A replica's whole state (parameters, optimizer state, step, data position, RNG) as one
    byte buffer; the layout is the same on every replica of the same model and optimizer."""
    return torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in _state_parts(host)])


def unpack_state(host: TrainingHost, buffer: torch.Tensor) -> None:
    """Load a buffer made by `pack_state` on another replica into this one."""
    parts = _state_parts(host)
    offset = 0
    for t in parts[:-1]:  # tensors, then meta; the RNG state is set rather than copied into
        n = t.numel() * t.element_size()
        t.copy_(buffer[offset:offset + n].clone().view(t.dtype).view_as(t))  # clone: aligned for any dtype
        offset += n
    step, epoch, position = (int(v) for v in parts[-2])
    host.set_step(step)
    host.set_data_position({"epoch": epoch, "position": position})
    torch.set_rng_state(buffer[offset:].clone())
    host.state_received()
