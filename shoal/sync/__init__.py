"""How data-parallel replicas agree, cheaply: the `[sync]` section's two faces for the Trainer.

- `comm_hook_for(cfg)`: a DDP comm hook that compresses each step's gradient
  all-reduce (fp16, bf16, int8, int4, powersgd); register it with
  `ddp.register_comm_hook(state, hook)`.
- `outer_sync_for(cfg, model, optimizer, group)`: a context manager that syncs
  every `inner_steps` steps instead (local_sgd, diloco); the model is then not
  DDP-wrapped across `group`.

See docs/sync.md.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.config import COMPRESSION_HOOKS, OUTER_SYNC_METHODS, ConfigError, SyncConfig

__all__ = ["COMM_HOOK_METHODS", "OUTER_SYNC_METHODS", "comm_hook_for", "outer_sync_for"]

COMM_HOOK_METHODS = ("allreduce", *COMPRESSION_HOOKS)


def comm_hook_for(cfg: SyncConfig, group: dist.ProcessGroup | None = None) -> tuple[Any, Any] | None:
    """The DDP comm hook and its state for `cfg.method`; None for allreduce and the outer-sync methods."""
    if cfg.method not in COMM_HOOK_METHODS:
        return None
    from shoal.sync.compress import hook_for
    return hook_for(cfg.method, group, powersgd_rank=cfg.powersgd_rank, powersgd_warmup=cfg.powersgd_warmup,
                    error_feedback=cfg.error_feedback)


def outer_sync_for(cfg: SyncConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                   group: dist.ProcessGroup | None) -> contextlib.AbstractContextManager:
    """The context manager that wraps the training loop: LocalSGD or DiLoCo, else a no-op."""
    if cfg.method not in OUTER_SYNC_METHODS:
        return contextlib.nullcontext()
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if size < 2:
        raise ConfigError(f"sync.method = '{cfg.method}' averages over the data-parallel replicas, but this "
                          f"layout has {size} replica: raise parallel.dp_replicate or use more workers")
    if cfg.method == "local_sgd":
        from shoal.sync.local_sgd import LocalSGD
        return LocalSGD(model, optimizer, group=group, inner_steps=cfg.inner_steps)
    from shoal.sync.diloco import DiLoCo
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    if cfg.fragments > n_tensors:
        raise ConfigError(f"sync.fragments = {cfg.fragments} exceeds the model's {n_tensors} parameter tensors")
    from shoal.sync.outer_settings import outer_options
    return DiLoCo(model, optimizer, group=group, fragments=cfg.fragments, overlap=cfg.overlap,
                  **outer_options(cfg, size))
