"""Step time, clusters, failures and links of `shoal plan`: one process, no workers started
(the calibration test starts 2 and 4 Gloo ranks and is marked slow)."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from shoal.config import Config, ConfigError
from shoal.parallel.compose import check_layout
from shoal.plan import cli
from shoal.plan.cluster import PRESETS, check_world, load_cluster, run_cost
from shoal.plan.collectives import CollectiveCost, fit_cost
from shoal.plan.goodput import (link_rows, parse_duration, parse_rate, per_step_goodput, restart_goodput)
from shoal.plan.layouts import short_of_a_replica, with_degrees
from shoal.plan.memory import meta_model
from shoal.plan.opcount import count_forward_backward, count_optimizer_step
from shoal.plan.steptime import predict_step


def gpt() -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.flavour = "gpt", "debug"
    cfg.data.seq_len, cfg.train.batch_size = 32, 16
    cfg.parallel.dp_replicate = 1
    return cfg


def test_flops_of_a_linear_are_counted_by_torch():
    with torch.device("meta"):
        layer = nn.Linear(64, 32, bias=False)
    x = torch.zeros(8, 64, device="meta", requires_grad=True)
    count = count_forward_backward(layer, x, None, lambda out, _: out.sum())
    # forward 2*8*64*32; backward twice that (input and weight gradients)
    assert count.flops == 3 * 2 * 8 * 64 * 32
    assert sum(count.matmuls.values()) == 3 and (8, 64, 32) in count.matmuls
    assert count.ops >= 3


def test_adamw_step_touches_every_parameter_state():
    params = [nn.Parameter(torch.empty(100, device="meta")), nn.Parameter(torch.empty(10, 10, device="meta"))]
    adamw, sgd = count_optimizer_step(params, "adamw"), count_optimizer_step(params, "sgd")
    assert adamw.ops > sgd.ops > 0
    assert adamw.bytes > 200 * 4 * 4  # at least param, grad and two moments read


def test_collective_fit_recovers_latency_and_bandwidth():
    true = CollectiveCost(latency=2e-4, bandwidth=1.5e9)
    sizes = [16e3, 256e3, 2e6, 8e6]
    fit = fit_cost(sizes, [true.seconds(s) for s in sizes])
    assert fit.latency == pytest.approx(2e-4, rel=1e-6) and fit.bandwidth == pytest.approx(1.5e9, rel=1e-6)
    # a ring of 4 over the same links: 2(k-1)/k of the buffer per link, 2(k-1) latency steps
    four = fit.to_group("all_reduce", 2, 4)
    assert four.bandwidth == pytest.approx(1.5e9 * 1.0 / 1.5) and four.latency == pytest.approx(2e-4 * 3)
    with pytest.raises(ValueError):
        fit_cost([1.0], [1.0])


def test_cluster_step_time_orders_layouts_sensibly():
    cfg = gpt()
    model = meta_model(cfg)
    hw = load_cluster("h100-sxm").hardware("fp32")
    times = {}
    for name, degrees in {"ddp": {"dp_replicate": 4}, "fsdp": {"dp_shard": 4},
                          "pp": {"pp": 2, "dp_replicate": 2}}.items():
        layout = with_degrees(cfg, degrees)
        times[name] = predict_step(layout, check_layout(layout, 4), model, hw)
    assert all(t.total > 0 and t.compute > 0 for t in times.values())
    assert times["fsdp"].comm > times["ddp"].comm  # 2 gathers + a reduce-scatter against one all-reduce
    assert any("bubble" in n for n in times["pp"].notes)


def test_cluster_presets_and_cost():
    for name in PRESETS:
        cluster = load_cluster(name)
        assert cluster.spec_only and cluster.peak_flops["bf16"] > 1e13
    h100 = load_cluster("h100-sxm")
    cost = run_cost(h100, 8, tokens_per_second=1e6, token_budget=3.6e9)
    assert cost.hours == pytest.approx(1.0) and cost.dollars == pytest.approx(8 * 3.0)
    assert cost.dollars_per_billion_tokens == pytest.approx(24 / 3.6)


@pytest.mark.parametrize("text,words", [
    ('accelerator = "X"\n', ["missing field 'peak_tflops'"]),
    ({**PRESETS["l4"], "hbm_gb": -1}, ["hbm_gb = -1", "positive"]),
    ({**PRESETS["l4"], "efficiency": 1.5}, ["efficiency = 1.5"]),
    ("not toml [", ["not valid TOML"]),
    ({**PRESETS["l4"], "spot_dolars_per_hour": 0.3}, ["unknown field 'spot_dolars_per_hour'", "spot_dollars_per_hour"]),
    ({**PRESETS["l4"], "spot_dollars_per_hour": "cheap"}, ["spot_dollars_per_hour = 'cheap'", "a number"]),
    ('[cluster]\naccelerator = "X"\n', ["unknown field 'cluster'", "top of the file, not under [cluster]"]),
])
def test_bad_cluster_files_name_the_field(tmp_path, text, words):
    if isinstance(text, dict):
        import json
        lines = [f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ ' + ', '.join(f'{a} = {b}' for a, b in v.items()) + ' }'}"
                 for k, v in text.items()]
        text = "\n".join(lines) + "\n"
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(str(path))
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="no such file and not a preset"):
        load_cluster(str(tmp_path / "missing.toml"))


def test_impossible_world_on_a_cluster():
    with pytest.raises(ConfigError, match="--world 12 on h100-sxm: 8 accelerators per node"):
        check_world(load_cluster("h100-sxm"), 12)
    check_world(load_cluster("h100-sxm"), 4)
    check_world(load_cluster("h100-sxm"), 16)


def test_goodput_matches_the_closed_form():
    step, every, save, restart, mtbf = 1.0, 100, 10.0, 60.0, 3600.0
    tau = every * step
    expected = tau / (tau + save) * (1 - (restart + (tau + save) / 2) / mtbf)
    assert restart_goodput(step, every, save, restart, mtbf) == pytest.approx(expected)
    assert per_step_goodput(step, every, save, 0.1, mtbf) == pytest.approx(tau / (tau + save) * (1 - 0.6 / mtbf))
    # never failing: only the checkpoint's cost remains; failing constantly: nothing trains
    assert restart_goodput(step, every, save, restart, 1e12) == pytest.approx(tau / (tau + save))
    assert restart_goodput(step, every, save, restart, 30.0) == 0.0
    assert per_step_goodput(step, every, save, 0.1, mtbf) > restart_goodput(step, every, save, restart, mtbf)
    # short of a worker for 60 s after each failure: slower steps cost, faster ones (more workers than
    # cores) gain, in proportion to the time short; a second regroup when the replacement joins
    base = tau / (tau + save)
    slower = per_step_goodput(step, every, save, 0.1, mtbf, short_step_s=1.25, replace_s=60.0)
    assert slower == pytest.approx(base * (1 - 0.7 / mtbf + 60 / mtbf * (1 / 1.25 - 1)))
    faster = per_step_goodput(step, every, save, 0.1, mtbf, short_step_s=0.8, replace_s=60.0)
    assert faster == pytest.approx(base * (1 - 0.7 / mtbf + 60 / mtbf * (1 / 0.8 - 1)))
    assert slower < per_step_goodput(step, every, save, 0.1, mtbf) < faster
    # short the whole time when replacements take longer than the time between failures
    assert per_step_goodput(step, 1, 0.0, 0.0, 10.0, short_step_s=0.5, replace_s=30.0) == pytest.approx(2 - 0.05)


def test_links_diloco_sends_h_times_less():
    rows = {r.method: r for r in link_rows(0.1, 40e6, 3, parse_rate("20mbit"), parse_duration("100ms", "--rtt"), 50)}
    ddp, diloco = rows["ddp (all-reduce every step)"], rows["diloco H=50 none"]
    framed = 1 + 66 / 1448 + 33 / 1448  # headers of each segment sent, an ACK per two received
    assert ddp.bytes_per_step == pytest.approx(2 * 2 / 3 * 40e6 * framed)
    assert diloco.bytes_per_step == pytest.approx(ddp.bytes_per_step / 50)
    assert ddp.step_s == pytest.approx(0.1 + 2 * 2 / 3 * 40e6 * framed / 2.5e6 + 4 * 0.05)
    assert rows["diloco H=50 fp4"].bytes_per_step < diloco.bytes_per_step
    # DiLoCo's default int8: each of the 3 sites' codes (1 byte a value) and scales go to the 2 others
    int8 = rows["diloco H=50 int8"]
    assert int8.bytes_per_step == pytest.approx(2 * 40e6 * (1 / 4 + 1 / 256) * framed / 50)
    assert rows["diloco H=50 int4"].bytes_per_step < int8.bytes_per_step
    with pytest.raises(ConfigError, match="--link 'fast'"):
        parse_rate("fast")
    with pytest.raises(ConfigError, match="--mtbf"):
        parse_duration("-3h", "--mtbf")


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_on_a_cluster_prints_time_cost_and_failures(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nname = "gpt"\nflavour = "debug"\n[data]\nseq_len = 32\n[train]\nbatch_size = 16\n')
    assert _plan([str(config), "--world", "8", "--cluster", "h200", "--tokens", "1B", "--mtbf", "6h",
                  "--link", "20mbit", "--rtt", "100ms", "--sites", "3"]) == 0
    out = capsys.readouterr().out
    assert "SPEC-ONLY" in out and "$/1B tok" in out and "recommended:" in out
    assert "restart from checkpoint" in out and "per-step recovery" in out
    # the recommended layout has replicas: the output names the layout the run trains on while short
    assert "after a failure the run trains on 7 workers at" in out, out
    assert "diloco H=30 fp4" in out  # sync.inner_steps, default 30
    with pytest.raises(ConfigError, match="--world 12 on h200"):
        _plan([str(config), "--world", "12", "--cluster", "h200"])
    with pytest.raises(ConfigError, match="--world N"):
        _plan([str(config)])


@pytest.mark.slow
def test_calibration_is_cached_and_reused(tmp_path):
    """`shoal plan --calibrate` measures (2 and 4 Gloo ranks) and caches; a plan then reuses it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    shoal = str(Path(sys.executable).parent / "shoal")
    env = {**os.environ, "SHOAL_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([shoal, "plan", "--calibrate"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    cached = list((tmp_path / "cache" / "plan").glob("calibration-*-torch*-threads*.json"))
    assert len(cached) == 1 and "cached in" in first.stdout
    measured = json.loads(cached[0].read_text())
    assert set(measured["collectives"]) == {"2", "4"}
    assert all(lat >= 0 and bw > 0 for ops in measured["collectives"].values() for lat, bw in ops.values())
    config = tmp_path / "run.toml"
    config.write_text('[model]\nname = "gpt"\nflavour = "debug"\n[data]\nseq_len = 32\n[train]\nbatch_size = 16\n')
    second = subprocess.run([shoal, "plan", str(config), "--world", "2"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "calibrating collectives" not in second.stdout
    assert f"calibrated {measured['calibrated_at']}, torch" in second.stdout and "UTC" in measured["calibrated_at"]
    assert "step ms" in second.stdout and "tokens/s" in second.stdout
    after = json.loads(cached[0].read_text())
    assert after["seconds"] == measured["seconds"]  # the same calibration
    # FSDP2's passes without gradient sync, as a fraction of a full pass, per group size
    assert set(after["fsdp_nosync"]) == {"2", "4"}
    assert all(0 <= f <= 1 for fractions in after["fsdp_nosync"].values() for f in fractions)
    # the blocks were profiled at each layout's stage depth: the whole model's (debug GPT, 2 blocks)
    # for data parallel and tensor parallel, one stage's for the pipelines
    depths = {key.split("/d")[-1].split("/")[0] for key in after["blocks"]}
    assert {"1", "2"} <= depths, sorted(after["blocks"])
    assert all(len(times) == 3 and min(times) >= 0 for times in after["blocks"].values())


def test_short_of_a_replica_is_the_layout_per_step_recovery_trains_on():
    cfg = gpt()
    cfg.train.batch_size = 32
    short, world = short_of_a_replica(cfg, {"dp_replicate": 4}, 4)
    assert world == 3 and short.parallel.dp_replicate == 3
    assert short.train.batch_size == 33  # 32 split over 3: the busiest survivor takes 11
    check_layout(short, 3)
    hsdp, world = short_of_a_replica(cfg, {"dp_replicate": 2, "dp_shard": 2}, 4)
    assert world == 2 and (hsdp.parallel.dp_replicate, hsdp.parallel.dp_shard) == (1, 2)  # a whole group leaves
    # no replica to drop, or a method per-step recovery does not cover: fault.enabled restarts every worker
    assert short_of_a_replica(cfg, {"dp_shard": 4}, 4) is None
    assert short_of_a_replica(cfg, {"dp_replicate": 2, "tp": 2}, 4) is None
    cfg.sync.method = "fp16"
    assert short_of_a_replica(cfg, {"dp_replicate": 4}, 4) is None
