"""The loss is a mean over every target of the global batch that counts (padding, IGNORE_INDEX,
excluded), however the batch is split: 1 process with train.grad_accum = 2, 2 ranks (DDP, FSDP,
DDP with grad_accum, pipeline stages) and 4 ranks give the single-process losses on padded
variable-length data within a relative 1e-5, and the same trained parameters. Before, each rank
averaged over its own targets: 2 ranks were ~3e-4 off one process."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shoal.models import IGNORE_INDEX
from tests.parallel.parallel_harness import (BATCH, SEQ, STEPS, compare, gpt_config, merged, reference,
                                             token_batches, train_layout)
from tests.world import run_world

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLDS = {
    1: {"accum2": {"grad_accum": 2}},
    2: {"ddp2": {"dp_replicate": 2}, "fsdp2": {"dp_shard": 2}, "ddp2_accum2": {"dp_replicate": 2, "grad_accum": 2},
        "pp2": {"pp": 2, "pp_schedule": "1f1b"},
        # unpadded data that promises so (as token windows do): no all-reduce of the item count
        "ddp2_accum2_unpadded": {"dp_replicate": 2, "grad_accum": 2, "unpadded": True}},
    4: {"ddp4": {"dp_replicate": 4}},
}


PARAM_TOLERANCE = 5e-4
"""AdamW's first steps move each weight by about lr (3e-3) whatever its gradient's size, so float
noise in a near-zero gradient shows up to ~1e-4; a rank's own mean moved them by more (see the report)."""


def padded_batches(seed: int = 1):
    """Token batches whose samples have from 1 to SEQ targets that count, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x, y in token_batches(seed=seed):
        lengths = torch.randint(1, SEQ + 1, (BATCH, 1), generator=g)
        y = torch.where(torch.arange(SEQ) < lengths, y, IGNORE_INDEX)
        out.append((x, y))
    return out


def run_padded(rank: int, world: int, layouts: dict, out_dir: str) -> None:
    results = {}
    for name, settings in layouts.items():
        settings = dict(settings)
        accum = settings.pop("grad_accum", 1)
        unpadded = settings.pop("unpadded", False)
        batches = token_batches() if unpadded else padded_batches()
        cfg = gpt_config(**settings)
        cfg.train.grad_accum = accum
        try:
            ref_losses, ref_params = reference(cfg, batches)
            with ScalarAllReduces() as scalars:
                losses, params, *_ = train_layout(cfg, world, batches, every_target_counts=unpadded)
            # the training steps (the harness's last entry is a per-rank evaluate() of its own)
            results[name] = {**compare(losses[:STEPS], params, ref_losses[:STEPS], ref_params),
                             "scalar_all_reduces": scalars.calls}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


class ScalarAllReduces:
    """Counts this process's all-reduces of one-element tensors (the item count's; the harness
    also all-reduces each step's loss and the final evaluation) while the block runs."""

    def __enter__(self):
        self.calls, self.original = 0, dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.calls += tensor.numel() == 1
            return self.original(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *_):
        dist.all_reduce = self.original


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = {}
    for world, layouts in WORLDS.items():
        folder = tmp_path_factory.mktemp(f"padded_world{world}")
        run_world(run_padded, world, layouts, str(folder))
        out.update(merged(str(folder), world))
    return out


def test_the_padding_differs_between_ranks():
    (_, y), *_ = padded_batches()
    counted = (y != IGNORE_INDEX).sum(1)
    assert counted[: BATCH // 2].sum() != counted[BATCH // 2:].sum()  # each rank's own mean would differ


@pytest.mark.parametrize("name", [name for layouts in WORLDS.values() for name in layouts])
def test_padded_losses_match_one_process(worlds, name):
    for rank, res in enumerate(worlds[name]):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["loss_rel_err"] < 1e-5, (rank, res["losses"], res["ref_losses"])
        assert res["param_max_err"] < PARAM_TOLERANCE, (rank, res["param_max_err"])


def test_unpadded_data_counts_its_items_without_an_all_reduce(worlds):
    """With data that promises every target counts, the count of each step is each rank's own
    (the same on every rank): the harness's own loss and evaluation all-reduces remain, one per
    step and one at the end, and no step adds one for the count; padded data adds one per step."""
    unpadded, padded = worlds["ddp2_accum2_unpadded"], worlds["ddp2_accum2"]
    assert [res["scalar_all_reduces"] for res in unpadded] == [STEPS + 1] * 2
    assert [res["scalar_all_reduces"] for res in padded] == [2 * STEPS + 1] * 2
