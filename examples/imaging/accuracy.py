"""Accuracy of a trained imaging run on its held-out images (the split `data.val_fraction` keeps).

    python examples/imaging/accuracy.py runs/imaging
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from shoal import load
from shoal.data import build_dataset
from shoal.runtime.checkpoint import latest_checkpoint
from shoal.models import build_model


def accuracy(run_dir: Path) -> tuple[float, int]:
    cfg = load(run_dir / "config.toml")
    _, val, spec = build_dataset(cfg.data, cfg.train.seed)
    model = build_model(cfg.model, spec)
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is disabled": one process is what is meant here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=checkpoint)  # DCP reads any layout's checkpoint
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        x, y = val.get(torch.arange(len(val)))
        return float((model(x).argmax(1) == y).float().mean()), len(val)


if __name__ == "__main__":
    acc, n = accuracy(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/imaging"))
    print(f"accuracy {acc:.1%} on {n} held-out images (chance: 25%)")
