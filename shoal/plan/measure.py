"""Measure what `memory.estimate_memory` predicts, on a live rank: the bytes of the
parameters, gradients and optimizer state this rank stores (its shards only), and the
peak bytes of activations autograd keeps for backward."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if hasattr(t, "to_local") else t
    # a functional collective's result not yet waited on (TP's all-reduce of a row-split output,
    # saved by a norm right after it) is a wrapper without storage: its `elem` holds the data
    return getattr(t, "elem", t) if type(t).__name__ == "AsyncCollectiveTensor" else t


def state_bytes(parameters, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of this rank's parameter shards, gradient shards and optimizer state."""
    params = list(parameters)
    out = {"params": sum(_local(p).numel() * _local(p).element_size() for p in params),
           "grads": sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # step counters are scalars
                    out["optimizer"] += _local(value).numel() * _local(value).element_size()
    return out


class SavedActivations(contextlib.AbstractContextManager):
    """Count the activations autograd saves for backward while the context is open.

    Each saved tensor's storage is counted once; parameters (also saved, by the layers
    that use them) are not activations and are left out. `peak` is the most bytes held at
    once, taking a storage as freed when backward has unpacked it for the last time it was
    packed (exact for schedules that run all forwards before the backwards, an upper bound
    otherwise).
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, packs not yet unpacked]
        self.current = self.peak = 0

    def _param_storages(self) -> set[int]:
        ptrs = set()
        for module in self.modules:
            for p in module.parameters():
                ptrs.add(_local(p).untyped_storage().data_ptr())
        return ptrs

    def _pack(self, t: torch.Tensor):
        local = _local(t)
        storage = local.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or local.device.type == "meta":
            return t, None
        if ptr not in self.live:
            # FSDP swaps in freshly gathered parameters per block, so look at them now
            if ptr in self._param_storages():
                return t, None
            self.live[ptr] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[ptr][1] += 1
        return t, ptr

    def _unpack(self, packed):
        t, ptr = packed
        if ptr is not None and ptr in self.live:
            entry = self.live[ptr]
            entry[1] -= 1
            if entry[1] <= 0:
                self.current -= entry[0]
                del self.live[ptr]
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
