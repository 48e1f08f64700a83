"""`fed simulate` on scikit-learn's bundled digits: a bounded pool, partitions, robustness to poisoning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shoal.config import ConfigError, load
from shoal.federated.simulate import simulate
from tests.conftest import metric_records

BASE = ["model.name=mlp", "model.dim=32", "model.n_layers=1", "train.optimizer=sgd", "train.lr=0.1",
        "train.batch_size=16", "train.weight_decay=0.0", "federated.rounds=3", "federated.local_epochs=2",
        "federated.sim_clients=20", "federated.sim_workers=2", "federated.min_clients=2"]


def run(tmp_path, name, *overrides, **kwargs):
    cfg = load(None, BASE + list(overrides))
    run_dir = tmp_path / name
    run_dir.mkdir()
    return simulate(cfg, run_dir, **kwargs), run_dir


@pytest.mark.slow
def test_fedavg_learns_on_label_skewed_clients(tmp_path):
    summary, run_dir = run(tmp_path, "skew", "federated.partition=dirichlet", "federated.dirichlet_alpha=0.5")
    rows = metric_records(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["sampled"] == 20 for r in rows)
    assert rows[-1]["eval_accuracy"] > 0.6 and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert summary["workers"] == 2 and (run_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_krum_survives_poisoning_that_breaks_fedavg(tmp_path):
    attack = dict(attack_fraction=0.15, attack_scale=10.0)
    fedavg, _ = run(tmp_path, "avg", **attack)
    krum, _ = run(tmp_path, "krum", "federated.strategy=multikrum", "federated.byzantine=3",
                  "federated.min_clients=10", **attack)
    assert fedavg["eval_accuracy"] < 0.3
    assert krum["eval_accuracy"] > 0.6


def test_simulate_command_refuses_secagg(tmp_path):
    with pytest.raises(ConfigError, match="secure aggregation"):
        run(tmp_path, "bad", "federated.secagg=true", "federated.min_clients=3")


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[federated]\nstrategy = "fedfoo"\n')
    proc = subprocess.run([sys.executable, "-m", "shoal.federated", "fed", "simulate", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("shoal: error: federated.strategy = 'fedfoo'")
