"""DiLoCo's outer step chosen from the number of replicas and H, so `sync.method = "diloco"` alone works.

The DiLoCo paper's outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9; Douillard et al. 2023,
arXiv 2311.08105) was tuned for hundreds of outer steps of large models. Charles et al. 2025
("Scaling Laws for DiLoCo", arXiv 2503.09799) find the best outer lr grows with the number of
replicas and with H and does not depend on model size. At the budgets Shoal's benchmarks can
afford (tens of outer steps, per-replica batches of 8-16 sequences) momentum 0.9 overshoots:
it needs ~10 outer steps to build and then carries stale directions. The table below is the
outcome of benchmarks/diloco_sweep.py (docs/sync.md has the sweep); `tuned_outer_settings`
takes the nearest swept replica count and H (in log H). Swept at 137k parameters x 800 steps,
then checked at 1.3M x 3000 steps: at 2 replicas and H = 30 the entry was again the best row
(+2.7% against DDP; momentum 0.9 at outer lr 0.4-1.2: +5.6% to +26.8%).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("shoal")

__all__ = ["DEFAULT_COMPRESSION", "OuterSettings", "TUNED", "outer_options", "tuned_outer_settings"]


@dataclass(frozen=True)
class OuterSettings:
    """The outer Nesterov SGD's learning rate and momentum, and its linear lr warm-up (outer steps)."""

    lr: float
    momentum: float
    warmup: int = 0


# (replicas, H) -> the best outer step of the sweep (docs/sync.md, "Choosing the defaults").
TUNED: dict[tuple[int, int], OuterSettings] = {
    (2, 10): OuterSettings(0.5, 0.9),
    (2, 30): OuterSettings(1.0, 0.5, warmup=5),
    (2, 100): OuterSettings(1.0, 0.5),
    (4, 10): OuterSettings(1.0, 0.5, warmup=5),
    (4, 30): OuterSettings(1.0, 0.5, warmup=5),
    (4, 100): OuterSettings(1.0, 0.5),
}


def tuned_outer_settings(replicas: int, inner_steps: int) -> OuterSettings:
    """The swept outer step nearest to `replicas` replicas syncing every `inner_steps` steps."""
    if replicas < 1 or inner_steps < 1:
        raise ValueError(f"replicas = {replicas} and inner_steps = {inner_steps} must be at least 1")
    counts = sorted({r for r, _ in TUNED})
    count = min(counts, key=lambda r: (abs(math.log(r) - math.log(max(replicas, 1))), r))
    steps = sorted(h for r, h in TUNED if r == count)
    h = min(steps, key=lambda s: (abs(math.log(s) - math.log(inner_steps)), s))
    return TUNED[(count, h)]


DEFAULT_COMPRESSION = "int8"
"""What `sync.compression = "auto"` sends for DiLoCo: 4x fewer bytes than fp32; in the sweep (docs/sync.md)
it lost 0.4-1.9 points less to DDP than fp4, and at H = 30 it still sends >= 118x fewer bytes than DDP."""


def outer_options(cfg, replicas: int) -> dict:
    """DiLoCo's keyword arguments from a [sync] section (`SyncConfig`) for `replicas` replicas:
    `outer_lr = 0`, `outer_momentum = -1` and `compression = "auto"` become the tuned values,
    and the choice is logged once, so no setting is taken silently."""
    tuned = tuned_outer_settings(replicas, cfg.inner_steps)
    options = {"inner_steps": cfg.inner_steps, "nesterov": cfg.nesterov,
               "outer_lr": cfg.outer_lr if cfg.outer_lr > 0 else tuned.lr,
               "outer_momentum": cfg.outer_momentum if cfg.outer_momentum >= 0 else tuned.momentum,
               "outer_warmup": cfg.outer_warmup if cfg.outer_warmup >= 0 else tuned.warmup,
               "compression": DEFAULT_COMPRESSION if cfg.compression == "auto" else cfg.compression,
               "topk_fraction": cfg.topk_fraction, "topk_bits": cfg.topk_bits}
    chosen = [f"{key} {options[key]}" for key, auto in (("outer_lr", cfg.outer_lr <= 0),
                                                       ("outer_momentum", cfg.outer_momentum < 0),
                                                       ("outer_warmup", cfg.outer_warmup < 0),
                                                       ("compression", cfg.compression == "auto")) if auto]
    if chosen:
        swept = sorted({r for r, _ in TUNED})
        beyond = f"; swept for {'/'.join(map(str, swept))} replicas only" if replicas not in swept else ""
        log.info("DiLoCo with %d replicas, inner_steps %d: %s (tuned defaults, docs/sync.md%s)", replicas,
                 cfg.inner_steps, ", ".join(chosen), beyond)
    return options
