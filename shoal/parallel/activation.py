"""Activation checkpointing: keep fewer activations in forward and recompute them in
backward (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016).

"full" recomputes each block entirely from its input; "selective" keeps the outputs of
the matrix multiplies and attention (expensive to redo, as in Korthikanti et al., 2022)
and recomputes the cheap element-wise ops between them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from shoal.parallel.blocks import model_blocks

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str, shard_modules: list[str]) -> nn.Module:
    """Checkpoint every block of `model` in place (the blocks `shard_modules` names, else the
    model's own), by `mode`: "none", "selective" or "full". No mesh: recomputation is local."""
    if mode == "none":
        return model
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
                  if mode == "selective" else None)
    for block in model_blocks(model, shard_modules):
        # Replacing the instance's forward, not wrapping the module, keeps parameter names
        # unchanged, so checkpoints stay loadable with checkpointing on or off.
        block.forward = functools.partial(_checkpointed, block.forward, context_fn)
    return model


def _checkpointed(forward, context_fn, *args, **kwargs):
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
