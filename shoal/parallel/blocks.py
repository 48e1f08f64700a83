"""Which submodules of a model are its repeated "blocks": the unit that activation
checkpointing recomputes, torch.compile compiles and FSDP gathers one at a time."""

from __future__ import annotations

from torch import nn


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a gpt (stage), the Linear layers of an mlp; otherwise the
    top-level children that hold parameters (a dlrm's MLPs and each embedding table)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if isinstance(model, nn.Sequential):
        return [m for m in model if isinstance(m, nn.Linear)]
    blocks = []
    for child in model.children():
        # containers have no forward of their own: their members are the blocks (dlrm's tables)
        members = list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
        blocks += [m for m in members if any(True for _ in m.parameters())]
    return blocks
