"""Shared by the export tests: run directories with a one-process checkpoint, the `shoal`
command's main() in this process, and the one-line error check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal import config as config_module
from shoal.cli import main
from shoal.export.consolidate import build, data_spec
from shoal.runtime.checkpoint import Checkpointer

TINY_DATA = ["data.seq_len=32", "data.max_bytes=400000"]
ROWS, FEATURES, CLASSES = 1200, 6, 3


def saved_run(root: Path, name: str, overrides: list[str]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run directory with a one-process checkpoint of a model built from `overrides`, its
    weights moved off their initial values (so a load that did nothing would show)."""
    cfg = config_module.load(None, TINY_DATA + [f"log.name={name}", *overrides])
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_module.to_toml(cfg))
    model = build(cfg, data_spec(cfg))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.01)
    Checkpointer(run_dir / "checkpoints").save(3, [model], torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3})
    return run_dir, {k: v.clone() for k, v in model.state_dict().items()}


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("shoal: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def shoal_here(capfd, *args: str) -> subprocess.CompletedProcess:
    """The `shoal` command's own main() in this process (no second torch start-up), as a result."""
    capfd.readouterr()
    code = main(list(args))
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A run directory of an mlp checkpoint for 6-feature, 3-class npy data, and the data."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    np.save(data / "x.npy", rng.normal(size=(ROWS, FEATURES)).astype(np.float32))
    np.save(data / "y.npy", rng.integers(0, CLASSES, ROWS))
    run_dir, _ = saved_run(root, "mlp", ["model.name=mlp", "data.source=npy", f"data.path={data}"])
    return run_dir, data
