"""What one training step asks of the hardware, counted on the meta device.

FLOPs come from torch's own `FlopCounterMode` (its per-operator formulas, per module), not
a hand-written table. Beside it a dispatch mode records what FLOPs leave out and what
decides step time on small models: how many operators run (each costs a fixed dispatch and
autograd overhead), the bytes each reads and writes (elementwise work is bound by memory
bandwidth), and the shapes of the matrix multiplies (their achieved rate depends on shape).
Nothing is allocated: the model and its inputs live on the meta device, so any size costs
the same few milliseconds to count.

torch's `torch.distributed._tools.RuntimeEstimator` does a similar per-operator roofline,
but both of its modes need CUDA (device properties, CUDA events); on a CPU host this module
is the estimator, and on a cluster the same counts meet the accelerator's published rates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

MATMUL_OPS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default")
# operators that only reinterpret metadata (no data moved, a fraction of a microsecond)
_FREE = {"aten.view.default", "aten.t.default", "aten.transpose.int", "aten.permute.default",
         "aten.expand.default", "aten._unsafe_view.default", "aten.unsqueeze.default", "aten.squeeze.dim",
         "aten.slice.Tensor", "aten.select.int", "aten.detach.default", "aten.alias.default",
         "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.as_strided.default",
         "aten.lift_fresh.default", "aten.empty.memory_format", "aten.empty_like.default"}


@dataclass
class OpCount:
    """The work of one piece of a step (a forward+backward, an optimizer step)."""

    flops: float = 0.0
    """Multiply-adds counted twice, from FlopCounterMode."""
    matmuls: dict[tuple[int, int, int], int] = field(default_factory=dict)
    """(m, k, n) of each distinct matrix multiply (a batched one flattened) -> how many ran."""
    ops: int = 0
    """Operators that do work (views and metadata-only operators left out)."""
    bytes: float = 0.0
    """Bytes read and written by the operators that are not matrix multiplies."""
    per_module: dict[str, float] = field(default_factory=dict)
    """FLOPs per module (FlopCounterMode's names: 'GPT.layers.0', ...)."""

    def scaled(self, factor: float) -> OpCount:
        """The same operators on `factor` times the data (a micro-batch of a batch, a 1/tp shard)."""
        return OpCount(self.flops * factor, {s: c for s, c in self.matmuls.items()}, self.ops, self.bytes * factor,
                       {k: v * factor for k, v in self.per_module.items()})


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _matmul_shape(name: str, args) -> tuple[int, int, int]:
    if name in ("aten.addmm.default", "aten.baddbmm.default"):
        args = args[1:]
    a, b = args[0], args[1]
    if a.dim() == 3:  # batched: b x (m, k) @ (k, n), counted as one (b*m, k, n) problem
        return a.shape[0] * a.shape[1], a.shape[2], b.shape[2]
    return a.shape[0], a.shape[1], b.shape[1]


class _OperatorLog(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in _FREE or getattr(func, "is_view", False):
            return out
        self.count.ops += 1
        if name in MATMUL_OPS:
            shape = _matmul_shape(name, args)
            self.count.matmuls[shape] = self.count.matmuls.get(shape, 0) + 1
        else:
            self.count.bytes += _nbytes(list(args)) + _nbytes(out)
        return out


def count_forward_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                           loss_fn=None) -> OpCount:
    """Count one forward, loss and backward of `model` (on the meta device) on `inputs`."""
    from shoal.models import compute_loss
    loss_fn = loss_fn or compute_loss
    count = OpCount()
    with FlopCounterMode(display=False) as flops, _OperatorLog(count):
        loss_fn(model(inputs), targets).backward()
    count.flops = float(flops.get_total_flops())
    count.per_module = {name: float(sum(ops.values())) for name, ops in flops.get_flop_counts().items()}
    for p in model.parameters():
        p.grad = None
    return count


def count_optimizer_step(parameters: list[nn.Parameter], optimizer: str, momentum: float = 0.0) -> OpCount:
    """Count one steady-state optimizer step (the second: the first also creates the state)."""
    params = [nn.Parameter(torch.empty_like(p, device="meta")) for p in parameters]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = (torch.optim.AdamW(params, foreach=False) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=0.1, momentum=momentum, foreach=False))
    opt.step()
    count = OpCount()
    with _OperatorLog(count):
        opt.step()
    return count


def layer_flops(count: OpCount) -> dict[str, float]:
    """FLOPs of each top-level child of the model and of each numbered block ('layers.0')."""
    out = {}
    for name, flops in count.per_module.items():
        parts = name.split(".")
        if len(parts) == 2 or (len(parts) == 3 and parts[2].isdigit()):
            out[".".join(parts[1:])] = flops
    return out
