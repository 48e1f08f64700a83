"""Pipeline parallelism (`torch.distributed.pipelining`): the layers of the gpt (or of a
Hugging Face decoder, shoal/parallel/hf_pipeline.py) split into
stages, one (or, interleaved, several) per rank of the "pp" axis, with micro-batches
flowing through them on a schedule.

Schedules: GPipe (Huang et al., 2019: all forwards, then all backwards), 1F1B
(Narayanan et al., "PipeDream", 2019: one forward, one backward, so at most pp
micro-batches are in flight) and interleaved 1F1B (Narayanan et al., "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", 2021: several
smaller stages per rank, a smaller bubble for more messages).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import _PipelineSchedule

from shoal.parallel.stages import STAGES_PER_RANK, stage_ids, stage_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def apply_pp(model: nn.Module, mesh: DeviceMesh, schedule: str) -> list[nn.Module]:
    """The stages of `model` this rank of the 1-D "pp" `mesh` holds under `schedule` (a key of
    SCHEDULES), as pruned copies that keep the full model's parameter names (so checkpoints load
    under any pipeline degree)."""
    n_stages = mesh.size() * STAGES_PER_RANK[schedule]
    from shoal.models.hf import is_hf
    if is_hf(model):
        from shoal.parallel.hf_pipeline import hf_num_layers, split_hf
        ranges = stage_layers(hf_num_layers(model), n_stages)
        return split_hf(model, ranges, stage_ids(mesh.get_local_rank(), mesh.size(), schedule))
    if not isinstance(getattr(model, "layers", None), nn.ModuleDict):
        from shoal.config import ConfigError
        raise ConfigError(f"parallel.pp = {mesh.size()}: pipeline stages split the layers of shoal's gpt or of a "
                          f"Hugging Face decoder; {type(model).__name__} is neither (use parallel.pp = 1)")
    names = list(model.layers.keys())
    ranges = stage_layers(len(names), n_stages)
    # A parameter-free skeleton of the model is copied per stage and given the submodules
    # it owns; the submodules are moved, not copied, so no weight exists twice.
    owned = {name: getattr(model, name) for name in ("tok_embeddings", "pos_embeddings", "layers", "norm", "output")}
    for name in owned:
        setattr(model, name, None)
    skeleton = copy.deepcopy(model)
    for name, module in owned.items():
        setattr(model, name, module)
    parts = []
    for sid in stage_ids(mesh.get_local_rank(), mesh.size(), schedule):
        part = copy.deepcopy(skeleton)
        part.layers = nn.ModuleDict({names[i]: owned["layers"][names[i]] for i in ranges[sid]})
        if sid == 0:
            part.tok_embeddings, part.pos_embeddings = owned["tok_embeddings"], owned["pos_embeddings"]
        if sid == n_stages - 1:
            part.norm, part.output = owned["norm"], owned["output"]
        parts.append(part)
    return parts


def build_schedule(parts: list[nn.Module], mesh: DeviceMesh, schedule: str, microbatches: int,
                   device: torch.device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> _PipelineSchedule:
    """The `schedule` that runs `parts` (after TP, AC, compile and FSDP were applied to them) on
    `microbatches` micro-batches per step."""
    n_stages = mesh.size() * STAGES_PER_RANK[schedule]
    ids = stage_ids(mesh.get_local_rank(), mesh.size(), schedule)
    stages = [PipelineStage(part, sid, n_stages, device, group=mesh.get_group()) for part, sid in zip(parts, ids)]
    cls = SCHEDULES[schedule]
    # scale_grads (default) divides by the micro-batch count: the loss is a mean over the batch
    if STAGES_PER_RANK[schedule] > 1:
        return cls(stages, microbatches, loss_fn=loss_fn)
    return cls(stages[0], microbatches, loss_fn=loss_fn)
