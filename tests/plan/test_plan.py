"""`shoal plan` and the layout checks: one process, no workers started."""

from __future__ import annotations

import argparse

import pytest

from shoal.config import Config, ConfigError
from shoal.parallel.compose import check_layout
from shoal.plan import cli
from shoal.plan.layouts import candidate_degrees, parse_size, plan_layouts, recommend, require_fit, with_degrees
from shoal.plan.memory import estimate_memory


def gpt(**parallel) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.flavour = "gpt", "debug"  # dim 64, 2 layers, 4 heads
    cfg.data.seq_len, cfg.train.batch_size = 32, 16
    cfg.parallel.dp_replicate = 1
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("parallel,world,words", [
    ({"dp_shard": 3}, 4, ["multiply to 3", "4 ranks"]),
    ({"tp": 8}, 8, ["parallel.tp = 8", "model.n_heads = 4", "valid: 1, 2, 4"]),
    ({"pp": 4}, 4, ["parallel.pp = 4", "model.n_layers = 2", "parallel.pp <= 2"]),
    ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, 2, ["4 stages", "model.n_layers = 2", "parallel.pp <= 1"]),
    ({"pp": 2, "pp_schedule": "zero_bubble"}, 2, ["parallel.pp_schedule = 'zero_bubble'", "gpipe, 1f1b"]),
    ({"pp": 2, "pp_microbatches": 1}, 2, ["parallel.pp_microbatches = 1", "at least parallel.pp = 2"]),
    ({"dp_replicate": 2, "cpu_offload": True}, 2, ["parallel.cpu_offload", "dp_shard > 1"]),
])
def test_bad_layouts_name_the_field(parallel, world, words):
    with pytest.raises(ConfigError) as err:
        check_layout(gpt(**parallel), world)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_layouts_the_model_cannot_take():
    mlp = gpt(pp=2)
    mlp.model.name, mlp.data.source = "mlp", "synthetic"
    with pytest.raises(ConfigError, match="parallel.pp = 2.*only model.name = 'gpt'"):
        check_layout(mlp, 2)
    # a factory may return a Hugging Face model with its own plan: the worker that builds it
    # refuses one without (shoal/parallel/tensor.py), so the layout passes here
    custom = gpt(tp=2)
    custom.model.factory = "mypkg.models:build"
    check_layout(custom, 2)
    hooked = gpt(dp_shard=2)
    hooked.sync.method = "powersgd"
    with pytest.raises(ConfigError, match="sync.method = 'powersgd' is a DDP comm hook"):
        check_layout(hooked, 2)


def test_every_layout_of_the_world_is_listed():
    degrees = candidate_degrees(4)
    assert len(degrees) == 10  # two factors of 2 spread over four axes
    assert all(d["dp_replicate"] * d["dp_shard"] * d["tp"] * d["pp"] == 4 for d in degrees)
    plans = plan_layouts(gpt(), 8)
    refused = {p.name: p.error for p in plans if p.estimate is None}
    assert "tp=8" in refused and "n_heads" in refused["tp=8"]
    assert any(p.estimate for p in plans)


def test_fully_sharded_state_is_a_quarter_of_replicated():
    cfg = gpt()
    replicated = estimate_memory(cfg, check_layout(with_degrees(cfg, {"dp_replicate": 4}), 4))
    sharded = estimate_memory(cfg, check_layout(with_degrees(cfg, {"dp_shard": 4}), 4))
    assert sharded.state <= replicated.state / 4 * 1.10
    assert sharded.activations == replicated.activations  # same micro-batch per rank


