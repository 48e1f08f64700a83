"""Hugging Face models under TP=2 and PP=2 reproduce one process (loss to a relative 1e-4 over
5 steps and after them, every reassembled parameter), through the same harness as shoal's gpt;
the state dict keys stay the PreTrainedModel's own, and a checkpoint of one layout resumes on
another (GPT-2's fused q|k|v split by TP, to and from FSDP)."""

from __future__ import annotations

import pytest

from shoal.parallel.hf_pipeline import tied_names
from tests.hf.hf_harness import run_hf_layouts
from tests.hf.tiny import save_tiny, tiny_config
from tests.parallel.parallel_harness import merged
from tests.world import run_world

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "llama_tp2": {"model": "llama", "tp": 2},
    "gpt2_tp2": {"model": "gpt2", "tp": 2, "save": "gpt2_tp2"},  # attention's fused q|k|v split too
    "gpt2_tp2_as_fsdp": {"model": "gpt2", "dp_shard": 2, "resume": "gpt2_tp2"},
    "llama_pp2": {"model": "llama", "pp": 2, "pp_schedule": "1f1b"},
    "gpt2_pp2": {"model": "gpt2", "pp": 2, "pp_schedule": "gpipe"},  # tied embeddings on both stages
    # data parallel: every architecture, replicated (DDP) or sharded per block (FSDP)
    "gpt2_fsdp": {"model": "gpt2", "dp_shard": 2, "save": "gpt2_fsdp"},
    "gpt2_fsdp_as_tp2": {"model": "gpt2", "tp": 2, "resume": "gpt2_fsdp"},
    "llama_ddp": {"model": "llama", "dp_replicate": 2},
    "qwen2_fsdp_ac": {"model": "qwen2", "dp_shard": 2, "activation_checkpointing": "full"},
    "mistral_tp2": {"model": "mistral", "tp": 2},
    "qwen2_pp2": {"model": "qwen2", "pp": 2},
    "bert_ddp": {"model": "bert", "dp_replicate": 2},
    "bert_fsdp": {"model": "bert", "dp_shard": 2},
    "vit_ddp": {"model": "vit", "dp_replicate": 2},
    "vit_fsdp": {"model": "vit", "dp_shard": 2},
}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    folders = {kind: str(save_tiny(kind, root / kind)) for kind in {s["model"] for s in LAYOUTS.values()}}
    out, checkpoints = tmp_path_factory.mktemp("hf_world2"), tmp_path_factory.mktemp("hf_checkpoints")
    run_world(run_hf_layouts, 2, LAYOUTS, folders, str(out), str(checkpoints))
    return merged(str(out), 2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hf_layout_matches_single_process(world2, name):
    import transformers
    kind = LAYOUTS[name]["model"]
    config = tiny_config(kind)
    model = getattr(transformers, config.architectures[0])(config)
    own_keys = set(model.state_dict())
    aliases = {n for names in tied_names(model) for n in names[1:]}  # lm_head.weight is wte's tensor
    held = set()
    for rank, res in enumerate(world2[name]):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["loss_rel_err"] < 1e-4, (rank, res["losses"], res["ref_losses"])
        assert res["param_max_err"] < 1e-4, (rank, res["param_max_err"])
        assert res["steps"] == (2 if "resume" in LAYOUTS[name] else 5)
        assert res["n_params"] > 0 and set(res["missing"]) <= aliases
        if LAYOUTS[name].get("tp", 1) > 1:  # attention and MLP are split, whatever their projections look like
            assert any("attn" in k or "attention" in k for k in res["split"]), res["split"]
            assert any("mlp" in k for k in res["split"]), res["split"]
        sharded = any(LAYOUTS[name].get(k, 1) > 1 for k in ("dp_shard", "tp", "pp"))
        assert (res["local_numel"] < res["full_numel"]) == sharded, (res["local_numel"], res["full_numel"])
        assert set(res["keys"]) <= own_keys, set(res["keys"]) - own_keys  # names are the model's own
        held |= set(res["keys"])
    assert held == own_keys  # together the ranks hold every key of the model
