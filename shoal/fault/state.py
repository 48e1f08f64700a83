"""The training state a joiner receives from a live peer (shoal/fault/elastic.py): parameters,
optimizer state, step, data position and RNG, packed as one byte buffer whose layout every
replica of the same model and optimizer agrees on. Nothing is pickled."""

from __future__ import annotations

import torch

from shoal.sync.replica_state import local_tensor


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


def _state_parts(trainer) -> list[torch.Tensor]:
    sampler = trainer.sampler.state_dict()
    meta = torch.tensor([trainer.step, sampler["epoch"], sampler["position"]], dtype=torch.int64)
    # An outer sync (DiLoCo, shoal/fault/outer.py) adds its outer parameters and momentum.
    outer = trainer.outer_sync.state_tensors() if hasattr(trainer.outer_sync, "state_tensors") else []
    return state_tensors(trainer.model, trainer.optimizer) + outer + [meta, torch.get_rng_state()]


def pack_state(trainer) -> torch.Tensor:
    """A trainer's whole state (parameters, optimizer state, step, data position, RNG) as one
    byte buffer; the layout is the same on every replica of the same model and optimizer."""
    materialize_optimizer_state(trainer.optimizer)
    return torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in _state_parts(trainer)])


def unpack_state(trainer, buffer: torch.Tensor) -> None:
    """Load a buffer made by `pack_state` on another replica into this trainer."""
    materialize_optimizer_state(trainer.optimizer)
    parts = _state_parts(trainer)
    offset = 0
    for t in parts[:-1]:  # tensors, then meta; the RNG state is set rather than copied into
        n = t.numel() * t.element_size()
        t.copy_(buffer[offset:offset + n].clone().view(t.dtype).view_as(t))  # clone: aligned for any dtype
        offset += n
    step, epoch, position = (int(v) for v in parts[-2])
    trainer.step = step
    trainer.sampler.load_state_dict({"epoch": epoch, "position": position})
    torch.set_rng_state(buffer[offset:].clone())
    if hasattr(trainer.outer_sync, "state_received"):
        trainer.outer_sync.state_received()
