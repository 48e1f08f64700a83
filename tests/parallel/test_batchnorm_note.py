"""A model with BatchNorm under data parallelism says, once at start, that each rank normalises
with its own share's statistics (torch's SyncBatchNorm runs on GPUs only)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from shoal.parallel.compose import check_layout, parallelize
from tests.parallel.parallel_harness import gpt_config
from tests.world import run_world

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def build_and_log(rank: int, world: int, out_dir: str) -> None:
    handler = logging.FileHandler(Path(out_dir, f"rank{rank}.log"))
    logging.getLogger("shoal").addHandler(handler)
    cfg = gpt_config(dp_replicate=2)
    dims = check_layout(cfg, world)
    mesh = dims.build_mesh("cpu")
    for model in (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(4, 4))):
        parallelize(model, dims, mesh, cfg, torch.device("cpu"))
    handler.close()


def test_batchnorm_under_ddp_is_said_once(tmp_path):
    run_world(build_and_log, 2, str(tmp_path))
    for rank in range(2):
        lines = [line for line in Path(tmp_path, f"rank{rank}.log").read_text().splitlines() if "BatchNorm" in line]
        assert len(lines) == 1 and "its own share of the batch" in lines[0], lines
