"""Shared by the cluster tests: two network namespaces as two hosts, and `shoal run`'s losses
on the same 2-worker layout, which every cluster path must reproduce."""

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, metric_records, shoal
from tests.e2e.conftest import two_hosts  # noqa: F401  (a fixture, re-exported for these tests)

STEPS = 3
# The run every cluster test repeats: 2 workers in all, 3 steps, a checkpoint at the end.
RUN = [*TINY, f"train.steps={STEPS}", "log.tensorboard=false"]
BIN = str(Path(sys.executable).parent)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metric_records(run_dir, "train")]


def node_env(**variables: str) -> dict[str, str]:
    """This process's environment without any launcher's or cluster's variables, plus `variables`;
    the venv's `shoal` first on PATH (the job files call it by name)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "SKYPILOT_", "SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(variables)
    return env


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory) -> list[float]:
    """`shoal run` with 2 local workers: the losses the cluster paths must match."""
    workdir = tmp_path_factory.mktemp("reference")
    out = shoal("run", *RUN, "log.name=reference", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = train_losses(workdir / "runs" / "reference")
    assert len(losses) == STEPS
    return losses
