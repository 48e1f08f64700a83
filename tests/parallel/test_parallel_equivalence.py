"""Every layout reproduces one process on the same global batch: the loss of the first five
steps (and of `evaluate` after them) to a relative 1e-4, and every reassembled parameter.
Resumed layouts load another layout's checkpoint and must continue the same curve."""

from __future__ import annotations

import pytest
import torch
from parallel_harness import (SAVE_AT, SEQ, VOCAB, build, gpt_config, merged, reference, run_layouts,
                              token_batches)
from tests.world import run_world

from shoal.config import ConfigError
from shoal.parallel.compose import check_layout
from shoal.plan.layouts import require_fit
from shoal.plan.memory import estimate_memory

pytestmark = pytest.mark.distributed

# Worlds run in this order (the 2-rank world resumes the 4-rank world's checkpoint); within
# a world, layouts run top to bottom, so a "save" precedes its "resume".
LAYOUTS = {
    4: {  # fewer, mixed layouts: four ranks share two cores, so each layout costs ~10 s here
        "ddp": {"dp_replicate": 4},
        "fsdp_cpu_offload": {"dp_shard": 4, "cpu_offload": True, "save": "fsdp4"},
        "hsdp": {"dp_replicate": 2, "dp_shard": 2, "save": "hsdp"},
        "tp": {"tp": 4},
        "dp_x_tp": {"dp_shard": 2, "tp": 2},
        "pp_x_dp": {"pp": 2, "dp_shard": 2},
        "dlrm_dp_x_tp": {"model": "dlrm", "dp_shard": 2, "tp": 2},
    },
    2: {
        "ddp": {"dp_replicate": 2},
        "fsdp_ac_full": {"dp_shard": 2, "activation_checkpointing": "full"},
        "tp_ac_selective": {"tp": 2, "activation_checkpointing": "selective", "save": "tp2"},
        "pp_gpipe": {"pp": 2, "pp_schedule": "gpipe"},
        "pp_1f1b": {"pp": 2, "pp_schedule": "1f1b", "save": "pp2"},
        "pp_interleaved_1f1b": {"pp": 2, "pp_schedule": "interleaved_1f1b", "save": "pp2_interleaved"},
        "dlrm_tp": {"model": "dlrm", "tp": 2},
        # resharding: resume another layout's checkpoint; the steps after it must continue
        # the single-process curve
        "resume_fsdp4_as_fsdp2": {"dp_shard": 2, "resume": "fsdp4"},
        "resume_tp2_as_dp2": {"dp_replicate": 2, "resume": "tp2"},
        "resume_pp2_as_pp1": {"dp_shard": 2, "resume": "pp2"},
    },
}


def _run_world(world: int, tmp_path_factory) -> dict[str, list[dict]]:
    """One Gloo world trains all its layouts in turn (starting worlds is the slow part)."""
    out = tmp_path_factory.mktemp(f"world{world}")
    checkpoints = tmp_path_factory.getbasetemp() / "checkpoints"
    run_world(run_layouts, world, LAYOUTS[world], str(out), str(checkpoints))
    return merged(str(out), world)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run_world(4, tmp_path_factory)


@pytest.fixture(scope="module")
def world2(world4, tmp_path_factory):  # after world4: it resumes world4's checkpoint
    return _run_world(2, tmp_path_factory)


CASES = [(w, name) for w in LAYOUTS for name in LAYOUTS[w]]


@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_layout_matches_single_process(request, world, name):
    results = request.getfixturevalue(f"world{world}")
    for rank, res in enumerate(results[name]):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["loss_rel_err"] < 1e-4, (rank, res["losses"], res["ref_losses"])
        assert res["param_max_err"] < 1e-4, (rank, res["param_max_err"])
        assert res["n_params"] > 0 and not res["missing"]
        # the layout really splits the weights: a rank stores less than the whole model
        assert res["steps"] == (2 if "resume" in LAYOUTS[world][name] else 5)
        sharded = any(LAYOUTS[world][name].get(k, 1) > 1 for k in ("dp_shard", "tp", "pp"))
        assert (res["local_numel"] < res["full_numel"]) == sharded, (res["local_numel"], res["full_numel"])
        # and gradients are stored split like their parameters (not gathered whole)
        assert res["measured"]["grads"] == res["measured"]["params"], res["measured"]


