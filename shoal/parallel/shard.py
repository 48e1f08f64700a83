"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) and its
hybrid form (HSDP): parameters, gradients and optimizer state split over the data-parallel
ranks, gathered one block at a time for forward and backward.

ZeRO-3 in the terms of Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models" (2020). With a 2-D ("dp_replicate", "dp_shard") mesh FSDP
shards inside each replica group and all-reduces between groups (HSDP), so a replica
group can be dropped or added without touching the shards of the others.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from shoal.parallel.blocks import model_blocks


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype | None, cpu_offload: bool, shard_modules: list[str]) -> nn.Module:
    """Shard `model` over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP) in place.

    Each block (those `shard_modules` names, else the model's own) is its own FSDP unit, so
    only one block's full parameters exist at a time; the root is sharded last and holds what
    is left (embeddings, final norm, head). `param_dtype`/`reduce_dtype`: the dtypes of
    compute and of the gradient reduction (None: the parameters' own); `cpu_offload` keeps
    the shards and the optimizer step on the CPU.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # pin_memory=False: pinning needs an accelerator, and on CPU there is nothing to pin for
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = _untied(model, model_blocks(model, shard_modules))
    for i, block in enumerate(blocks):
        # the last block's parameters are needed first in backward: keeping them gathered
        # after forward saves one all-gather per step
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def _untied(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks whose parameters no module outside them shares: a tied weight (BERT's word
    embeddings, also its output layer) must live in one FSDP unit, so such a block stays in
    the root's unit."""
    count: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        count[id(param)] = count.get(id(param), 0) + 1
    kept = []
    for block in blocks:
        inside: dict[int, int] = {}
        for _, param in block.named_parameters(remove_duplicate=False):
            inside[id(param)] = inside.get(id(param), 0) + 1
        if all(count[key] == n for key, n in inside.items()):
            kept.append(block)
    return kept
