"""`parallel.auto = true`: the planner's layout replaces the configured degrees, and says why."""

from __future__ import annotations

import tomllib

import pytest

from shoal.config import Config, ConfigError
from shoal.plan.auto import choose_layout
from tests.conftest import TINY, shoal


def test_without_a_calibration_auto_takes_the_memory_rule_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))  # no calibration of this host cached here
    cfg = Config()
    cfg.model.name, cfg.model.flavour, cfg.data.seq_len, cfg.train.batch_size = "gpt", "debug", 32, 8
    cfg.parallel.dp_shard, cfg.parallel.dp_replicate, cfg.parallel.auto = 2, 1, True
    choice = choose_layout(cfg, 2)
    # the memory rule: fewest model-parallel splits, then the least sharding: plain DDP
    assert choice.degrees == {"dp_replicate": 2, "dp_shard": 1, "tp": 1, "pp": 1}
    assert "no calibration" in choice.reason and "shoal plan --calibrate" in choice.reason
    assert choice.row.startswith("dp_replicate=2:")



def test_auto_on_a_world_no_layout_can_take_names_each_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    cfg = Config()
    cfg.model.name, cfg.model.flavour, cfg.data.seq_len, cfg.train.batch_size = "gpt", "debug", 32, 8
    cfg.parallel.auto = True
    with pytest.raises(ConfigError) as err:
        choose_layout(cfg, 7)
    message = str(err.value)
    assert "no layout of 7 workers is possible" in message and "fits" not in message
    assert "train.batch_size = 8 must divide into 7" in message and "pp=7:" in message


@pytest.mark.slow
def test_a_run_with_auto_trains_the_planners_choice_and_logs_why(tmp_path):
    # the user's FSDP degrees are replaced by the planner's choice, which the run directory keeps
    run = shoal("run", *TINY, "train.steps=3", "parallel.auto=true", "parallel.dp_shard=2",
                "parallel.dp_replicate=1", "log.name=auto", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    line = [x for x in run.stderr.splitlines() if x.startswith("shoal: parallel.auto chose ")]
    assert line and "dp_replicate=2:" in line[0] and "per worker" in line[0], run.stderr
    saved = tomllib.loads((tmp_path / "runs" / "auto" / "config.toml").read_text())["parallel"]
    assert (saved["dp_replicate"], saved["dp_shard"], saved["tp"], saved["pp"]) == (2, 1, 1, 1)
    assert (tmp_path / "runs" / "auto" / "metrics.jsonl").exists()