MEMORY_CASES = [(4, "fsdp_cpu_offload"), (4, "hsdp"), (4, "dp_x_tp"), (4, "pp_x_dp"), (2, "ddp"), (2, "pp_gpipe"),
                (2, "pp_1f1b")]


@pytest.mark.parametrize("world,name", MEMORY_CASES, ids=[f"{w}ranks-{n}" for w, n in MEMORY_CASES])
def test_memory_estimate_matches_measured_peak(request, world, name):
    """shoal plan's per-rank estimate against the busiest rank's measured state (parameter,
    gradient and optimizer shards) and peak saved activations, within 25%."""
    results = request.getfixturevalue(f"world{world}")
    cfg = gpt_config(**{k: v for k, v in LAYOUTS[world][name].items() if k not in ("save", "resume")})
    dims = check_layout(cfg, world)
    with torch.device("meta"):
        model = build(cfg)
    est = estimate_memory(cfg, dims, model)
    measured = max((r["measured"] for r in results[name]),
                   key=lambda m: m["params"] + m["grads"] + m["optimizer"] + m["activations"])
    for part in ("params", "grads", "optimizer"):
        assert abs(getattr(est, part) - measured[part]) <= 0.05 * measured[part], (part, est, measured)
    est_total = est.state + est.activations
    got_total = measured["params"] + measured["grads"] + measured["optimizer"] + measured["activations"]
    assert abs(est_total - got_total) <= 0.25 * got_total, (est, measured)


def test_too_big_to_replicate_trains_sharded_over_4_ranks(world4):
    """A per-worker cap below the replicated parameters + optimizer state: `require_fit`
    refuses the replicated layout before any worker starts, accepts FSDP over 4 ranks, and
    that run (above) trained to the single-process curve within the cap."""
    cfg, replicated_cfg = gpt_config(dp_shard=4), gpt_config(dp_replicate=4)
    with torch.device("meta"):
        model = build(cfg)
    sharded = estimate_memory(cfg, check_layout(cfg, 4), model)
    replicated = estimate_memory(replicated_cfg, check_layout(replicated_cfg, 4), model)
    cap = (sharded.total + replicated.state) // 2
    assert replicated.state > cap  # parameters, gradients and optimizer state alone do not fit
    with pytest.raises(ConfigError, match="memory-per-worker"):
        require_fit(replicated_cfg, 4, cap, model)
    require_fit(cfg, 4, cap, model)
    for res in world4["fsdp_cpu_offload"]:
        assert "error" not in res and res["loss_rel_err"] < 1e-4
        assert res["losses"][-1] < res["losses"][0]  # after training, batch 0's loss is lower
        assert sum(res["measured"].values()) <= cap


@pytest.mark.parametrize("world,name,saved", [(4, "hsdp", "hsdp"), (2, "pp_interleaved_1f1b", "pp2_interleaved")])
def test_export_consolidates_the_checkpoint_of_a_layout(request, tmp_path_factory, world, name, saved):
    """`shoal export`'s consolidation of an HSDP or interleaved-PP checkpoint is the model that
    one process has after the same steps (the other layouts' exports: tests/export)."""
    from shoal.data.spec import DataSpec
    from shoal.export.consolidate import Located, consolidate
    request.getfixturevalue(f"world{world}")  # trains the layouts, saving this one after SAVE_AT steps
    settings = {k: v for k, v in LAYOUTS[world][name].items() if k != "save"}
    cfg = gpt_config(**settings)
    source = tmp_path_factory.getbasetemp() / "checkpoints" / saved / f"step_{SAVE_AT:08d}"
    spec = DataSpec(kind="tokens", vocab_size=VOCAB, seq_len=SEQ)
    loaded = consolidate(Located(cfg, spec, SAVE_AT, source, False), progress=False)
    _, expected = reference(cfg, token_batches()[:SAVE_AT])
    state = loaded.model.state_dict()
    assert set(expected) <= set(state)
    for key, value in expected.items():
        assert (state[key] - value).abs().max() < 1e-4, key
