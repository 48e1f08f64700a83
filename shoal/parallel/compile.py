"""torch.compile per block: each repeated block is compiled once and the graph reused for
its siblings, which keeps compile time flat in depth and leaves FSDP's per-block hooks
(applied afterwards) outside the compiled graphs."""

from __future__ import annotations

from torch import nn

from shoal.parallel.blocks import model_blocks


def apply_compile(model: nn.Module, shard_modules: list[str]) -> nn.Module:
    """Compile every block of `model` in place (the blocks `shard_modules` names, else the
    model's own). No mesh: each rank compiles its own modules."""
    for block in model_blocks(model, shard_modules):
        block.compile()  # in place: the parameter names do not gain an `_orig_mod.` prefix
    return model
