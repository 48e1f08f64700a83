"""`sync.method = "diloco"` with no other key, against DDP, as a user runs it: 2 workers on loopback.

The defaults (H = 30, int8 outer gradients, the outer step tuned for 2 replicas) must land within
3 % of DDP's validation loss on the same tokens, and say in the log which tuned values they took.
"""

from __future__ import annotations


import pytest

from tests.conftest import metric_records, shoal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 600  # 20 outer syncs at H = 30
JOB = ["model.name=gpt", "model.flavour=debug", "model.dim=64", "model.n_layers=2",  # not the quickstart's size
       "data.source=stdlib", "data.seq_len=64", "train.batch_size=32",
       f"train.steps={STEPS}", "train.warmup_steps=60", f"train.eval_every={STEPS}", "train.eval_batches=16",
       "launch.nproc=2", "checkpoint.every=0", "log.progress=plain", "log.tensorboard=false"]


def final_val_loss(run_dir) -> float:
    return metric_records(run_dir, "eval")[-1]["val_loss"]


def test_diloco_defaults_land_within_3_percent_of_ddp(tmp_path):
    ddp = shoal("run", *JOB, "log.name=ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    diloco = shoal("run", *JOB, "log.name=diloco", "sync.method=diloco", cwd=tmp_path)
    assert diloco.returncode == 0, diloco.stderr[-2000:]
    log = (tmp_path / "runs" / "diloco" / "logs" / "rank0.log").read_text()
    assert "DiLoCo with 2 replicas, inner_steps 30: outer_lr" in log and "compression int8" in log
    reference, loss = final_val_loss(tmp_path / "runs" / "ddp"), final_val_loss(tmp_path / "runs" / "diloco")
    print(f"DDP {reference:.4f}, DiLoCo defaults {loss:.4f} ({loss / reference - 1:+.1%})")  # shown with -s
    assert loss <= reference * 1.03, f"DiLoCo {loss:.4f} vs DDP {reference:.4f}: {loss / reference - 1:+.1%}"
