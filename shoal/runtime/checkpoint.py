"""Checkpoints with Distributed Checkpoint (DCP): atomic, optionally async, resharding, retained.

A checkpoint is written into a hidden `.tmp-step_N` folder and renamed to `step_N` only
after every rank has finished writing and `meta.json` is in place, so a crash mid-save
never leaves a folder that `latest_checkpoint` would pick. Model and optimizer state go
through DCP (so a checkpoint saved on one layout loads on another); each rank's small
trainer state (step, data position, RNG) goes into its own `trainer_rank{r}.pt`, read back
with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported where it is used: it pulls in DTensor, seconds of
# start-up that a worker should not pay before its first step.

PREFIX = "step_"


def _as_module(model_parts: list[nn.Module]) -> nn.Module:
    """One module holding every part's submodules under their own names.

    DCP's state-dict helpers take one module; an interleaved pipeline gives a rank several
    stages of one model whose parameter names do not overlap, so their module trees merge
    (children of the same name, such as `layers`, merge key by key). The parameters are
    the parts' own objects, so the optimizer's state maps onto them unchanged.
    """
    if len(model_parts) == 1:
        return model_parts[0]
    merged = nn.Module()
    for part in model_parts:
        _merge_into(merged, part)
    return merged


def _merge_into(target: nn.Module, source: nn.Module) -> None:
    for name, param in source.named_parameters(recurse=False):
        target.register_parameter(name, param)
    for name, buffer in source.named_buffers(recurse=False):
        target.register_buffer(name, buffer)
    for name, child in source.named_children():
        existing = getattr(target, name, None)
        if isinstance(existing, nn.Module):
            _merge_into(existing, child)
        else:
            holder = nn.Module()  # a fresh node, so merging never mutates a part's own tree
            _merge_into(holder, child)
            target.add_module(name, holder)


def _strided_alone(placements) -> bool:
    """A `_StridedShard` with no plain Shard of the same dimension after it: the rank holds
    several separate blocks of the tensor (the q, k and v columns of a fused projection,
    shoal/parallel/hf_tensor.py), which DCP, recording one block per rank, cannot save.
    (FSDP over TP also makes a _StridedShard, followed by TP's Shard: one block, DCP's own case.)"""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    return any(isinstance(p, _StridedShard) and not any(type(q) is Shard and q.dim == p.dim
                                                         for q in placements[i + 1:])
               for i, p in enumerate(placements))


def _as_stored(value):
    """`value` with every such tensor redistributed to plain Shard (the same values, one block per rank)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    if isinstance(value, dict):
        return {k: _as_stored(v) for k, v in value.items()}
    if isinstance(value, DTensor) and _strided_alone(value.placements):
        return value.redistribute(value.device_mesh, [Shard(p.dim) if isinstance(p, _StridedShard) else p
                                                      for p in value.placements])
    return value


def _as_held(stored, held):
    """The inverse of `_as_stored` after a load: each converted tensor back in `held`'s placements."""
    from torch.distributed.tensor import DTensor
    if isinstance(held, dict):
        return {k: _as_held(stored[k], v) for k, v in held.items()}
    if isinstance(held, DTensor) and _strided_alone(held.placements):
        return stored.redistribute(held.device_mesh, held.placements)
    return stored


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first."""
    found = []
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            if path.name.startswith(PREFIX) and (path / "meta.json").is_file():
                found.append((int(path.name[len(PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    steps = checkpoint_steps(folder)
    return steps[-1][1] if steps else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


class Checkpointer:
    """Saves and loads the checkpoints of one run; every rank makes the same calls."""

    def __init__(self, folder: Path, *, keep: int = 3, async_save: bool = False, meta: dict | None = None,
                 replicas_differ: bool = False):
        self.folder, self.keep, self.async_save = Path(folder), keep, async_save
        self.meta = meta or {}
        # DiLoCo / LocalSGD replicas hold different weights between syncs, and DCP writes one copy of
        # a tensor that several ranks hold: take it from the lowest rank, so the saved model is replica
        # 0's, not a mix of replicas (each rank's own weights go into its trainer state).
        self.replicas_differ = replicas_differ
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        # Background writes gather results on their own group so they never interleave with
        # the training collectives on the default one.
        self.group = dist.new_group(backend="gloo") if self.distributed and async_save else None
        self.pending: tuple[int, Any] | None = None
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _staging(self, step: int) -> Path:
        return self.folder / f".tmp-{PREFIX}{step:08d}"

    def save(self, step: int, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], *, asynchronous: bool | None = None) -> None:
        """Write the checkpoint of `step`; `asynchronous` overrides checkpoint.async_save for one
        save of a process that trains alone (a background save needs a group of its own otherwise)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        staging = self._staging(step)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(_as_module(model_parts), optimizer)
        torch.save(trainer_state, staging / f"trainer_rank{self.rank}.pt")
        state = _as_stored({"model": model_sd, "optim": optim_sd})
        planner = dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=self.replicas_differ)
        if self.async_save or (asynchronous and not self.distributed):
            self.pending = (step, dcp.async_save(state, checkpoint_id=staging, process_group=self.group,
                                                 planner=planner))
        else:
            dcp.save(state, checkpoint_id=staging, planner=planner)
            self._publish(step)

    def poll(self) -> None:
        """Publish a finished background save of a process that saves alone (with peers, every rank
        publishes at its next save or `wait`, in step with the others)."""
        if self.pending is not None and not self.distributed and self.pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Finish an async save in flight and publish it."""
        if self.pending is not None:
            step, future = self.pending
            self.pending = None
            future.result()
            self._publish(step)

    def _publish(self, step: int) -> None:
        self._barrier()  # every rank's files are on disk
        if self.rank == 0:
            staging = self._staging(step)
            meta = {**self.meta, "step": step, "world_size": dist.get_world_size() if self.distributed else 1,
                    "saved_at": time.time()}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            final = self.folder / f"{PREFIX}{step:08d}"
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)  # the moment the checkpoint becomes visible, atomically
            self._prune()
        self._barrier()

    def _prune(self) -> None:
        for path in self.folder.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)  # left by a crash mid-save
        if self.keep:
            for _, path in checkpoint_steps(self.folder)[:-self.keep]:
                shutil.rmtree(path, ignore_errors=True)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def load(self, path: Path, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load model and optimizer state (any layout) and return this rank's trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(_as_module(model_parts), optimizer)
        held = {"model": model_sd, "optim": optim_sd}
        stored = _as_stored(held)
        dcp.load(stored, checkpoint_id=path)
        state = _as_held(stored, held)
        set_state_dict(_as_module(model_parts), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = Path(path) / f"trainer_rank{self.rank}.pt"
        # After a change of world size a rank may have no file of its own: step and data
        # position are the same on every rank, so rank 0's serve.
        return torch.load(own if own.is_file() else Path(path) / "trainer_rank0.pt", weights_only=True)
