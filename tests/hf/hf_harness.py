"""Multi-process helpers for Hugging Face models: tiny models saved to a folder, trained on a
layout through the same harness as the built-in gpt (tests/parallel/parallel_harness.py)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from tests.parallel.parallel_harness import (BATCH, SAVE_AT, STEPS, compare, gpt_config, local_numel, reference,
                                             token_batches,
                                             train_layout)


def image_batches(steps: int = STEPS, seed: int = 0):
    """Batches of [B, 3, 16, 16] images with one of 4 labels (the tiny ViT's input)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(steps)]


def hf_config(folder: str, **parallel):
    cfg = gpt_config(**parallel)
    cfg.model.hf = folder
    return cfg


def run_hf_layouts(rank: int, world: int, layouts: dict, folders: dict, out_dir: str, ckpt_root: str = "") -> None:
    """Train each named layout ({"model": kind, parallel settings...}) of a tiny HF model and
    write this rank's comparison with one process."""
    results = {}
    for name, settings in layouts.items():
        settings = dict(settings)
        save, resume = (str(Path(ckpt_root, settings.pop(k))) if k in settings else "" for k in ("save", "resume"))
        kind = settings.pop("model")
        cfg = hf_config(folders[kind], **settings)
        batches = image_batches() if kind == "vit" else token_batches()
        try:
            ref_losses, ref_params = reference(cfg, batches)
            losses, params, pm, *_ = train_layout(cfg, world, batches, save=save, resume=resume)
            results[name] = compare(losses, params, ref_losses[SAVE_AT:] if resume else ref_losses, ref_params)
            results[name]["steps"] = len(losses) - 1
            results[name]["local_numel"] = local_numel(pm)
            results[name]["full_numel"] = sum(p.numel() for p in ref_params.values())
            results[name]["keys"] = sorted(k for part in pm.model_parts for k in part.state_dict())
            results[name]["split"] = sorted(n for part in pm.model_parts for n, p in part.named_parameters()
                                            if hasattr(p, "to_local") and p.to_local().numel() < p.numel())
        except Exception:  # recorded so the other layouts still run; the test for this one fails
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} {name}: {results[name]['error']}", flush=True)
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