def test_over_the_cap_replicated_is_refused_and_sharded_fits():
    cfg = gpt()
    sharded_est = estimate_memory(cfg, check_layout(with_degrees(cfg, {"dp_shard": 4}), 4))
    replicated_est = estimate_memory(cfg, check_layout(with_degrees(cfg, {"dp_replicate": 4}), 4))
    cap = (sharded_est.total + replicated_est.total) // 2
    assert replicated_est.state > cap - replicated_est.activations  # the state alone does not fit replicated
    with pytest.raises(ConfigError, match="memory-per-worker.*layouts that fit:.*dp_shard=4"):
        require_fit(with_degrees(cfg, {"dp_replicate": 4}), 4, cap)
    require_fit(with_degrees(cfg, {"dp_shard": 4}), 4, cap)


def test_recommend_prefers_replication_when_it_fits_and_sharding_when_not():
    plans = plan_layouts(gpt(), 4)
    assert recommend(plans).degrees == {"dp_replicate": 4, "dp_shard": 1, "tp": 1, "pp": 1}
    replicated = next(p for p in plans if p.degrees["dp_replicate"] == 4).estimate.total
    tight = plan_layouts(gpt(), 4, cap_bytes=replicated - 1)
    best = recommend(tight)
    assert best.fits and best.degrees["tp"] * best.degrees["pp"] == 1 and best.degrees["dp_shard"] > 1


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000
    with pytest.raises(ConfigError, match="--memory-per-worker"):
        parse_size("lots")


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_command_lists_flags_and_recommends(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))  # no calibration: memory only
    config = tmp_path / "run.toml"
    config.write_text('[model]\nname = "gpt"\nflavour = "debug"\n[data]\nseq_len = 32\n[train]\nbatch_size = 16\n')
    assert _plan([str(config), "--world", "4", "--memory-per-worker", "2GB", "--all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpt (debug), ") and " parameters on 4 workers" in out
    assert "recommended: dp_replicate=4" in out and "dp_shard=4" in out and "  yes" in out
    assert "[parallel]\ndp_replicate = 4" in out
    assert _plan([str(config), "--world", "4", "--memory-per-worker", "1KB"]) == 1
    assert "no layout fits" in capsys.readouterr().out
    # 7 workers: no layout is possible at all (not a memory problem): each reason is listed
    assert _plan([str(config), "--world", "7"]) == 1
    out = capsys.readouterr().out
    assert "no layout of 7 workers is possible" in out and "no layout fits" not in out
    assert "train.batch_size = 16 must divide into 7" in out and "model.n_layers" in out


def test_plan_names_the_hugging_face_model_it_planned(tmp_path, capsys, monkeypatch):
    """The title is the model the config trains (here a Hugging Face folder's architecture and its
    exact parameter count), not the reference model `model.name` would otherwise pick."""
    import transformers as tf

    from tests.hf.tiny import save_tiny
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))
    folder = save_tiny("qwen2", tmp_path / "qwen2")
    count = sum(p.numel() for p in tf.Qwen2ForCausalLM(tf.AutoConfig.from_pretrained(folder)).parameters())
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nhf = "{folder}"\n[data]\nseq_len = 16\n[train]\nbatch_size = 4\n')
    assert _plan([str(config), "--world", "2"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title == f"Qwen2ForCausalLM ({folder}), {count:,} parameters on 2 workers"


@pytest.mark.parametrize("flags, words", [
    (["--mtbf", "6h"], "--mtbf needs a step time"),
    (["--link", "20mbit", "--rtt", "100ms", "--sites", "3"], "--link needs a step time"),
    (["--link", "20mbit"], "--link and --sites go together"),
])
def test_failure_and_link_predictions_without_a_step_time_are_refused_before_the_table(
        tmp_path, capsys, monkeypatch, flags, words):
    """--mtbf without a calibration or --cluster printed the table and dropped the failure prediction
    without a word; now it, like --link, is one line before anything is printed."""
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))  # no calibration of this host
    config = tmp_path / "run.toml"
    config.write_text('[model]\nname = "gpt"\nflavour = "debug"\n[data]\nseq_len = 32\n[train]\nbatch_size = 16\n')
    with pytest.raises(ConfigError, match=words):
        _plan([str(config), "--world", "4", *flags])
    assert capsys.readouterr().out == ""
